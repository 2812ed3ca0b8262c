"""The one training loop: a task's optimizer steps, with the strategy hooks where they belong.

Everything a step needs is explicit here, in order: which samples, the transform hooks, forward,
named extra losses, backward, the finiteness check, gradient hooks, clipping, the optimizer, the
post-step hooks, logging and checkpoints. Orchestration across tasks (resume, evaluation, outputs)
lives in ``run.py``.

The loop waits for the device once per optimizer step: the loss, each named term, the token count
and the total gradient norm are computed on the device, detached, and read back together (one
``tolist()``) after backward; that one read feeds both the divergence check and the log. A
``.item()`` per micro-batch would stall a GPU several times per step.

Divergence: a step whose loss or gradient norm is not finite is skipped (gradients zeroed, no
optimizer, scheduler or post-step hook), so a non-finite value never reaches the weights; after
``train.max_nonfinite_steps`` such steps in a row the run stops with ``DivergenceError``. Steps are
numbered from 1 in messages, as in checkpoint names (``step-<global step>``, the state after it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from retain.data.sampling import sample_indices
from retain.errors import ConfigError, DivergenceError
from retain.io import append_jsonl
from retain.strategies.base import StrategyContext, TaskInfo
from retain.strategies.compose import Hybrid

NonFiniteLossError = DivergenceError  # the name earlier releases exported

log = logging.getLogger("retain")

_HYPERPARAMETERS = ("lr", "initial_lr", "weight_decay", "betas")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError("no parameter is trainable: check the strategies (e.g. freeze.trainable matches nothing)")
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.scheduler == "constant" else config.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


@contextlib.contextmanager
def keep_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any) -> Iterator[None]:
    """Load optimizer/scheduler state inside the block and keep this config's hyperparameters.

    The restored state brings the moments and the schedule's position; the learning rate, weight
    decay and betas (which ``--resume`` may change) and the schedule's shape come from the config.
    The learning rate is set where the new schedule stands at the restored position.
    """
    fresh = [{k: g[k] for k in _HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
    yield
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@dataclass
class TaskStats:
    """What one task's training cost and ended at; fed to results.json."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    last_loss: float | None = None
    loss_terms: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    peak_memory: int | None = None
    skipped_steps: int = 0  # non-finite loss or gradient: no update

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps else None


# ---------------------------------------------------------------------------------------------
# One step's values: summed on the device, read once


@dataclass
class StepValues:
    """One optimizer step's means over its micro-batches, on the host."""

    loss: float
    task_loss: float
    terms: dict[str, float]
    tokens: int
    grad_norm: float | None = None  # total gradient norm before clipping; None when not checked

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and (self.grad_norm is None or math.isfinite(self.grad_norm))


class StepSums:
    """Detached on-device sums of one step's loss, task loss, named terms and tokens; no host sync."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.task_loss: torch.Tensor | None = None
        self.terms: dict[str, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, task_loss: torch.Tensor, terms: dict[str, torch.Tensor],
            attention_mask: torch.Tensor, scale: float) -> None:
        """Add one micro-batch, each loss scaled by ``scale`` (1 / grad_accum) so the sums are means."""
        loss = loss.detach().float() * scale
        self.loss = loss if self.loss is None else self.loss + loss
        task_loss = task_loss.detach().float() * scale
        self.task_loss = task_loss if self.task_loss is None else self.task_loss + task_loss
        for key, term in terms.items():
            value = term.detach().to(loss.device, torch.float32).reshape(()) * scale
            self.terms[key] = value + self.terms[key] if key in self.terms else value
        tokens = attention_mask.sum().to(loss.device, torch.float32)  # exact below 2**24 tokens per step
        self.tokens = tokens if self.tokens is None else self.tokens + tokens

    def read(self, grad_norm: torch.Tensor | None = None) -> StepValues:
        """The step's one host sync: every value (and the gradient norm) in a single device-to-host copy."""
        assert self.loss is not None and self.task_loss is not None and self.tokens is not None
        extra = [grad_norm.to(self.loss.device, torch.float32).reshape(())] if grad_norm is not None else []
        loss, task_loss, *rest = torch.stack([self.loss, self.task_loss, *self.terms.values(), self.tokens, *extra]).tolist()
        norm = rest.pop() if extra else None
        *terms, tokens = rest
        return StepValues(loss, task_loss, dict(zip(self.terms, terms)), int(tokens), norm)


