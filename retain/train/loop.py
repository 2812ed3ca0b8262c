"""The one training loop: a task's optimizer steps, with the strategy hooks where they belong.

Everything a step needs is explicit here, in order: which samples, the transform hooks, forward,
named extra losses, backward, the finiteness check, gradient hooks, clipping, the optimizer, the
post-step hooks, logging and checkpoints. Orchestration across tasks (resume, evaluation, outputs)
lives in ``run.py``.

The loop waits for the device once per optimizer step: the loss, each named term and the token count
are summed on the device, detached, and read back together (one ``tolist()``) after backward; that
one read feeds both the divergence check and the log. A ``.item()`` per micro-batch would stall a GPU
several times per step.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from retain.data.sampling import sample_indices
from retain.errors import ConfigError, DivergenceError
from retain.io import append_jsonl
from retain.strategies.base import StrategyContext, TaskInfo
from retain.strategies.compose import Hybrid

NonFiniteLossError = DivergenceError  # the name earlier releases exported


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

    def read(self) -> StepValues:
        """The step's one host sync: every value in a single device-to-host copy."""
        assert self.loss is not None and self.task_loss is not None and self.tokens is not None
        loss, task_loss, *terms, tokens = torch.stack([self.loss, self.task_loss, *self.terms.values(), self.tokens]).tolist()
        return StepValues(loss, task_loss, dict(zip(self.terms, terms)), int(tokens))


def check_finite(values: StepValues, task: TaskInfo, step: int) -> None:
    """Stop the run before a non-finite loss can reach the weights; the last checkpoint stays good."""
    if math.isfinite(values.loss):
        return
    raise DivergenceError(
        f"loss became {values.loss} at task '{task.name}' step {step} "
        f"(task loss {values.task_loss}, terms {values.terms}). "
        "Lower train.lr, keep train.max_grad_norm set, or check the data; the last good "
        "checkpoint is kept and `--resume` restarts from it."
    )


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
            "loss": self.loss / self.steps,
            "lr": lr,
            "tokens_per_second": self.tokens * world / elapsed,
            **{f"loss/{k}": v / self.term_steps[k] for k, v in self.terms.items()},
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
        values = sums.read()  # the step's one host sync
        check_finite(values, task, step)
        hybrid.after_backward(model, ctx)
        if train.max_grad_norm is not None:
            accelerator.clip_grad_norm_(trainable, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        hybrid.after_step(model, ctx)
        ctx.global_step += 1

        stats.steps += 1
        stats.seconds += time.perf_counter() - step_start
        stats.last_loss = values.loss
        stats.loss_terms = values.terms
        window.add(values)
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


