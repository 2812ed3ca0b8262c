"""The one training loop: a task's optimizer steps, with the strategy hooks where they belong.

Everything a step needs is explicit here, in order: which samples, the transform hooks, forward,
named extra losses, backward, gradient hooks, clipping, the optimizer, the post-step hooks, logging
and checkpoints. Orchestration across tasks (resume, evaluation, outputs) lives in ``run.py``.
"""

from __future__ import annotations

import json
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

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps else None


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
    stats = TaskStats(trainable_params=sum(p.numel() for g in optimizer.param_groups for p in g["params"]))
    model.train()
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()

    for step in range(start_step, task.steps):
        step_start = time.perf_counter()
        ctx.step_in_task = step
        step_terms: dict[str, float] = {}
        step_loss = 0.0
        for micro in range(train.grad_accum):
            first = step * per_step + (micro * world + rank) * train.batch_size
            batch = ctx.collate([examples[i] for i in sample_indices(len(examples), data_seed, first, train.batch_size)])
            batch = hybrid.transform_batch(batch, ctx)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            sync = micro == train.grad_accum - 1
            with accelerator.no_sync(model) if not sync and world > 1 else _null():
                with accelerator.autocast():
                    outputs = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
                    )
                    terms = hybrid.extra_losses(outputs, batch, ctx)
                    loss = outputs.loss + sum(terms.values()) if terms else outputs.loss
                value = loss.item()
                if not math.isfinite(value):
                    raise DivergenceError(
                        f"loss became {value} at task '{task.name}' step {step} "
                        f"(task loss {outputs.loss.item()}, terms {({k: v.item() for k, v in terms.items()})}). "
                        "Lower train.lr, keep train.max_grad_norm set, or check the data; the last good "
                        "checkpoint is kept and `--resume` restarts from it."
                    )
                accelerator.backward(loss / train.grad_accum)
            step_loss += value / train.grad_accum
            for key, term in terms.items():
                step_terms[key] = step_terms.get(key, 0.0) + term.item() / train.grad_accum
            window_tokens += int(batch["attention_mask"].sum())
        hybrid.after_backward(model, ctx)
        if train.max_grad_norm is not None:
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        hybrid.after_step(model, ctx)
        ctx.global_step += 1

        stats.steps += 1
        stats.seconds += time.perf_counter() - step_start
        stats.last_loss = step_loss
        stats.loss_terms = step_terms
        window_loss += step_loss
        window_steps += 1
        if (step + 1) % train.log_every == 0 or step + 1 == task.steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics = {
                "loss": window_loss / window_steps,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_second": window_tokens * world / elapsed,
                **{f"loss/{k}": v for k, v in step_terms.items()},
                **ctx.metrics,
            }
            accelerator.log({f"{task.name}/{k}": v for k, v in metrics.items()}, step=ctx.global_step)
            if accelerator.is_main_process:
                _append_log(ctx.run_dir / "train_log.jsonl", {"task": task.name, "step": step + 1, "global_step": ctx.global_step, **metrics})
            if progress is not None:
                progress.update(step + 1, metrics)
            stats.tokens += window_tokens
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        on_step_end(step + 1)
    return stats


def _append_log(path: Any, row: dict[str, Any]) -> None:
    """One JSON line per logging step: every named loss term, lr, tokens/s, strategy metrics."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
