"""Eval suites: a YAML list of evaluations run on every model state, and how each becomes Scores.

Each entry of ``tasks`` is validated by the config of its ``type`` (the registry in
``retain.eval.tasks``), so a key that belongs to another type is refused with its path.

Result keys: every eval task yields one ``Score`` under its ``name``, with two exceptions:

* ``type: loss`` yields the mean token loss under ``name`` and the perplexity under
  ``f"{name}.perplexity"``;
* ``type: lm_eval`` with several ``lm_eval_tasks`` yields one score per lm-eval task under
  ``f"{name}.{lm_eval_task}"`` (a single task stays under ``name``).

Example suite file (relative ``data.path`` values resolve against the suite file's folder)::

    tasks:
      - name: tinystories
        type: loss
        data: {path: tinystories_val.txt}
        max_examples: 64          # windows, for loss / next_token_accuracy
      - name: cuad_anti_assignment
        type: multiple_choice
        role: task
        train_task: anti_assignment
        data: {path: cuad/test.tsv}
        prompt_template: "Clause: {text}\\nAnswer:"
        choices: ["No", "Yes"]
        max_examples: 200         # records
    sample_prompts: ["Once upon a time"]
    probe_prompts: ["The cat sat on the"]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError, model_validator
from torch import nn

from retain.config import StrictModel, apply_overrides, closest_name, read_yaml
from retain.errors import ConfigError
from retain.eval.tasks import EvalTaskConfig, SharedWork, TaskResult, eval_task_union, eval_types
from retain.eval.split import Part, SplitConfig, is_shared, split_indices
from retain.results.schema import PartScore, Score

__all__ = [
    "EVAL_VERSION",
    "EvalTaskConfig",
    "SuiteConfig",
    "evaluate_suite",
    "evaluate_task",
    "load_suite",
    "load_suite_dict",
    "resolve_paths",
    "suite_hash",
]

#: Bump when a scoring rule changes, so cached scores of the old rule are not reused.
EVAL_VERSION = 2  # 2: every score has its select and report parts

if TYPE_CHECKING:
    AnyEvalTask = EvalTaskConfig
else:
    AnyEvalTask = eval_task_union()  # one config class per registered type, chosen by `type`


class SuiteConfig(StrictModel):
    tasks: list[AnyEvalTask] = Field(default_factory=list)
    split: SplitConfig = Field(
        default_factory=SplitConfig, description="How each eval's items split into select (chooses) and report."
    )
    sample_prompts: list[str] = Field(default_factory=list, description="Prompts for before/after generations.")
    probe_prompts: list[str] = Field(default_factory=list, description="Prompts for the KL drift measurement.")
    sample_max_new_tokens: int = Field(48, gt=0)
    probe_max_length: int = Field(64, gt=1, description="Tokens per probe prompt for the KL reference.")
    probe_top_k: int | None = Field(None, gt=0, description="Keep only the base model's top-k log-probs per probe position.")

    @model_validator(mode="after")
    def _unique_names(self) -> "SuiteConfig":
        names = [t.name for t in self.tasks]
        for name in dict.fromkeys(n for n in names if names.count(n) > 1):
            where = " and ".join(f"tasks[{i}].name" for i, n in enumerate(names) if n == name)
            raise ValueError(f"eval names must be unique (they key the scores): {where} are both '{name}'")
        return self


# --------------------------------------------------------------------------------------------
# Readable validation errors (retain.config conventions, with the per-type config of each task)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _section(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The config class holding the last key of ``loc`` (e.g. ``data`` -> DataConfig)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        nested = [c for c in (annotation, *getattr(annotation, "__args__", ())) if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return model


def _problem(error: Mapping[str, Any]) -> str:
    """One line per pydantic error, naming the key path as the user wrote it."""
    types = eval_types()
    loc, root, tag = tuple(error["loc"]), SuiteConfig, None
    if len(loc) >= 3 and loc[0] == "tasks" and isinstance(loc[1], int) and loc[2] in types:
        tag = str(loc[2])
        root, loc = types[tag], loc[:2] + loc[3:]  # the union's tag is not a key the user wrote
    inner = loc[2:] if tag else loc  # the key path inside ``root``
    path, kind = _path(loc), error["type"]
    if kind == "union_tag_invalid":
        given = str(error.get("ctx", {}).get("tag", ""))
        hint = closest_name(given, list(types))
        extra = f"; did you mean '{hint}'?" if hint else ""
        return f"'{path}.type': unknown eval type '{given}'{extra}; registered types: {', '.join(types)}"
    if kind == "union_tag_not_found":
        return f"missing required key '{path}.type' (one of: {', '.join(types)})"
    if kind == "extra_forbidden":
        valid = list(_section(root, inner[:-1]).model_fields)
        hint = closest_name(str(loc[-1]), valid)
        extra = f"; did you mean '{hint}'?" if hint else ""
        of_type = f" for type '{tag}'" if tag and len(inner) == 1 else ""
        return f"unknown key '{path}'{extra}; valid keys{of_type} here: {', '.join(valid)}"
    if kind == "missing":
        return f"missing required key '{path}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not path:  # a rule over the whole suite (unique names): the message names its keys; no input dump
        return message
    return f"'{path}': {message} (got {error.get('input')!r})"


def _suite_error(err: ValidationError, source: str) -> ConfigError:
    return ConfigError(f"invalid config in {source}:\n  " + "\n  ".join(_problem(e) for e in err.errors()))


# --------------------------------------------------------------------------------------------
# Loading


def resolve_paths(suite: SuiteConfig, base: Path) -> SuiteConfig:
    """Copy of ``suite`` with local file paths (data, lm-eval include folders) absolute against ``base``."""
    return suite.model_copy(update={"tasks": [task.resolved(base) for task in suite.tasks]}, deep=True)


def _check_inputs(suite: SuiteConfig, source: str) -> None:
    """Every local file a suite names exists, so a typo fails at load time, not after training."""
    missing = [
        f"'tasks[{i}].{key}': no such file or folder: {path}"
        for i, task in enumerate(suite.tasks)
        for key, path in task.input_files().items()
        if not Path(path).expanduser().exists()
    ]
    if missing:
        raise ConfigError(
            f"invalid config in {source}:\n  " + "\n  ".join(missing),
            hint="relative paths in a suite file start from the suite file's folder",
        )


def load_suite_dict(data: Mapping[str, Any], source: str = "<dict>", base: Path | None = None) -> SuiteConfig:
    """Validate a suite mapping; with ``base``, relative paths resolve against it."""
    try:
        suite = SuiteConfig.model_validate(dict(data))
    except ValidationError as err:
        raise _suite_error(err, source) from None
    if base is not None:
        suite = resolve_paths(suite, base)
    _check_inputs(suite, source)
    return suite


def load_suite(path: str | Path, overrides: list[str] | None = None) -> SuiteConfig:
    """Read a suite YAML; errors name the file and the key. Relative data paths resolve against
    the YAML file's folder, so a suite and its data can move together."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval suite file not found: {path}")
    data = read_yaml(path, "eval suite") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys tasks, sample_prompts, probe_prompts")
    if overrides:
        data = apply_overrides(data, overrides)
    return load_suite_dict(data, str(path), base=path.resolve().parent)


