"""Learning without Forgetting for LLMs (Li & Hoiem 2016): distil the original model into the one
being fine-tuned, on anchor inputs, so the fine-tune keeps the original's next-token distributions.

    L = L_task + alpha * T^2 * KL(p_teacher^T || p_student^T)   (mean over anchor tokens)

Anchors (``anchor``): ``task``, the current batch itself (the original LwF: new-task inputs; the
student's logits come free from the task forward, so only the teacher runs), or ``general``, batches
from a text pool (the strategy's ``data`` or the run's ``general_data``), which costs one more
student forward and backward per step but pulls toward the original where it matters for retention.

Which model teaches (``teacher_at``):
- ``task_start`` (default; Li & Hoiem, and Avalanche's LwF plugin, which copies the model after each
  experience): the model as it was when the current task started. For the first task that is the
  loaded model; for later ones it keeps what tasks 1..t-1 taught on the anchor inputs instead of
  pulling it back to the base. It is consistent with ``ewc-lora``'s merges (the model at a task's
  start is the merged model with a fresh adapter).
- ``base``: always the loaded model (refused with a strategy that merges adapters into the base
  weights and an adapters-off teacher, which would then be the merged model, not the base; use
  ``teacher: copy`` for a true base).

How the first task's teacher (and every teacher with ``teacher_at: base``) is evaluated (``teacher``):
- ``adapters_off``: with LoRA or prompt tuning, the training model itself under
  ``model.disable_adapter()``: no copy in memory.
- ``copy``: a frozen deep copy (full fine-tuning).
- ``cached_topk``: the teacher's top-k probabilities at temperature T (plus the mass of all other
  tokens as one bucket) over every anchor example, computed before training and cached on disk,
  for when teacher and student do not both fit; k = vocabulary size is exact. With ``task_start``
  the table is recomputed at each later task's start from the model as it is then.
- ``auto``: ``adapters_off`` when the model is PEFT-wrapped, else ``copy``.

From the second task on, ``task_start`` (except ``cached_topk``) evaluates the training model
functionally (``torch.func.functional_call``) with a snapshot of its *trainable* weights taken at the
task's first step, as ``fip`` does: with LoRA the snapshot is the adapters (a few MB), with full
fine-tuning one copy of the weights, which replaces the frozen copy. It is part of the checkpoint.

With prompt tuning the student's logits carry extra virtual-token positions at the front; they are
dropped so teacher and student are compared on the same input positions.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call

from retain.config import DataConfig, RunConfig
from retain.data.identity import batch_rows, example_key, examples_hash
from retain.data.sampling import sample_indices, subset_indices
from retain.errors import ConfigError
from retain.losses.distill import kl_with_temperature, kl_with_temperature_topk, topk_teacher
from retain.models.adapters import is_peft_model
from retain.models.fingerprint import base_fingerprint, model_fingerprint
from retain.models.runtime import align_to_inputs, frozen_copy, reference_forward, trainable_parameters
from retain.stats.token_tables import TokenTable, cache_file, cached_table, compute_table
from retain.strategies.base import (
    Batch,
    Strategy,
    StrategyConfig,
    StrategyContext,
    Strength,
    TaskInfo,
    has_general_text,
)
from retain.strategies.registry import get_strategy_class, register_strategy

logger = logging.getLogger("retain")


class LwfConfig(StrategyConfig):
    alpha: float = Field(1.0, ge=0.0, description="Weight of the distillation term.")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature T of teacher and student.")
    anchor: Literal["task", "general"] = Field(
        "task", description="Distil on the task's own batches, or on batches of a general text pool."
    )
    data: DataConfig | None = Field(None, description="General anchor text (anchor=general); default general_data.")
    anchor_batch_size: int = Field(4, gt=0, description="Anchor sequences per micro-batch (anchor=general).")
    pool_size: int | None = Field(None, gt=0, description="Use at most this many general anchor examples (seeded).")
    teacher: Literal["auto", "adapters_off", "copy", "cached_topk"] = Field(
        "auto", description="How the teacher is evaluated (see the module docstring)."
    )
    teacher_at: Literal["task_start", "base"] = Field(
        "task_start", description="The model at the current task's start (LwF; the base for the first task) or always the base."
    )
    top_k: int = Field(32, gt=0, description="Teacher tokens kept per position (teacher=cached_topk).")
    cache_batch_size: int = Field(16, gt=0, description="Batch size of the top-k precompute pass.")
    seed: int | None = Field(None, description="Seed of the anchor pool's subset and order; default: train.seed.")

    @model_validator(mode="after")
    def _general_only_keys(self) -> "LwfConfig":
        if self.anchor == "task" and (self.data is not None or self.pool_size is not None):
            raise ValueError("'data' and 'pool_size' choose general anchors: set anchor: general to use them")
        return self


def gather_topk(table: TokenTable, indices: list[int | None], seq_len: int, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's cached teacher, ``(batch, seq, k)`` / ``(batch, seq)``, and ``known``: positions that have one.

    ``indices[b]`` is row b's example in ``table`` (None: unknown, e.g. a replayed row, not distilled);
    ``rows[b]`` are the batch positions of its real tokens. Unknown positions hold finite fillers.
    """
    k = table.tensors["log_q"].shape[-1]
    out = {
        "log_q": torch.zeros(len(indices), seq_len, k),
        "indices": torch.zeros(len(indices), seq_len, k, dtype=torch.int64),
        "log_rest": torch.zeros(len(indices), seq_len),
        "known": torch.zeros(len(indices), seq_len),
    }
    for b, (index, positions) in enumerate(zip(indices, rows)):
        if index is None or int(table.lengths[index]) != len(positions):
            continue
        for name in ("log_q", "indices", "log_rest"):
            out[name][b, positions] = table.example(index, name).to(out[name].dtype)
        out["known"][b, positions] = 1.0
    return out


