"""Learning without Forgetting for LLMs (Li & Hoiem 2016): distil the original model into the one
being fine-tuned, on anchor inputs, so the fine-tune keeps the original's next-token distributions.

    L = L_task + alpha * T^2 * KL(p_teacher^T || p_student^T)   (mean over anchor tokens)

Anchors (``anchor``): ``task``, the current batch itself (the original LwF: new-task inputs; the
student's logits come free from the task forward, so only the teacher runs), or ``general``, batches
from a text pool (the strategy's ``data`` or the run's ``general_data``), which costs one more
student forward and backward per step but pulls toward the original where it matters for retention.
``auto`` (default) is ``general`` when the run has general text and ``task`` otherwise: on
stories-contracts ``general`` keeps more and learns more at once (guide evidence: 0.937 retention /
0.549 new-task against 0.776 / 0.505 for ``task`` at alpha 1, one seed).

``replay``: Dark Experience Replay (Buzzega et al., NeurIPS 2020), on the rows ``replay`` mixes into
each batch (marked by :data:`~retain.data.replay_buffer.REPLAYED`). DER keeps a reservoir buffer of
(input, logits) pairs and adds ``alpha * E_(x,z)~M ||z - h(x)||^2`` to the stream's cross-entropy; DER++
adds ``beta * CE`` on buffer rows as well. Here the replayed rows already carry their labels in the task
loss (DER++'s beta term, weighted as the token mean weighs them), and the distilled term is

    alpha * T^2 * sum over replayed tokens of KL(p_teacher^T || p_student^T) / (replayed tokens of the step)

i.e. the mean over every replayed token of the optimizer step (every micro-batch and process), as
DER's term is a mean over its buffer batch. Two differences from DER, both stated: the teacher's logits
are this strategy's teacher (the model at the task's start, or the base) evaluated when the row is
replayed, not the logits stored when the row entered the buffer. For a general pool (filled before the
first task) that is the same model; for an earlier task's rows DER keeps what the model said while it
trained on them, here it is the model at the current task's start (``teacher_at: base``: the base). And the
match is LwF's tempered KL instead of an MSE on logits (the MSE is KL's limit at high temperature,
Hinton et al. 2015; on a 32k-token vocabulary the KL keeps the scale of the task loss). The student's
logits come from the task forward, so the only extra work is one teacher forward over the replayed rows
(finding them costs one device-to-host read of a bool per row, per micro-batch). ``replay`` must be listed, before ``lwf`` (lwf counts
the step's replayed tokens as each micro-batch is built); ``cached_topk`` is refused (replayed rows are cut
to the batch's width, so a table cannot be keyed by them).

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

Each teacher is a small object (:mod:`retain.strategies._shared.teachers`); the strategy holds one and
replaces it at a task's start, so which model teaches is always a single object, never a fallback chain.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from retain.config import DataConfig, RunConfig
from retain.data.replay_buffer import REPLAYED
from retain.data.sampling import Stream, sample_indices, subset_indices
from retain.errors import ConfigError
from retain.models.adapters import is_peft_model
from retain.models.sharding import once
from retain.models.fingerprint import base_fingerprint, model_fingerprint
from retain.models.runtime import align_to_inputs
from retain.strategies._shared.teachers import (
    ANCHOR_INDEX,
    AdaptersOff,
    AnchorSet,
    CachedTopK,
    FrozenCopy,
    Snapshot,
    Teacher,
    distill_kl,
    gather_topk,
    live_model,
)
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

__all__ = ["LearningWithoutForgetting", "LwfConfig", "gather_topk"]


class LwfConfig(StrategyConfig):
    alpha: float = Field(1.0, ge=0.0, description="Weight of the distillation term.")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature T of teacher and student.")
    anchor: Literal["auto", "task", "general", "replay"] = Field(
        "auto", description="Distil on the task's own batches, on batches of a general text pool, or on the rows "
        "replay mixes in (DER; list replay before lwf); auto: general when the run has general text "
        "(general_data or data), else task."
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
        if self.anchor in ("task", "replay") and (self.data is not None or self.pool_size is not None):
            raise ValueError("'data' and 'pool_size' choose general anchors: set anchor: general to use them")
        if self.anchor == "replay" and self.teacher == "cached_topk":
            raise ValueError("anchor: replay needs a live teacher (replayed rows are cut to each batch's width, so a "
                             "cached table cannot find them): set teacher: auto, copy or adapters_off")
        return self


@register_strategy("lwf")
class LearningWithoutForgetting(Strategy):
    Config = LwfConfig
    strength = Strength("alpha", 1e-2, 1e2)
    preserves_function = True
    # sharded: a copy teacher is a sharded frozen copy, cached tables run every batch on every process,
    # the general pool is built once (adapters_off needs lora, which is refused sharded)
    supports_sharding = True

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
        """General anchors add a student forward+backward; every teacher but cached top-k a forward (with
        replay anchors over the replayed rows only: at most a third of a step, about ``ratio / 3``)."""
        assert isinstance(config, LwfConfig)
        teacher = 0.0 if cls.teacher_source(config, adapters=adapters) == "cached_topk" else 1 / 3
        return (0.0 if config.anchor in ("task", "replay") else 1.0) + teacher  # auto: general (the guide's runs have general text)

    def __init__(self, config: LwfConfig | None = None) -> None:
        super().__init__(config)
        self._source: str | None = None  # the resolved ``teacher`` (auto decided); None until prepared
        self._teacher: Teacher | None = None  # the model that teaches the current task
        self._pool: list = []
        self._cursor = 0  # anchor examples drawn so far (general anchors): the only state that evolves
        self._picks: dict[int, list[int]] = {}  # pool rows anchoring each micro-batch of the step (anchor=general)
        self._replayed: dict[int, int] = {}  # replayed tokens of each micro-batch of the step, every process (anchor=replay)

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        problems = []
        if self.config.anchor == "replay":
            names = [spec.name for spec in run.strategies]
            if "replay" not in names:
                problems.append(f"anchor: replay distils on the rows replay mixes in: list replay before lwf "
                                f"(e.g. strategies: [full, replay, lwf]), or set {where}.anchor: general or task")
            elif self.name in names and names.index("replay") > names.index(self.name):
                problems.append("anchor: replay reads the rows replay marks as each batch is built: list replay "
                                "before lwf in strategies")
        if self.config.anchor == "general" and not has_general_text(self.config.data, run):
            problems.append(f"anchor: general needs text: set general_data or {where}.data")
        if self.config.anchor == "auto" and self.config.pool_size is not None and not has_general_text(self.config.data, run):
            problems.append(f"pool_size chooses general anchors, and the run has no general text: set general_data or "
                            f"{where}.data, or drop {where}.pool_size")
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
        if self.config.anchor == "auto":  # general or task, once, from what the run has
            anchor = "general" if has_general_text(self.config.data, ctx.config) else "task"
            self.config = self.config.model_copy(update={"anchor": anchor})
        source = self.teacher_source(self.config, adapters=is_peft_model(model))
        if source == "adapters_off" and not is_peft_model(model):
            raise ConfigError(
                "lwf.teacher=adapters_off needs a PEFT-wrapped model (add 'lora' or 'prompt-tuning' to the "
                "strategies), or use teacher: copy / cached_topk."
            )
        if self.config.anchor == "general":
            self._pool = once(ctx.accelerator, lambda: self._general_pool(ctx))
        if source == "copy":
            self._teacher = FrozenCopy(model)
        elif source == "adapters_off":
            self._teacher = AdaptersOff(live_model(ctx))
        else:
            tasks = ctx.tasks if self.config.anchor == "task" else [None]  # every task's examples, or the pool
            self._teacher = self._cached(ctx, base_fingerprint(model), base=True).compute(
                dict(self._anchor_set(t) for t in tasks)
            )
        self._source = source

    def _general_pool(self, ctx: StrategyContext) -> list:
        """The general anchor examples (a seeded subset of ``pool_size``): built on the main process and
        given to the others (``once``), so the processes neither repeat the tokenization nor differ."""
        examples = ctx.general_examples(self.config.data, "lwf")
        pool = [examples[i] for i in subset_indices(len(examples), self.config.pool_size, ctx.seed_for(self, Stream.LWF_POOL))]
        if not pool:
            raise ConfigError("lwf: the general anchor data has no examples")
        return pool

    def _anchor_set(self, task: TaskInfo | None) -> AnchorSet:
        """The examples anchoring ``task`` (the pool with general anchors), named for the top-k cache."""
        if self.config.anchor == "general":
            return "pool", self._pool
        assert task is not None
        return f"task{task.index}", task.train_examples

    def _cached(self, ctx: StrategyContext, fingerprint: str, base: bool) -> CachedTopK:
        return CachedTopK(
            ctx, lambda: self._anchor_set(ctx.task), top_k=self.config.top_k, temperature=self.config.temperature,
            batch_size=self.config.cache_batch_size, fingerprint=fingerprint, base=base,
        )

    @property
    def _follows_tasks(self) -> bool:
        return self.config.teacher_at == "task_start"

    @property
    def _teacher_copy(self) -> nn.Module | None:
        """The frozen copy while it teaches (also read by tests and bench/function_preservation_overhead.py)."""
        return self._teacher.module if isinstance(self._teacher, FrozenCopy) else None

    def _teacher_logits(
        self, ctx: StrategyContext, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The live teacher's logits on a batch (for tests that probe the teacher directly)."""
        assert self._teacher is not None
        return self._teacher.logits({"input_ids": input_ids, "attention_mask": attention_mask})

    def _needs_snapshot(self, task: TaskInfo | None) -> bool:
        """task_start with a live teacher: a later task's first micro-batch (after every strategy's
        before_task: merges, new adapters) takes the model as it is then, once per task."""
        if not (self._follows_tasks and task is not None and task.index > 0 and self._source != "cached_topk"):
            return False
        return not (isinstance(self._teacher, Snapshot) and self._teacher.task == task.index)

    # ------------------------------------------------------------------ hooks

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self._source is None:
            self._prepare(ctx)
        if self._teacher_copy is not None:
            self._teacher_copy.to(ctx.device)
        if self._follows_tasks and task.index > 0 and self._source == "cached_topk":
            # the tables recomputed from the model at this task's start (adapters on)
            self._teacher = self._cached(ctx, model_fingerprint(ctx.unwrapped_model), base=False).compute(
                dict([self._anchor_set(task)])
            )

    def _picks_at(self, ctx: StrategyContext, cursor: int) -> list[int]:
        return sample_indices(len(self._pool), ctx.seed_for(self, Stream.LWF_ORDER), cursor, self.config.anchor_batch_size)

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        """Before each forward: the task-start teacher (first micro-batch of a later task) and this
        micro-batch's general anchors (the cursor moves here, not in the loss)."""
        if self._needs_snapshot(ctx.task):
            assert ctx.task is not None
            self._teacher = Snapshot.take(live_model(ctx), ctx.task.index)  # the base copy goes with it
        if self.config.anchor == "general" and self.config.alpha != 0.0:
            self._picks[ctx.micro_batch] = self._picks_at(ctx, self._cursor)
            self._cursor += self.config.anchor_batch_size
        if self.config.anchor == "replay":
            if ctx.micro_batch == 0:
                self._replayed = {}
            self._replayed[ctx.micro_batch] = int(batch[REPLAYED].sum()) if REPLAYED in batch else 0  # host tensors
        return batch

    def _replay_kl(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> torch.Tensor:
        """DER's term on this micro-batch: its share of the mean KL over the step's replayed tokens."""
        marks = batch.get(REPLAYED)
        rows = marks.any(dim=1).nonzero().squeeze(1) if marks is not None else None  # the one host read
        if rows is None or rows.numel() == 0:
            return torch.zeros((), device=outputs.logits.device)
        anchors = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]}
        student = align_to_inputs(outputs.logits, batch["input_ids"].shape[1])[rows]
        mask = marks[rows]
        assert self._teacher is not None
        kl = distill_kl(student, self._teacher.logits(anchors), mask, self.config.temperature)
        step_replayed = sum(self._replayed.values())
        if ctx.step_tokens is None or step_replayed == 0:
            return kl  # hooks driven by hand (or a Trainer): the mean over this micro-batch's replayed tokens
        return kl * mask.sum().float() * ctx.step_parts / step_replayed  # the loop averages terms over parts

    def extra_losses(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        if self.config.alpha == 0.0:
            return {}
        if self.config.anchor == "replay":
            return {"kl": self.config.alpha * self._replay_kl(outputs, batch, ctx)}
        if self.config.anchor == "task":
            anchors = batch
            student = align_to_inputs(outputs.logits, batch["input_ids"].shape[1])
        else:
            picks = self._picks.get(ctx.micro_batch) or self._picks_at(ctx, self._cursor)
            anchors = {k: v.to(ctx.device) for k, v in ctx.collate([self._pool[i] for i in picks]).items()}
            logits = ctx.model(input_ids=anchors["input_ids"], attention_mask=anchors["attention_mask"]).logits
            student = align_to_inputs(logits, anchors["input_ids"].shape[1])
            anchors[ANCHOR_INDEX] = torch.tensor(picks)  # a cached teacher finds pool rows by index
        assert self._teacher is not None
        mask = anchors["attention_mask"]
        kl = distill_kl(student, self._teacher.logits(anchors), mask, self.config.temperature)
        if self.config.anchor == "task":  # this micro-batch's share of the step's token mean
            kl = kl * ctx.token_weight(mask)
        return {"kl": self.config.alpha * kl}

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        teacher = self._teacher.state_dict() if self._teacher is not None else {}
        # a snapshot's own task_weights_index (and weights), or a later task's table_fingerprint, over the defaults
        return {"cursor": self._cursor, "task_weights_index": -1, **teacher}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self._cursor = int(state.get("cursor", 0))
        self._picks, self._replayed = {}, {}
        self._prepare(ctx)  # the checkpoint's weights are not loaded yet: this is the original model
        if "task_weights" in state:  # the model at the current task's start
            weights = {n: t.to(ctx.device) for n, t in state["task_weights"].items()}
            self._teacher = Snapshot(live_model(ctx), weights, int(state.get("task_weights_index", -1)))
        if state.get("table_fingerprint") is not None and self._source == "cached_topk":
            self._teacher = self._cached(ctx, state["table_fingerprint"], base=False)  # tables on disk already
