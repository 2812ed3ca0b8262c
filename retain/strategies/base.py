"""The strategy protocol: a few hooks around one training loop.

A strategy is one class with a frozen pydantic ``Config`` and only the hooks it needs. Hooks *return*
values (a wrapped model, a transformed batch, named loss terms) instead of mutating shared loop state,
so a hybrid's behaviour does not depend on hidden ordering between strategies.

Hook order inside the loop, per task::

    setup(model)                    once per run, in list order (wrap: LoRA, prompt tuning, ...)
    before_task(task)               snapshot a teacher, compute masks, fill buffers, add adapters
      repeat per optimizer step:
        transform_batch(batch)      each micro-batch, chained in list order
        extra_losses(outputs, batch) named penalty / distillation terms, summed by the loop
        after_backward(model)       gradients are ready: project, constrain
        after_step(model)           the weights moved: path integrals, step bounds, re-anchoring
    after_task(task)                consolidate: Fisher, merges, stored state
    state_dict() / load_state_dict(state, ctx)   everything needed to resume exactly
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from retain.config import DataConfig, RunConfig, StrictModel
from retain.data import Example, TaskData, build_task_data
from retain.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("retain")

Batch = dict[str, torch.Tensor]


class StrategyConfig(StrictModel):
    """Base for a strategy's parameters: unknown keys refused, values frozen once built."""

    model_config = StrictModel.model_config | {"frozen": True, "validate_assignment": False}


@dataclass
class TaskInfo:
    """One task of the sequence, as strategies see it."""

    index: int
    name: str
    steps: int
    data: "TaskData"

    @property
    def train_examples(self) -> list["Example"]:
        return self.data.train


@dataclass
class StrategyContext:
    """What the loop shares with strategies. Strategies read it; they change the run only via hook returns."""

    config: "RunConfig"
    accelerator: "Accelerator"
    tokenizer: Any
    model: nn.Module
    tasks: list[TaskInfo]
    run_dir: Path
    cache_dir: Path
    collate: Callable[[list["Example"]], Batch]
    task: TaskInfo | None = None
    global_step: int = 0
    step_in_task: int = 0
    resuming: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    _loaded: dict[str, list["Example"]] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def past_tasks(self) -> list[TaskInfo]:
        """Tasks trained before the current one (empty for the first)."""
        return self.tasks[: self.task.index] if self.task is not None else []

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def load_examples(self, data: "DataConfig") -> list["Example"]:
        """Tokenized training examples of a data config, loaded once per run and shared by strategies."""
        key = data.model_dump_json()
        if key not in self._loaded:
            self._loaded[key] = build_task_data(data, self.tokenizer, seed=self.config.train.seed).train
        return self._loaded[key]

    def general_examples(self, own: "DataConfig | None", who: str) -> list["Example"]:
        """The strategy's own data if it names one, else the run's ``general_data``; a clear error if neither."""
        data = own or self.config.general_data
        if data is None:
            raise ConfigError(
                f"strategy '{who}' needs text to anchor on: set its 'data' key or the run's 'general_data' "
                "(e.g. general_data: {path: general.jsonl}); keep it disjoint from evaluation text."
            )
        return self.load_examples(data)

    def log(self, name: str, value: float) -> None:
        """Report a scalar (e.g. tokens masked) into the run log at the next logging step."""
        self.metrics[name] = float(value)


class Strategy:
    """Base of all strategies: every hook is a no-op, so a strategy writes only the ones it needs.

    Class attributes declare how strategies combine:
    - ``wraps_model``: the strategy decides which parameters train or wraps the model (full, freeze,
      LoRA, prompt tuning). Two such strategies in one hybrid are refused unless one names the other in
      ``compatible_with``.
    - ``modifies_frozen_weights``: the strategy changes weights the optimizer does not train (e.g.
      merging adapters into the base), so checkpoints must save the full weights.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    wraps_model: ClassVar[bool] = False
    compatible_with: ClassVar[frozenset[str]] = frozenset()
    modifies_frozen_weights: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        return model

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        return None

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        return batch

    def extra_losses(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, model: nn.Module, ctx: StrategyContext) -> None:
        return None

    def after_step(self, model: nn.Module, ctx: StrategyContext) -> None:
        return None

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-able values needed to resume; tensors go to safetensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        """Restore after ``setup`` and before the model's weights are loaded; may rebuild structure."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
