"""Functionally Invariant Paths (Raghavan & Thomson, Nat. Mach. Intell. 2024, arXiv 2205.00334).

The paper treats weight space as a Riemannian manifold whose metric measures how much the outputs
move, and walks the path that learns the new task while the outputs on old inputs stay put, in
small steps (||d|| <= eps). The authors' code turns this into a loss, implemented here for LLMs:

    L = L_task + weight * D,   D = reduction over the pool batch of BD(p_theta(.|x), p_anchor(.|x))
    BD(p, q) = -log sum_c sqrt(p(c) q(c))            (Bhattacharyya distance, per token)

Reduction (``reduction``): ``sum_sequences`` (default; the authors' scripts): each pool sequence's
distance is the mean BD over its tokens (a sequence is one "example" of the authors' classifiers),
and the sequences' distances are **summed** over the pool batch, beside the task's mean cross-entropy.
``weight: 1``, ``reduction: sum_sequences`` and ``pool_batch: 8`` is the authors' BERT/Yelp setting
(8 old reviews per step; their ViT script sums over 512 images, their MNIST notebook over 50).
``mean_tokens`` averages over every pool token instead (the previous behaviour), ``pool_batch``
times weaker at the same weight.

Default ``weight = 10`` with ``sum_sequences`` and ``pool_batch: 4``: on ``retain bench stories-contracts``
(300 steps, full fine-tuning, general pool) it keeps 68% of full fine-tuning's new-task gain with 11% of
its forgetting; the authors' 1 keeps 93% / 21%, 0.1 keeps 99% / 37% (``bench/strength_sweep.py``).

Anchor (``anchor``): ``task_start`` (the authors' code; ``start`` is accepted for it): the model at
the start of the current task. ``run_start``: the model at the start of the first task, kept for the
whole run (refused with a strategy that merges adapters into the base weights, where a snapshot of
the trainable weights no longer describes that model). ``path`` (the paper's geometry): re-anchor to
the current point every ``reanchor_every`` steps, so each segment of the path is kept functionally
close to the previous point. ``max_step_norm`` bounds the L2 norm of every optimizer update (over all
trainable weights): a longer update is scaled back onto the ball, as in the paper's constrained step.

Pool (``pool``): ``general`` text (the strategy's ``data`` or the run's ``general_data``) or
``past`` tasks' training sequences; on the first task ``past`` falls back to general text if any is
configured, else the term is off for that task. ``pool_size`` sequences are drawn once per task
(seeded), then visited ``pool_batch`` at a time in seeded epoch order.

The anchor is taken, and the pool cursor advanced, in ``transform_batch`` (once per micro-batch, before
the forward, after every strategy's ``before_task``), so ``extra_losses`` only reads state.

Memory: the anchor is a snapshot of the *trainable* weights only, evaluated with
``torch.func.functional_call`` on the training model: with LoRA that is the adapters (a few MB),
with full fine-tuning one copy of the weights, the "frozen copy" of the method. Sharded
(``train.parallel: fsdp``): the anchor is a frozen copy of the model sharded like it (each process
holds its rows of one copy), whose forward every process runs.
Cost: one extra student forward+backward and one anchor forward on the pool batch per micro-batch.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.func import functional_call

from retain.config import DataConfig, RunConfig
from retain.data.sampling import Stream, sample_indices, seeded_generator
from retain.losses.distill import bhattacharyya_distance
from retain.models.runtime import align_to_inputs, reference_forward, trainable_parameters
from retain.models.sharding import (
    copy_weights_,
    is_dtensor,
    is_sharded,
    local,
    once,
    sharded_frozen_copy,
    sharded_parameters,
)
from retain.strategies._shared.calibration import on_device
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


class FipConfig(StrategyConfig):
    weight: float = Field(
        10.0, ge=0.0, description="Weight of the Bhattacharyya term (authors: 1, with sum_sequences; 10: the stories-contracts knee)."
    )
    reduction: Literal["sum_sequences", "mean_tokens"] = Field(
        "sum_sequences", description="Sum over pool sequences of their mean token BD (authors), or mean over tokens."
    )
    pool: Literal["general", "past"] = Field("general", description="Where the anchor sequences come from.")
    data: DataConfig | None = Field(None, description="General pool text; default the run's general_data.")
    pool_size: int = Field(64, gt=0, description="Sequences in the fixed pool, drawn once per task.")
    pool_batch: int = Field(4, gt=0, description="Pool sequences per micro-batch.")
    anchor: Literal["task_start", "run_start", "path"] = Field(
        "task_start", description="Anchor at the task's start (start), at the run's start, or re-anchor along the path."
    )
    reanchor_every: int = Field(10, gt=0, description="Steps between re-anchors (anchor=path).")
    max_step_norm: float | None = Field(None, gt=0.0, description="Bound on each update's L2 norm (null: none).")
    eps_add: float = Field(0.0, ge=0.0, description="Added inside the square root (authors' stabiliser); 0: exact.")
    seed: int | None = Field(None, description="Seed of the pool's choice and order; default: train.seed.")

    @field_validator("anchor", mode="before")
    @classmethod
    def _start_means_task_start(cls, value: Any) -> Any:
        return "task_start" if value == "start" else value


def snapshot(parameters: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in parameters.items()}


def project_update(parameters: dict[str, nn.Parameter], previous: dict[str, torch.Tensor], max_norm: float) -> float:
    """Scale the update theta - previous onto the ball of radius ``max_norm``; returns its norm before.
    Sharded weights: each process its rows, the norm summed over processes (every process calls it)."""
    with torch.no_grad():
        squares = [((local(p) - local(previous[name])).float() ** 2).sum() for name, p in parameters.items()]
        square = torch.stack(squares).sum() if squares else torch.zeros(())
        if any(is_dtensor(p) for p in parameters.values()) and torch.distributed.is_initialized():
            torch.distributed.all_reduce(square)
        norm = float(square.sqrt())
        if norm > max_norm:
            scale = max_norm / norm
            for name, p in parameters.items():
                local(p).copy_(local(previous[name]) + (local(p) - local(previous[name])) * scale)
    return norm


@register_strategy("fip")
class FunctionallyInvariantPaths(Strategy):
    Config = FipConfig
    strength = Strength("weight", 1e-2, 1e3)
    preserves_function = True
    supports_sharding = True  # sharded: the anchor is a sharded frozen copy of the model (no functional_call)

    @classmethod
    def extra_passes(cls, config: StrategyConfig, *, adapters: bool) -> float:
        """A student forward+backward and an anchor forward on the pool batch."""
        return 1.0 + 1 / 3

    @classmethod
    def holds_model_copy(cls, config: StrategyConfig, *, adapters: bool) -> bool:
        """The anchor is a snapshot of the trainable weights: every weight when they all train."""
        return not adapters

    def __init__(self, config: FipConfig | None = None) -> None:
        super().__init__(config)
        self._pool_source: str = "none"
        self._pool_task: int | None = None
        self._pool_indices: list[int] = []
        self._pool: list = []
        self._cursor = 0
        self._anchor: dict[str, torch.Tensor] | None = None
        self._anchor_step = 0  # step_in_task at which the current anchor was taken
        self._reanchors = 0
        self._previous: dict[str, torch.Tensor] | None = None
        self._last_step_norm = 0.0
        self._picks: dict[int, list[int]] = {}  # pool rows of each micro-batch of the step, chosen in transform_batch
        self._anchor_module: nn.Module | None = None  # sharded runs: the anchor as a sharded frozen model

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        merging = [s.name for s in run.strategies if get_strategy_class(s.name).modifies_frozen_weights]
        if self.config.anchor == "run_start" and merging and len(run.tasks) > 1:
            return [
                f"anchor: run_start keeps a snapshot of the trainable weights, and {', '.join(merging)} merges "
                f"them into the base after each task, so the snapshot would no longer be the run's start. "
                f"Set {where}.anchor: task_start"
            ]
        if has_general_text(self.config.data, run):
            return []
        if self.config.pool == "general":
            return [f"pool: general needs text: set general_data or {where}.data; or set {where}.pool: past"]
        if len(run.tasks) < 2:
            return [
                "pool: past anchors on earlier tasks' sequences, and this run has one task and no general text, "
                f"so the term would never apply. Set general_data or {where}.data, or add a task"
            ]
        return []

    # ------------------------------------------------------------------ pool

    def _candidates(self, task: TaskInfo, ctx: StrategyContext) -> tuple[str, list]:
        """(source name, sequences the pool is drawn from) for ``task``."""
        if self.config.pool == "past" and task.index > 0:
            return "past", [e for t in ctx.tasks[: task.index] for e in t.train_examples]
        if self.config.pool == "past" and self.config.data is None and ctx.config.general_data is None:
            logger.warning("fip: first task and no general data: nothing to keep yet, the term is off for '%s'", task.name)
            return "none", []
        return "general", ctx.general_examples(self.config.data, "fip")

    def _use_pool(self, task: TaskInfo, ctx: StrategyContext, indices: list[int] | None) -> None:
        """Fix the task's pool: ``indices`` into its candidates, or a fresh seeded draw when None. Built on
        the main process and given to the others (``once``): they neither tokenize the general text again
        nor can they differ."""

        def build() -> tuple[str, list[int], list]:
            source, candidates = self._candidates(task, ctx)
            chosen = indices
            if chosen is None:
                generator = seeded_generator(ctx.seed_for(self, Stream.FIP_POOL, task.index))
                chosen = sorted(torch.randperm(len(candidates), generator=generator)[: self.config.pool_size].tolist())
            return source, chosen, [candidates[i] for i in chosen]

        source, indices, self._pool = once(ctx.accelerator, build)
        self._pool_source, self._pool_task, self._pool_indices = source, task.index, indices

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        self._use_pool(task, ctx, None)
        self._cursor = 0
        if self.config.anchor != "run_start":
            self._anchor = None  # taken at the first step, after every strategy's before_task has run
        self._reanchors = 0
        self._report(ctx)

    def _report(self, ctx: StrategyContext) -> None:
        """The task's pool, into the next log row (at the task's start and again after a resume)."""
        ctx.log("fip/pool_size", len(self._pool))

    # ------------------------------------------------------------------ anchor

    def _take_anchor(self, model: nn.Module, ctx: StrategyContext) -> None:
        self._anchor = self._snapshot(model)
        self._anchor_step = ctx.step_in_task

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable weights now; sharded, copied into the sharded anchor model (whose weights they are)."""
        if not is_sharded(model):
            return snapshot(trainable_parameters(model))
        if self._anchor_module is None:
            self._anchor_module = sharded_frozen_copy(model)
        else:
            copy_weights_(self._anchor_module, model)
        mine = sharded_parameters(self._anchor_module, trainable_only=False)
        return {name: mine[name].detach() for name in sharded_parameters(model)}

    def _anchor_logits(self, model: nn.Module, batch: Batch, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if is_sharded(model):  # a forward of the anchor model (or of the model itself: the current point)
            reference = self._anchor_module if weights is None and self._anchor_module is not None else model
            with reference_forward(reference):
                logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return align_to_inputs(logits, batch["input_ids"].shape[1])
        weights = weights if weights is not None else self._anchor
        assert weights is not None
        with reference_forward(model):
            logits = functional_call(
                model, weights, args=(),
                kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, strict=False,
            ).logits
        return align_to_inputs(logits, batch["input_ids"].shape[1])

    # ------------------------------------------------------------------ hooks

    @property
    def _active(self) -> bool:
        return bool(self._pool) and self.config.weight != 0.0

    def _picks_at(self, ctx: StrategyContext, cursor: int) -> list[int]:
        return sample_indices(len(self._pool), ctx.seed_for(self, Stream.FIP_ORDER), cursor, self.config.pool_batch)

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        """Before each forward: the anchor (at the task's first step) and this micro-batch's pool rows."""
        if self._active:
            if self._anchor is None:
                self._take_anchor(ctx.unwrapped_model, ctx)
            self._picks[ctx.micro_batch] = self._picks_at(ctx, self._cursor)
            self._cursor += self.config.pool_batch
        return batch

    def extra_losses(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        if not self._active:
            return {}
        model = ctx.unwrapped_model
        picks = self._picks.get(ctx.micro_batch) or self._picks_at(ctx, self._cursor)
        pool_batch = {k: v.to(ctx.device) for k, v in ctx.collate([self._pool[i] for i in picks]).items()}
        student = ctx.model(input_ids=pool_batch["input_ids"], attention_mask=pool_batch["attention_mask"]).logits
        student = align_to_inputs(student, pool_batch["input_ids"].shape[1])
        # hooks driven by hand, without transform_batch: the anchor is the current point (not stored)
        current = {n: p.detach() for n, p in sharded_parameters(model).items()} if self._anchor is None else None
        anchor = self._anchor_logits(model, pool_batch, current)
        distance = bhattacharyya_distance(
            student, anchor, pool_batch["attention_mask"], self.config.eps_add, self.config.reduction
        )
        return {"bhattacharyya": self.config.weight * distance}

    def after_backward(self, model: nn.Module, ctx: StrategyContext) -> None:
        if self.config.max_step_norm is not None:
            self._previous = snapshot(sharded_parameters(ctx.unwrapped_model))

    def after_step(self, model: nn.Module, ctx: StrategyContext) -> None:
        unwrapped = ctx.unwrapped_model
        if self.config.max_step_norm is not None and self._previous is not None:
            self._last_step_norm = project_update(sharded_parameters(unwrapped), self._previous, self.config.max_step_norm)
            self._previous = None
            ctx.log("fip/step_norm_before_bound", self._last_step_norm)  # this step's, in its own row
        steps_done = ctx.step_in_task + 1
        if self.config.anchor == "path" and self._pool:
            if steps_done % self.config.reanchor_every == 0:
                self._anchor = self._snapshot(unwrapped)
                self._anchor_step = steps_done
                self._reanchors += 1
            ctx.log("fip/reanchors", self._reanchors)  # the task's count so far, in every row

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "pool_source": self._pool_source,
            "pool_task": -1 if self._pool_task is None else self._pool_task,
            "pool_indices": list(self._pool_indices),
            "cursor": self._cursor,
            "anchor": self._anchor if self._anchor is not None else {},
            "has_anchor": self._anchor is not None,
            "anchor_step": self._anchor_step,
            "reanchors": self._reanchors,
        }

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self._cursor = int(state.get("cursor", 0))
        self._anchor_step = int(state.get("anchor_step", 0))
        self._reanchors = int(state.get("reanchors", 0))
        self._anchor = None
        if state.get("has_anchor") and is_sharded(ctx.unwrapped_model):  # into a sharded anchor model
            self._anchor = self._snapshot(ctx.unwrapped_model)
            with torch.no_grad():
                for name, tensor in on_device(dict(state["anchor"]), self._anchor).items():
                    local(self._anchor[name]).copy_(local(tensor))
        elif state.get("has_anchor"):
            self._anchor = {name: t.to(ctx.device) for name, t in state["anchor"].items()}
        self._picks = {}
        task_index = int(state.get("pool_task", -1))
        if task_index >= 0:  # resumed mid-task (before_task will not run): the same pool again
            self._use_pool(ctx.tasks[task_index], ctx, [int(i) for i in state.get("pool_indices", [])])
            self._report(ctx)
