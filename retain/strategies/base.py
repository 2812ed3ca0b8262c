"""The strategy protocol: a few hooks around one training loop.

A strategy is one class with a frozen pydantic ``Config`` and only the hooks it needs. Hooks *return*
values (a wrapped model, a transformed batch, named loss terms) instead of mutating shared loop state,
so a hybrid's behaviour does not depend on hidden ordering between strategies.

Hook order inside the loop, per task::

    setup(model)                    once per run, in list order (wrap: LoRA, prompt tuning, ...)
    before_task(task)               snapshot a teacher, compute masks, fill buffers, add adapters
      repeat per optimizer step:
        transform_batch(batch)      each micro-batch of the step, in order, all before the step's first
                                    forward (with several processes: the rows of every process)
        extra_losses(outputs, batch) per micro-batch: named penalty / distillation terms, summed by the loop
        after_backward(model)       gradients are ready: project, constrain
        after_step(model)           the weights moved: path integrals, step bounds, re-anchoring
    after_task(task)                consolidate: Fisher, merges, stored state
    state_dict() / load_state_dict(state, ctx)   everything needed to resume exactly

Loss hooks (``extra_losses``) are pure with respect to the strategy's state: they read it and return
terms, but never change what a later hook reads (cursors advance in ``transform_batch``, anchors are
taken there or in ``before_task``), so a term can be evaluated twice, or not at all, without changing
the run. Since every transform of a step runs before its first forward, what a term needs from its
own micro-batch's transform is kept per ``ctx.micro_batch`` (lwf and fip keep their pool rows so).
What a strategy needs from the rest of the run (general text, a companion strategy, a second
task) it declares (``needs_strategies``, ``min_tasks``, ``requirements``); ``validate_run_config``
checks it before any model loads.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from retain.config import DataConfig, RunConfig, StrictModel
from retain.data import Example, TaskData, build_task_data
from retain.data.sampling import derive_seed
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
    micro_batch: int = 0  # the micro-batch of the step being built (transform_batch) or scored (extra_losses)
    step_tokens: torch.Tensor | None = None  # attention tokens of the step's batches, every process (in the loop)
    step_parts: int = 1  # micro-batches per step times processes: what the loop averages terms over
    suite: Any = None  # the run's eval suite (a SuiteConfig) when it has one: wise chooses alpha on its select part
    _loaded: dict[str, list["Example"]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(cls, config: "RunConfig", accelerator: Any, tokenizer: Any, model: nn.Module, tasks: list[TaskInfo],
                run_dir: Path, cache_dir: Path) -> "StrategyContext":
        """The context of a run (``retain train``'s recipe, or a Trainer session), collating with the
        tokenizer's pad token."""
        from retain.data import collate

        return cls(config=config, accelerator=accelerator, tokenizer=tokenizer, model=model, tasks=tasks,
                   run_dir=run_dir, cache_dir=cache_dir,
                   collate=functools.partial(collate, pad_token_id=tokenizer.pad_token_id))

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

    def token_weight(self, mask: torch.Tensor) -> torch.Tensor | float:
        """The factor that turns a term averaged over the tokens of its micro-batch (``mask``, the
        batch's ``attention_mask`` or a part of it) into that micro-batch's share of the mean over every
        token of the optimizer step, on every process: ``tokens here * parts / tokens of the step``.
        The loop averages terms over ``parts`` (micro-batch, process) pairs, so the weighted term sums
        to the step's token mean, as the task loss does. 1 outside the loop (hooks driven by hand)."""
        if self.step_tokens is None:
            return 1.0
        here = mask.sum().to(self.step_tokens.device, torch.float32)
        return here * self.step_parts / self.step_tokens.clamp_min(1.0)

    def log(self, name: str, value: float) -> None:
        """Report a scalar into the next row of the run log. Rows do not repeat it: report a value in the
        window it belongs to (and again after a resume, if the row after it should show it)."""
        self.metrics[name] = float(value)

    def seed_for(self, strategy: "Strategy", *streams: int) -> int:
        """The seed of one of ``strategy``'s random streams: its own ``seed`` key when set, else
        ``train.seed``, so ``retain bench --seed`` moves every strategy's choices. ``streams`` is a
        purpose (``retain.data.sampling.Stream``) and its indices (a task, ...); with none, the base seed
        itself, which only an estimator that derives its own streams (``Stream.ESTIMATE_*``) should take."""
        return strategy_seed(getattr(strategy.config, "seed", None), self.config, *streams)


def strategy_seed(own: int | None, run: "RunConfig", *streams: int) -> int:
    """``derive_seed(own if set else run.train.seed, purpose, *indices)``: the seed rule of
    ``retain.data.sampling``, with a strategy's own ``seed`` key as the root when it is set."""
    return derive_seed(own if own is not None else run.train.seed, *streams)


def has_general_text(own: "DataConfig | None", run: "RunConfig") -> bool:
    """Whether a strategy has general text: its own ``data`` key or the run's ``general_data``."""
    return own is not None or run.general_data is not None


@dataclass(frozen=True)
class Strength:
    """Which config key sets how strongly a strategy protects what the model knew, and its sensible range.

    The one description of a strength knob, used by the strategy (``set_strength``), a forgetting budget
    (which moves it during a run), ``retain tune`` (which searches it) and the report (which labels it
    ``strategy.key``). Both move it in log space when ``log`` is true. ``protects_more_when_higher`` is
    false for a key where a larger value protects less (STM's perplexity threshold masks fewer tokens
    as it grows). A class declares it without ``strategy``/``default``; :meth:`of` binds them.
    """

    key: str
    low: float
    high: float
    log: bool = True
    protects_more_when_higher: bool = True
    strategy: str = ""  # the registered name of the strategy that declares it (bound by ``of``)
    default: float | None = None  # that strategy's config default, clipped into the range (bound by ``of``)

    @classmethod
    def of(cls, strategy: type["Strategy"]) -> "Strength | None":
        """The strategy class's declared strength, bound to its name and config default (None if it has none)."""
        declared = strategy.strength
        if declared is None:
            return None
        field_default = strategy.Config.model_fields[declared.key].default
        default = float(field_default) if isinstance(field_default, (int, float)) else math.sqrt(declared.low * declared.high)
        return replace(declared, strategy=strategy.name, default=declared.clip(default))

    @property
    def label(self) -> str:
        """``strategy.key``: how results, the budget and tune's search space name it."""
        return f"{self.strategy}.{self.key}"

    def clip(self, value: float) -> float:
        return min(max(float(value), self.low), self.high)

    def moved(self, value: float, log_change: float) -> float:
        """``value`` moved by ``log_change`` in log space towards more protection (positive) or less, clipped."""
        sign = 1.0 if self.protects_more_when_higher else -1.0
        return self.clip(math.exp(math.log(value) + sign * log_change))

    def at_protective_limit(self, value: float) -> bool:
        """No more protection is available: ``value`` sits at the end of the range that protects most."""
        return value >= self.high if self.protects_more_when_higher else value <= self.low


class Strategy:
    """Base of all strategies: every hook is a no-op, so a strategy writes only the ones it needs.

    Class attributes declare how strategies combine:
    - ``wraps_model``: the strategy decides which parameters train or wraps the model (full, freeze,
      LoRA, prompt tuning). Two such strategies in one hybrid are refused unless one names the other in
      ``compatible_with``.
    - ``modifies_frozen_weights``: the strategy changes weights the optimizer does not train (e.g.
      merging adapters into the base), so checkpoints must save the full weights.
    - ``peft_wrapper``: the strategy wraps the model with peft, so its adapters can be switched off
      (e.g. for lwf's ``adapters_off`` teacher).

    And what it needs from the run, checked with the config before any model loads:
    - ``needs_strategies``: strategies that must be listed with it (ewc-lora needs lora).
    - ``min_tasks``: the fewest tasks with which it does anything beyond its base method.
    - ``requirements(run, where)``: the conditional needs (general text for a general source, ...).

    And, for methods with a single strength knob, ``strength``: a :class:`Strength` naming that config
    key and its sensible range (None for strategies without one, e.g. full or lora).

    And the facts ``retain recommend``/``tune`` reason with and the config reads, declared here so that a
    new strategy is its own file and nothing else (checked at registration, ``declaration_problems``):
    - ``preserves_function``: keeps the model's outputs close to the original's (distillation, paths).
    - ``quadratic_state``: keeps an anchor and an importance per trainable weight (2 x trainable weights).
    - ``input_path_keys`` / ``output_path_keys``: config keys naming a file or folder the strategy reads /
      writes (resolved against the run YAML's folder; an output never replaces an input).
    - ``stores_real_data(config)``, ``extra_passes(config, adapters=)``, ``holds_model_copy(config,
      adapters=)``: the facts that depend on the strategy's settings (and on whether the hybrid trains
      adapters), from its validated config.
    - ``supports_sharding``: trains under ``train.parallel: fsdp`` (FSDP2) with its per-parameter state
      sharded like the weights and its forwards run on every process; others are refused there, with
      ``sharding_refusal`` (why) when it says more than the default.

    And ``optimizer_settings()``: the ``train`` optimizer keys it sets (mofo makes the optimizer MoFO), so
    the loop needs no strategy's name.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    wraps_model: ClassVar[bool] = False
    compatible_with: ClassVar[frozenset[str]] = frozenset()
    modifies_frozen_weights: ClassVar[bool] = False
    peft_wrapper: ClassVar[bool] = False
    needs_strategies: ClassVar[frozenset[str]] = frozenset()
    min_tasks: ClassVar[int] = 1
    strength: ClassVar[Strength | None] = None
    preserves_function: ClassVar[bool] = False
    supports_sharding: ClassVar[bool] = False
    sharding_refusal: ClassVar[str] = ""
    quadratic_state: ClassVar[bool] = False
    input_path_keys: ClassVar[tuple[str, ...]] = ()
    output_path_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def stores_real_data(cls, config: StrategyConfig) -> bool:
        """Keeps real training examples (in a buffer that also lands in checkpoints, or as demonstrations)."""
        return False

    @classmethod
    def extra_passes(cls, config: StrategyConfig, *, adapters: bool) -> float:
        """Extra work per step relative to plain training: one forward+backward = 1, one forward = 1/3."""
        return 0.0

    @classmethod
    def holds_model_copy(cls, config: StrategyConfig, *, adapters: bool) -> bool:
        """Holds a second copy of the model's (trained) weights while training."""
        return False

    def sharding_problem(self) -> str | None:
        """Why this strategy, as configured, cannot train under ``train.parallel: fsdp`` (None: it can).
        A strategy whose support depends on its settings overrides this."""
        if self.supports_sharding:
            return None
        if self.sharding_refusal:
            return self.sharding_refusal
        if self.peft_wrapper:
            return "it trains PEFT adapters or prompts, which train.parallel: fsdp does not shard (they are small: use train.parallel: ddp)"
        return "its state or extra forwards assume whole weights on every process"

    @classmethod
    def declaration_problems(cls) -> list[str]:
        """What is wrong with the class's declared facts (checked when it registers): every key it names
        must be a field of its ``Config``, and a strength's default must lie in its range."""
        fields = cls.Config.model_fields
        problems = [f"{kind} '{key}' is not a field of {cls.Config.__name__}"
                    for kind, keys in (("input path key", cls.input_path_keys), ("output path key", cls.output_path_keys))
                    for key in keys if key not in fields]
        if cls.strength is not None:
            if cls.strength.key not in fields:
                problems.append(f"strength key '{cls.strength.key}' is not a field of {cls.Config.__name__}")
            elif not 0 < cls.strength.low < cls.strength.high:
                problems.append(f"strength range [{cls.strength.low}, {cls.strength.high}] is not 0 < low < high")
            elif isinstance(fields[cls.strength.key].default, (int, float)) and not (
                    cls.strength.low <= fields[cls.strength.key].default <= cls.strength.high):
                problems.append(f"strength default {fields[cls.strength.key].default} is outside "
                                f"[{cls.strength.low}, {cls.strength.high}]")
        return problems

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def requirements(self, run: "RunConfig", where: str) -> list[str]:
        """Problems with how this strategy is configured in ``run``, one message each, naming the key to
        set (``where`` is its place in the list, e.g. ``strategies[1]``); empty when it has what it needs.

        Only the config is available: this runs before the model and data load, so a mistake costs
        seconds, not a base-model evaluation. Declared needs (``needs_strategies``, ``min_tasks``) are
        checked by the registry; override this for needs that depend on the strategy's settings.
        """
        return []

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

    def optimizer_settings(self) -> dict[str, Any]:
        """``train`` optimizer keys this strategy sets for the run (mofo: ``optimizer``, ``mofo_fraction``),
        over the config's. The loop reads them when it builds a task's optimizer and again before every
        step, so a value that ``set_strength`` moves applies from the next step."""
        return {}

    def set_strength(self, value: float) -> None:
        """Apply a new value of the declared ``strength`` while the run goes on (a forgetting budget moves it).

        The default replaces the config value; hooks that read ``self.config`` on every step then use it
        from the next step. Override when state derived from the value must follow (a replay schedule,
        token masks). It may be called after ``setup`` and before ``load_state_dict`` (a resumed run
        applies the budget's current value first), so an override must not assume a task has started.
        """
        if self.strength is None:
            raise TypeError(f"strategy '{self.name}' declares no strength to set")
        self.config = self.config.model_copy(update={self.strength.key: float(value)})

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-able values needed to resume; tensors go to safetensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        """Restore after ``setup`` and before the model's weights are loaded; may rebuild structure."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