def suite_hash(suite: SuiteConfig) -> str:
    """Stable sha256 of the suite config, with local data (and lm-eval include folders) replaced by
    the sha256 of their contents: same data under another path hashes the same, edited data not."""
    dumped = suite.model_dump(mode="json")
    dumped["tasks"] = [task.hash_payload() for task in suite.tasks]
    payload = json.dumps({"eval_version": EVAL_VERSION, "suite": dumped}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Evaluation


def _score(task: EvalTaskConfig, result: TaskResult, part: str, n: int | None = None,
           value: float | None = None) -> Score:
    fields = result.as_dict()
    if value is not None:
        fields.update(value=value, n=n)
    return Score(**fields, role=task.role, train_task=task.train_task, part=part)


def _split_score(task: EvalTaskConfig, result: TaskResult, split: SplitConfig) -> Score:
    """The report part's score with the select part's value beside it, from one pass over every item."""
    if result.items is None:  # an eval that cannot give its items (lm-eval): every item is both parts
        return _score(task, result, "all")
    select_ids, report_ids = split_indices(len(result.items.num), split)
    if is_shared(len(result.items.num), split):
        return _score(task, result, "all").model_copy(update={"items": result.items if result.bounded else None})
    parts = {}
    for name, ids in (("select", select_ids), ("report", report_ids)):
        items = result.items.subset(ids)
        n = int(sum(items.den)) if items.den is not None else len(ids)
        parts[name] = (items, n)
    report_items, report_n = parts["report"]
    select_items, select_n = parts["select"]
    score = _score(task, result, "report", report_n, report_items.value())
    return score.model_copy(update={
        "select": PartScore(value=select_items.value(), n=select_n),
        "items": report_items if result.bounded else None,
    })


def evaluate_task(
    model: nn.Module, tokenizer: Any, task: EvalTaskConfig, batch_size: int = 16, shared: SharedWork | None = None,
    *, part: Part = "all", split: SplitConfig | None = None, limit: int | None = None,
) -> dict[str, Score]:
    """Scores of one eval task, tagged with its role and train_task, on ``part`` of its items under
    ``split`` (``retain.eval.split``): ``select`` or ``report`` score only that part; ``both`` scores
    every item once and reports the report part with the select value beside it; ``all`` every item.
    ``limit``: at most that many items of a ``select``/``report`` part (a seeded subset of the part)."""
    split = split or SplitConfig()
    results = task.for_part(part, split, limit).evaluate(model, tokenizer, batch_size, shared)
    if part == "both":
        return {key: _split_score(task, r, split) for key, r in results.items()}
    tag = part if part != "all" and task.splits else "all"
    return {key: _score(task, r, tag).model_copy(update={"items": r.items if r.bounded else None})
            for key, r in results.items()}


def evaluate_suite(
    model: nn.Module, tokenizer: Any, suite: SuiteConfig, batch_size: int = 16, *, part: Part = "all"
) -> dict[str, Score]:
    """Every eval task of the suite, in suite order (see the module docstring for the keys), on ``part``
    of each eval's items (see ``evaluate_task``; ``all``: every item, for a model scored on its own).

    Evals share work within this call (one model state): records of a file are read once, and a
    loss and a next-token-accuracy eval over the same windows run one forward pass over them.
    """
    shared = SharedWork()
    scores: dict[str, Score] = {}
    for task in suite.tasks:
        scores.update(evaluate_task(model, tokenizer, task, batch_size, shared, part=part, split=suite.split))
    return scores
