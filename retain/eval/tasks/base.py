"""The eval type registry: each ``type:`` of a suite entry is one config class with its own fields.

An eval type is a pydantic model (its fields are exactly the suite keys it accepts, so a key of
another type is refused with its path) plus an ``evaluate`` method. Adding one::

    @register_eval_type("my_type")
    class MyEval(DataEval):                       # or EvalTaskConfig if it reads no data file
        type: Literal["my_type"] = "my_type"
        my_option: int = 3
        def evaluate(self, model, tokenizer, batch_size=16, shared=None) -> dict[str, TaskResult]: ...

in a new module of ``retain/eval/tasks/``; every module there is imported when the registry is first
read, so nothing else needs editing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args

from pydantic import Field, PrivateAttr, model_validator
from torch import nn

from retain.config import StrictModel
from retain.data.sampling import seeded_subset
from retain.eval.split import Part, SplitConfig, part_indices
from retain.registry import Registry
from retain.results.schema import ItemScores

V = TypeVar("V")


@dataclass(frozen=True)
class TaskResult:
    """One measured value: the fields of ``retain.results.schema.Score`` that do not depend on the suite.

    ``items``: the value item by item (pool order), where the type can give it; the suite splits it into
    the select and report parts (``retain.eval.split``) and keeps the report items for intervals.
    """

    value: float
    metric: str
    higher_is_better: bool
    bounded: bool
    n: int
    items: ItemScores | None = None

    def as_dict(self) -> dict[str, Any]:
        """The Score fields (items are the suite's to split)."""
        return {k: v for k, v in asdict(self).items() if k != "items"}


class SharedWork:
    """Work that several evals of one suite run can reuse (records of a file, window statistics).

    Valid for one model state only, so ``evaluate_suite`` makes a new one per call: a loss and a
    next-token-accuracy eval over the same windows then cost one forward pass over them, not two.
    """

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]


class EvalTaskConfig(StrictModel):
    """Fields every eval type has. Subclasses add their own fields and implement ``evaluate``."""

    name: str = Field(description="Key of this eval's score(s) in results; unique within the suite.")
    type: str = Field(description="Registered eval type (see retain.eval.tasks.eval_types()).")
    role: Literal["general", "task"] = Field(
        "general", description="general: ability to preserve; task: measures the training task train_task."
    )
    train_task: str | None = Field(None, description="Training task this eval measures (role: task).")

    @model_validator(mode="after")
    def _role_and_train_task(self) -> "EvalTaskConfig":
        if self.role == "task" and not self.train_task:
            raise ValueError(f"eval '{self.name}': role task needs train_task (the training task it measures)")
        if self.role == "general" and self.train_task:
            raise ValueError(f"eval '{self.name}': train_task is set, so set role: task too")
        return self

    _part: Part = PrivateAttr("all")
    _split: SplitConfig = PrivateAttr(default_factory=SplitConfig)
    _limit: int | None = PrivateAttr(None)

    def evaluate(
        self, model: nn.Module, tokenizer: Any, batch_size: int = 16, shared: SharedWork | None = None
    ) -> dict[str, TaskResult]:
        """Result key -> result; the key is ``name`` unless the type documents more keys. Types with items
        score only the items of ``self.part`` (``for_part``) and return them in ``TaskResult.items``."""
        raise NotImplementedError(f"eval type '{self.type}' does not implement evaluate")

    # -- the part of the items scored (retain.eval.split) --------------------------------------

    splits: ClassVar[bool] = False  # types whose items can be split (windows, records); lm_eval cannot

    @property
    def part(self) -> Part:
        return self._part

    @property
    def split(self) -> SplitConfig:
        return self._split

    def for_part(self, part: Part, split: SplitConfig, limit: int | None = None) -> "EvalTaskConfig":
        """A copy that scores only ``part`` of its items under ``split`` (``all``/``both``: every item),
        at most ``limit`` of them (a seeded subset of the part: a cheaper probe, still inside the part)."""
        copy = self.model_copy()
        copy._part, copy._split, copy._limit = part, split, limit
        return copy

    def item_ids(self, n: int) -> list[int]:
        """Which of the pool's ``n`` items this copy scores (its part, at most its limit)."""
        ids = part_indices(n, self._part, self._split)
        return seeded_subset(ids, self._limit, self._split.seed) if self._limit is not None else ids

    # -- files: overridden by types that read local files --------------------------------------

    def resolved(self, base: Path) -> "EvalTaskConfig":
        """A copy whose relative file paths are made absolute against ``base`` (the suite's folder)."""
        return self.model_copy(deep=True)

    def input_files(self) -> dict[str, str]:
        """Key path (e.g. ``data.path``) -> local file or folder this eval reads; all must exist."""
        return {}

    def hash_payload(self) -> dict[str, Any]:
        """What identifies this eval's scores: its config with local files replaced by content hashes."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Registry


def _declares_its_type(name: str, cls: type[EvalTaskConfig]) -> None:
    """The ``type`` Literal is the suite's discriminator: a class registered under another name would
    be chosen for the wrong entries."""
    declared = get_args(cls.model_fields["type"].annotation)
    if declared != (name,):
        raise TypeError(f"{cls.__name__} registers type '{name}' but declares type: Literal{list(declared)}")


#: Every eval type by its ``type:`` name; the modules of this package are imported on the first read.
EVAL_TYPES: Registry[type[EvalTaskConfig]] = Registry(
    "eval type", package="retain.eval.tasks", exclude={"base"}, validate=_declares_its_type, listing="Registered types"
)
E = TypeVar("E", bound=type[EvalTaskConfig])


def register_eval_type(name: str) -> Callable[[E], E]:
    """Class decorator: make an eval type available as ``type: name`` in suites."""
    return EVAL_TYPES.register(name)  # type: ignore[return-value]  # returns the class it was given


def eval_types() -> dict[str, type[EvalTaskConfig]]:
    """Registered eval types by name, sorted."""
    return dict(EVAL_TYPES.items())


def get_eval_type(name: str) -> type[EvalTaskConfig]:
    return EVAL_TYPES.get(name)


def eval_task_union() -> Any:
    """The pydantic type of one suite entry: the registered configs, chosen by their ``type`` key."""
    classes = tuple(eval_types().values())
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="type")]  # noqa: UP007 (a runtime tuple)