def total_grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor | None:
    """The L2 norm of every gradient together, on the device (no host sync); inf/nan when any entry is."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def check_finite(values: StepValues, task: TaskInfo, step: int, streak: int, limit: int) -> int:
    """The count of non-finite steps in a row after this one (``step`` counts from 1); at ``limit`` the run
    stops. A non-finite step is skipped by the caller, so the weights and the last checkpoint stay finite."""
    if values.finite:
        return 0
    streak += 1
    what = (
        f"loss {values.loss}, task loss {values.task_loss}, gradient norm {values.grad_norm}, terms {values.terms}"
    )
    if streak >= limit:
        raise DivergenceError(
            f"training diverged at task '{task.name}' step {step} of {task.steps}: {streak} steps in a row had a "
            f"non-finite loss or gradient (last: {what}). They were skipped, so no non-finite value reached the "
            "weights. Lower train.lr, keep train.max_grad_norm set, or check the data, then continue from the last "
            "checkpoint with `--resume` (train.lr and train.max_grad_norm may change on resume), or start again "
            "with `--overwrite` if the checkpointed weights are already damaged."
        )
    log.warning(
        "task '%s' step %d of %d: a non-finite loss or gradient (%s); step skipped (%d of %d in a row stop the run)",
        task.name, step, task.steps, what, streak, limit,
    )
    return streak


# ---------------------------------------------------------------------------------------------
# Log window: host-side sums between two log rows


@dataclass
class LogWindow:
    """The steps since the last log row; a row reports their means."""

    steps: int = 0
    loss: float = 0.0
    tokens: int = 0
    terms: dict[str, float] = field(default_factory=dict)
    term_steps: dict[str, int] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    skipped: int = 0

    def add(self, values: StepValues) -> None:
        self.steps += 1
        self.loss += values.loss
        self.tokens += values.tokens
        for key, value in values.terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + value
            self.term_steps[key] = self.term_steps.get(key, 0) + 1

    def row(self, lr: float, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            **({"loss": self.loss / self.steps} if self.steps else {}),  # a window of skipped steps only has none
            "lr": lr,
            "tokens_per_second": self.tokens * world / elapsed,
            **{f"loss/{k}": v / self.term_steps[k] for k, v in self.terms.items()},
            **({"skipped_steps": float(self.skipped)} if self.skipped else {}),
        }


# ---------------------------------------------------------------------------------------------
# The loop


def train_task(
    *,
    model: nn.Module,
    hybrid: Hybrid,
    ctx: StrategyContext,
    task: TaskInfo,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    start_step: int,
    on_step_end: Callable[[int], None],
    progress: Any | None = None,
) -> TaskStats:
    """Run optimizer steps ``start_step .. task.steps`` of one task.

    ``on_step_end(step_in_task)`` is called after each completed step (checkpoints, step evaluation).
    """
    accelerator = ctx.accelerator
    train = ctx.config.train
    examples = task.train_examples
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = train.batch_size * train.grad_accum * world
    data_seed = train.seed + 7919 * task.index
    trainable = [p for p in model.parameters() if p.requires_grad]  # fixed for the task once before_task ran
    stats = TaskStats(trainable_params=sum(p.numel() for g in optimizer.param_groups for p in g["params"]))
    model.train()
    window = LogWindow()
    check_grads = getattr(accelerator, "scaler", None) is None  # fp16's grad scaler skips inf steps itself
    streak = 0

    for step in range(start_step, task.steps):
        step_start = time.perf_counter()
        ctx.step_in_task = step
        sums = StepSums()
        for micro in range(train.grad_accum):
            first = step * per_step + (micro * world + rank) * train.batch_size
            batch = ctx.collate([examples[i] for i in sample_indices(len(examples), data_seed, first, train.batch_size)])
            batch = hybrid.transform_batch(batch, ctx)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            sync = micro == train.grad_accum - 1
            with accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    outputs = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
                    )
                    terms = hybrid.extra_losses(outputs, batch, ctx)
                    loss = outputs.loss + sum(terms.values()) if terms else outputs.loss
                accelerator.backward(loss / train.grad_accum)
            sums.add(loss, outputs.loss, terms, batch["attention_mask"], 1.0 / train.grad_accum)
            del batch, outputs, terms, loss  # free the logits now, not when the next forward has made its own
        values = sums.read(total_grad_norm(trainable) if check_grads else None)  # the step's one host sync
        streak = check_finite(values, task, step + 1, streak, train.max_nonfinite_steps)
        if streak:  # skipped: nothing of this step reaches the weights, the optimizer or the strategies
            optimizer.zero_grad(set_to_none=True)
            stats.skipped_steps += 1
            window.skipped += 1
        else:
            hybrid.after_backward(model, ctx)
            if train.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            hybrid.after_step(model, ctx)
            stats.last_loss = values.loss
            stats.loss_terms = values.terms
            window.add(values)
        ctx.global_step += 1

        stats.steps += 1
        stats.seconds += time.perf_counter() - step_start
        if (step + 1) % train.log_every == 0 or step + 1 == task.steps:
            metrics = {**window.row(scheduler.get_last_lr()[0], world), **ctx.metrics}
            ctx.metrics.clear()  # a strategy's value belongs to the window it was reported in
            accelerator.log({f"{task.name}/{k}": v for k, v in metrics.items()}, step=ctx.global_step)
            if accelerator.is_main_process:
                row = {"task": task.name, "step": step + 1, "global_step": ctx.global_step, **metrics}
                append_jsonl(ctx.run_dir / "train_log.jsonl", row)  # every term, lr, tokens/s, strategy metrics
            if progress is not None:
                progress.update(step + 1, metrics)
            stats.tokens += window.tokens
            window = LogWindow()
        on_step_end(step + 1)
    return stats