@register_strategy("lwf")
class LearningWithoutForgetting(Strategy):
    Config = LwfConfig
    strength = Strength("alpha", 1e-2, 1e2)
    preserves_function = True

    @classmethod
    def teacher_source(cls, config: StrategyConfig, *, adapters: bool) -> str:
        """Where the teacher's outputs come from: ``auto`` is the adapters switched off when the model
        trains adapters (no second model in memory), else a frozen copy."""
        assert isinstance(config, LwfConfig)
        if config.teacher == "auto":
            return "adapters_off" if adapters else "copy"
        return config.teacher

    @classmethod
    def holds_model_copy(cls, config: StrategyConfig, *, adapters: bool) -> bool:
        return cls.teacher_source(config, adapters=adapters) == "copy"

    @classmethod
    def extra_passes(cls, config: StrategyConfig, *, adapters: bool) -> float:
        """General anchors add a student forward+backward; every teacher but cached top-k a forward."""
        assert isinstance(config, LwfConfig)
        teacher = 0.0 if cls.teacher_source(config, adapters=adapters) == "cached_topk" else 1 / 3
        return (1.0 if config.anchor == "general" else 0.0) + teacher

    def __init__(self, config: LwfConfig | None = None) -> None:
        super().__init__(config)
        self._source: str | None = None  # resolved teacher source
        self._teacher_copy: nn.Module | None = None
        self._pool: list = []
        self._cursor = 0  # anchor examples drawn so far (general anchors): the only state that evolves
        self._fingerprint: str | None = None
        self._table: TokenTable | None = None  # cached top-k for the current task (or the pool)
        self._table_name: str | None = None
        self._table_keys: dict[bytes, int] = {}
        self._picks: dict[int, list[int]] = {}  # pool rows anchoring each micro-batch of the step (anchor=general)
        self._task_weights: dict[str, torch.Tensor] | None = None  # trainable weights at this task's start
        self._task_weights_index = -1  # the task they belong to
        self._table_fingerprint: str | None = None  # cached_topk + task_start: the teacher table's model

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        problems = []
        if self.config.anchor == "general" and not has_general_text(self.config.data, run):
            problems.append(f"anchor: general needs text: set general_data or {where}.data")
        peft = any(get_strategy_class(spec.name).peft_wrapper for spec in run.strategies)
        if self.config.teacher == "adapters_off" and not peft:
            problems.append(
                "teacher: adapters_off needs a PEFT-wrapped model: list lora or prompt-tuning with it, "
                f"or set {where}.teacher: copy (or cached_topk)"
            )
        merging = [s.name for s in run.strategies if get_strategy_class(s.name).modifies_frozen_weights]
        if self.config.teacher_at == "base" and merging and (
            self.config.teacher == "adapters_off" or (self.config.teacher == "auto" and peft)
        ):
            problems.append(
                f"teacher_at: base with an adapters-off teacher: {', '.join(merging)} merges adapters into the base "
                f"weights, so that teacher would be the merged model, not the base. Set {where}.teacher: copy for a "
                f"true base teacher, or {where}.teacher_at: task_start"
            )
        return problems

    # ------------------------------------------------------------------ teacher

    def _prepare(self, ctx: StrategyContext) -> None:
        """Pin down the teacher while the model still holds its original weights.

        Called in the first ``before_task`` of a fresh run, and in ``load_state_dict`` on resume
        (which runs before the checkpoint's weights are loaded), so both see the original model.
        """
        model = ctx.unwrapped_model
        source = self.teacher_source(self.config, adapters=is_peft_model(model))
        if source == "adapters_off":
            if not is_peft_model(model):
                raise ConfigError(
                    "lwf.teacher=adapters_off needs a PEFT-wrapped model (add 'lora' or 'prompt-tuning' to the "
                    "strategies), or use teacher: copy / cached_topk."
                )
        if source == "copy":
            self._teacher_copy = frozen_copy(model)
        if self.config.anchor == "general":
            examples = ctx.general_examples(self.config.data, "lwf")
            self._pool = [examples[i] for i in subset_indices(len(examples), self.config.pool_size, ctx.seed_for(self))]
            if not self._pool:
                raise ConfigError("lwf: the general anchor data has no examples")
        if source == "cached_topk":
            self._fingerprint = base_fingerprint(model)
            for name, examples in self._anchor_sets(ctx).items():
                self._topk_table(ctx, name, examples, compute_if_missing=True)
        self._source = source

    def _anchor_sets(self, ctx: StrategyContext) -> dict[str, list]:
        if self.config.anchor == "general":
            return {"pool": self._pool}
        return {f"task{t.index}": t.train_examples for t in ctx.tasks}

    def _topk_table(
        self, ctx: StrategyContext, name: str, examples: list, compute_if_missing: bool, adapters_off: bool = True
    ) -> TokenTable:
        data_hash = examples_hash(examples)
        k, t = self.config.top_k, self.config.temperature
        fingerprint = self._table_fingerprint or self._fingerprint or ""
        path = cache_file(ctx.cache_dir, "lwf", fingerprint, data_hash, f"-top{k}-T{t:g}")
        metadata = {"kind": "lwf-topk", "fingerprint": fingerprint, "data_hash": data_hash,
                    "top_k": str(k), "temperature": repr(t)}
        if not compute_if_missing:
            table = TokenTable.load(path, metadata)
            if table is None:
                raise RuntimeError(
                    f"lwf: the cached teacher outputs {path} disappeared during the run; resume the run "
                    "(they are recomputed from the original model) or start it again."
                )
            return table

        def compute() -> TokenTable:
            def per_token(logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
                log_q, indices, log_rest = topk_teacher(logits, k, t)
                return {"log_q": log_q, "indices": indices.to(torch.int32), "log_rest": log_rest}

            return compute_table(ctx.unwrapped_model, examples, ctx.collate, per_token,
                                 batch_size=self.config.cache_batch_size, device=ctx.device, adapters_off=adapters_off,
                                 accelerator=ctx.accelerator)

        table, hit = cached_table(path, metadata, compute, ctx.accelerator)
        logger.info("lwf: teacher top-%d for %s %s (%s)", k, name, "reused" if hit else "cached", path)
        return table

    def _use_table(self, ctx: StrategyContext, name: str, examples: list) -> TokenTable:
        if self._table_name != name:
            self._table = self._topk_table(ctx, name, examples, compute_if_missing=False)
            self._table_keys = {example_key(e.input_ids): i for i, e in enumerate(examples)}
            self._table_name = name
        assert self._table is not None
        return self._table

    def _teacher_logits(self, ctx: StrategyContext, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._task_weights is not None:  # the model at this task's start, evaluated functionally
            model = ctx.unwrapped_model
            with reference_forward(model):
                logits = functional_call(
                    model, self._task_weights, args=(),
                    kwargs={"input_ids": input_ids, "attention_mask": attention_mask}, strict=False,
                ).logits
            return align_to_inputs(logits, input_ids.shape[1])
        module = ctx.unwrapped_model if self._source == "adapters_off" else self._teacher_copy
        assert module is not None
        with reference_forward(module, adapters_off=is_peft_model(module)):
            logits = module(input_ids=input_ids, attention_mask=attention_mask).logits
        return align_to_inputs(logits, input_ids.shape[1])

    @property
    def _follows_tasks(self) -> bool:
        return self.config.teacher_at == "task_start"

    def _take_task_weights(self, ctx: StrategyContext, task_index: int) -> None:
        """The trainable weights as the task starts (after every strategy's before_task: merges, new adapters)."""
        self._task_weights = {n: p.detach().clone() for n, p in trainable_parameters(ctx.unwrapped_model).items()}
        self._task_weights_index = task_index
        self._teacher_copy = None  # the snapshot replaces the base copy from here on

    def _refresh_table(self, ctx: StrategyContext, task: TaskInfo) -> None:
        """cached_topk + task_start: the teacher tables recomputed from the model at this task's start."""
        self._table_fingerprint = model_fingerprint(ctx.unwrapped_model)
        self._table_name = None
        sets = self._anchor_sets(ctx)
        wanted = {"pool": sets["pool"]} if "pool" in sets else {f"task{task.index}": task.train_examples}
        for name, examples in wanted.items():
            self._topk_table(ctx, name, examples, compute_if_missing=True, adapters_off=False)

    # ------------------------------------------------------------------ hooks

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self._source is None:
            self._prepare(ctx)
        if self._teacher_copy is not None:
            self._teacher_copy.to(ctx.device)
        if self._follows_tasks and task.index > 0:
            self._task_weights = None  # taken at the task's first micro-batch
            if self._source == "cached_topk":
                self._refresh_table(ctx, task)

    def _picks_at(self, ctx: StrategyContext, cursor: int) -> list[int]:
        return sample_indices(len(self._pool), ctx.seed_for(self), cursor, self.config.anchor_batch_size)

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        """Before each forward: the task-start teacher (first micro-batch of a later task) and this
        micro-batch's general anchors (the cursor moves here, not in the loss)."""
        task = ctx.task
        if (
            self._follows_tasks and task is not None and task.index > 0 and self._source != "cached_topk"
            and self._task_weights_index != task.index
        ):
            self._take_task_weights(ctx, task.index)
        if self.config.anchor == "general" and self.config.alpha != 0.0:
            self._picks[ctx.micro_batch] = self._picks_at(ctx, self._cursor)
            self._cursor += self.config.anchor_batch_size
        return batch

    def extra_losses(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        if self.config.alpha == 0.0:
            return {}
        if self.config.anchor == "task":
            anchors, pool_indices = batch, None
            student = align_to_inputs(outputs.logits, batch["input_ids"].shape[1])
        else:
            pool_indices = self._picks.get(ctx.micro_batch) or self._picks_at(ctx, self._cursor)
            anchors = {k: v.to(ctx.device) for k, v in ctx.collate([self._pool[i] for i in pool_indices]).items()}
            logits = ctx.model(input_ids=anchors["input_ids"], attention_mask=anchors["attention_mask"]).logits
            student = align_to_inputs(logits, anchors["input_ids"].shape[1])
        mask = anchors["attention_mask"]
        t = self.config.temperature
        if self._source == "cached_topk":
            cached = {k: v.to(student.device) for k, v in self._cached_teacher(ctx, anchors, pool_indices).items()}
            kl = kl_with_temperature_topk(
                student, cached["log_q"], cached["indices"], cached["log_rest"], mask * cached["known"], t
            )
        else:
            teacher = self._teacher_logits(ctx, anchors["input_ids"], anchors["attention_mask"])
            kl = kl_with_temperature(student, teacher, mask, t)
        if pool_indices is None:  # task anchors: this micro-batch's share of the step's token mean
            kl = kl * ctx.token_weight(mask)
        return {"kl": self.config.alpha * kl}

    def _cached_teacher(
        self, ctx: StrategyContext, anchors: Batch, pool_indices: list[int] | None
    ) -> dict[str, torch.Tensor]:
        rows = batch_rows(anchors["input_ids"], anchors["attention_mask"])
        if pool_indices is not None:
            table = self._use_table(ctx, "pool", self._pool)
            indices: list[int | None] = list(pool_indices)
        else:
            task = ctx.task
            assert task is not None
            table = self._use_table(ctx, f"task{task.index}", task.train_examples)
            indices = [self._table_keys.get(key) for key, _ in rows]
        return gather_topk(table, indices, anchors["input_ids"].shape[1], [positions for _, positions in rows])

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cursor": self._cursor, "task_weights_index": self._task_weights_index}
        if self._task_weights is not None:
            state["task_weights"] = self._task_weights
        if self._table_fingerprint is not None:
            state["table_fingerprint"] = self._table_fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self._cursor = int(state.get("cursor", 0))
        self._picks = {}
        self._prepare(ctx)  # the checkpoint's weights are not loaded yet: this is the original model
        self._task_weights_index = int(state.get("task_weights_index", -1))
        self._task_weights = None
        if "task_weights" in state:
            self._task_weights = {n: t.to(ctx.device) for n, t in state["task_weights"].items()}
            self._teacher_copy = None
        self._table_fingerprint = state.get("table_fingerprint")
        self._table_name = None
