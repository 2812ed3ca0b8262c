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

What a step optimizes (one process or several, with or without gradient accumulation)::

    L = (sum of token losses over every label token of the step) / (label tokens of the step)
        + sum_k mean over the step's micro-batches (and processes) of term_k

The task loss is the mean over all label tokens of the optimizer step: every micro-batch of every
process, counted after the strategies' transforms (STM's masks, replayed rows), as the Trainer's
``num_items_in_batch`` does. So ``k`` processes with ``batch_size: b`` give the gradient of one process
with ``k * b``, and ``grad_accum: a`` with ``b`` that of ``a * b``, whatever the examples' lengths.

How: every process builds the step's *global* micro-batches (``batch_size * world`` rows each, the
rows one process with a ``world`` times larger batch would read) and runs every strategy's
``transform_batch`` on them, in micro-batch order and before the step's first forward
(``ctx.micro_batch`` names the micro-batch being built or scored). Transforms are host-side and cheap,
so doing them on every process costs little and makes replay's mixing, STM's masks and every cursor
identical to one process's. Each process then runs its own block of rows forward and backward. DDP
averages gradients over processes, so a process backpropagates ``its token-loss sum * world / the
step's label tokens`` plus each term divided by the micro-batches per step. A term that is itself a
mean over the tokens of its micro-batch becomes its share of the step's token mean with
``ctx.token_weight(mask)`` (lwf's task anchors do this).

With several processes the step's sums (loss, terms, tokens, a Ctrl-C flag) are added across
processes in one all-reduce just before the step's one host read, so every process logs the same
values and takes the same skip/stop decision on a non-finite step.

Sharded (``train.parallel: fsdp``, FSDP2): the same arithmetic. FSDP2's reduce-scatter averages as
DDP does; accumulation holds gathered gradients until the last micro-batch
(``set_requires_gradient_sync``); the gradient norm and clipping add squared local norms over
processes (``retain.train.sharding``); a penalty on a process's rows of a weight reaches its rows once.
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

from retain.data.sampling import Stream, derive_seed, sample_indices
from retain.data.tokenize import count_scored_tokens as label_tokens  # the loop's name for it
from retain.errors import ConfigError, DivergenceError
from retain.io import append_jsonl
from retain.strategies.base import StrategyContext, TaskInfo
from retain.strategies.compose import Hybrid
from retain.models.sharding import is_sharded, sharded_parameters
from retain.train.optim import MoFO
from retain.train.sharding import clip_sharded_grads_, sharded_grad_norm

NonFiniteLossError = DivergenceError  # the name earlier releases exported

log = logging.getLogger("retain")

_HYPERPARAMETERS = ("lr", "initial_lr", "weight_decay", "betas")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, config: Any, settings: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """AdamW or MoFO over the trainable weights, as ``config`` (the run's ``train``) asks, with the
    strategies' ``optimizer_settings`` (``settings``, ``train`` keys) over it."""
    if settings:
        config = config.model_copy(update=settings)
    parameters = list(sharded_parameters(model).values())  # a sharded model's DTensors, else its trainable weights
    if not parameters:
        raise ConfigError("no parameter is trainable: check the strategies (e.g. freeze.trainable matches nothing)")
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "mofo":  # filters matrices; biases and norms (1-d) take the full update, as the authors'
        groups[0]["fraction"], groups[1]["fraction"] = config.mofo_fraction, 1.0
        return MoFO([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas))
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas))


def follow_optimizer_settings(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> None:
    """Give MoFO's matrix groups the fraction the strategies set now (a budget may have moved it since the
    last step); the groups of biases and norms keep their full step. Nothing to do without such a setting."""
    fraction = settings.get("mofo_fraction")
    if fraction is None:
        return
    for group in optimizer.param_groups:
        if "fraction" in group and all(p.ndim >= 2 for p in group["params"]):
            group["fraction"] = float(fraction)


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
    """One optimizer step's values on the host, for every process together: the task loss is the mean
    over the step's label tokens, each term its mean over micro-batches and processes."""

    loss: float
    task_loss: float
    terms: dict[str, float]
    tokens: int
    grad_norm: float | None = None  # total gradient norm before clipping; None when not checked
    stop: bool = False  # some process was asked to stop (Ctrl-C) during this step

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and (self.grad_norm is None or math.isfinite(self.grad_norm))


class StepSums:
    """Detached on-device sums of one step's token-loss sum, named terms and tokens; no host sync.

    ``parts`` is the number of (micro-batch, process) pairs a term is averaged over; ``labels`` the
    step's label-token count over every process (a device tensor).
    """

    def __init__(self, labels: torch.Tensor, parts: int) -> None:
        self.labels = labels
        self.parts = parts
        self.task_sum: torch.Tensor | None = None
        self.terms: dict[str, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None

    def add(self, task_sum: torch.Tensor, terms: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> None:
        """Add one micro-batch: its sum of token losses, its terms (each a mean) and its tokens."""
        task_sum = task_sum.detach().float().reshape(())
        self.task_sum = task_sum if self.task_sum is None else self.task_sum + task_sum
        for key, term in terms.items():
            value = term.detach().to(task_sum.device, torch.float32).reshape(())
            self.terms[key] = value + self.terms[key] if key in self.terms else value
        tokens = attention_mask.sum().to(task_sum.device, torch.float32)  # exact below 2**24 tokens per step
        self.tokens = tokens if self.tokens is None else self.tokens + tokens

    def read(self, grad_norm: torch.Tensor | None = None, accelerator: Any = None, stop: bool = False) -> StepValues:
        """The step's one host sync: every value (and the gradient norm) in a single device-to-host copy.

        With several processes the sums (and the stop flag) are first added across processes in one
        all-reduce; the gradient norm is not, since the gradients were already averaged.
        """
        assert self.task_sum is not None and self.tokens is not None
        device = self.task_sum.device
        local = torch.stack([self.task_sum, *self.terms.values(), self.tokens, torch.tensor(float(stop), device=device)])
        if accelerator is not None and accelerator.num_processes > 1:
            local = accelerator.reduce(local, reduction="sum")
        extra = [grad_norm.to(device, torch.float32).reshape(())] if grad_norm is not None else []
        task_sum, *rest = torch.cat([local, self.labels.to(device, torch.float32).reshape(1), *[e.reshape(1) for e in extra]]).tolist()
        norm = rest.pop() if extra else None
        *terms, tokens, stop_flag, labels = rest
        task_loss = task_sum / max(labels, 1.0)
        means = {key: value / self.parts for key, value in zip(self.terms, terms)}
        loss = task_loss + sum(means.values())
        return StepValues(loss, task_loss, means, int(tokens), norm, stop_flag > 0)


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

    def row(self, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            **({"loss": self.loss / self.steps} if self.steps else {}),  # a window of skipped steps only has none
            "lr": lr,
            "tokens_per_second": self.tokens / elapsed,  # every process's tokens
            **{f"loss/{k}": v / self.term_steps[k] for k, v in self.terms.items()},
            **({"skipped_steps": float(self.skipped)} if self.skipped else {}),
        }


# ---------------------------------------------------------------------------------------------
# The loop


def step_batches(ctx: StrategyContext, hybrid: Hybrid, task: TaskInfo, step: int) -> list[dict[str, torch.Tensor]]:
    """The step's micro-batches for every process together, built and transformed in order, on the host.

    Micro-batch ``m`` of step ``s`` holds the ``batch_size * world`` samples from position
    ``(s * grad_accum + m) * batch_size * world``: exactly what one process with a ``world`` times
    larger batch reads. Every process builds and transforms the same global micro-batches (the
    transforms are host-side and cheap), so replay's mixing, STM's masks and every strategy's cursor
    are those of one process, and then runs its own rows (:func:`rows_of`).
    """
    train = ctx.config.train
    size = train.batch_size * ctx.accelerator.num_processes
    examples = task.train_examples
    data_seed = derive_seed(train.seed, Stream.DATA_ORDER, task.index)
    batches = []
    for micro in range(train.grad_accum):
        ctx.micro_batch = micro
        first = (step * train.grad_accum + micro) * size
        batch = ctx.collate([examples[i] for i in sample_indices(len(examples), data_seed, first, size)])
        batches.append(hybrid.transform_batch(batch, ctx))
    return batches


def rows_of(batch: dict[str, torch.Tensor], world: int, rank: int) -> dict[str, torch.Tensor]:
    """Process ``rank``'s share of a global micro-batch: a contiguous block of rows (as even as the row
    count allows; replay's ``append`` adds rows), without the padding columns none of them needs."""
    if world == 1:
        return batch
    rows = torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), world)[rank]
    mine = {k: v[rows] for k, v in batch.items()}
    used = mine["attention_mask"].any(dim=0)
    keep = used.flip(0).cumsum(0).flip(0) > 0  # every column up to the last one a row of this process uses
    return {k: v[:, keep] for k, v in mine.items()}


def token_counts(batches: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(label tokens, attention tokens) of the whole step, every process's rows included, on the device.

    Every process holds the global micro-batches, so no communication is needed.
    """
    labels = torch.stack([label_tokens(b["labels"]) for b in batches]).sum()
    attended = torch.stack([b["attention_mask"].sum() for b in batches]).sum()
    return labels.to(device, torch.float32), attended.to(device, torch.float32)


def train_task(
    *,
    model: nn.Module,
    hybrid: Hybrid,
    ctx: StrategyContext,
    task: TaskInfo,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    start_step: int,
    on_step_end: Callable[[int], bool],
    progress: Any | None = None,
    stop: Any = None,
) -> TaskStats:
    """Run optimizer steps ``start_step .. task.steps`` of one task.

    ``on_step_end(step_in_task)`` is called after each completed step (checkpoints, step evaluation);
    when it returns True the task ends there (a run participant decided to stop).
    ``stop`` (a :class:`~retain.train.interrupt.StopRequest`) is agreed on across processes: when any
    process's flag is set during a step, every process's flag is set after it, so all stop together.
    """
    accelerator = ctx.accelerator
    train = ctx.config.train
    world, rank = accelerator.num_processes, accelerator.process_index
    parts = train.grad_accum * world  # (micro-batch, process) pairs a term is averaged over
    sharded = is_sharded(model)  # FSDP2 (train.parallel: fsdp): DTensor weights and gradients
    trainable = list(sharded_parameters(model).values())  # fixed for the task once before_task ran
    stats = TaskStats(trainable_params=sum(p.numel() for g in optimizer.param_groups for p in g["params"]))
    model.train()
    window = LogWindow()
    check_grads = getattr(accelerator, "scaler", None) is None  # fp16's grad scaler skips inf steps itself
    streak = 0

    for step in range(start_step, task.steps):
        step_start = time.perf_counter()
        ctx.step_in_task = step
        batches = step_batches(ctx, hybrid, task, step)  # every transform before the first forward
        labels, attended = token_counts(batches, accelerator.device)
        ctx.step_tokens, ctx.step_parts = attended, parts
        task_scale = world / labels.clamp_min(1.0)  # DDP averages over processes: undo it for the token sum
        sums = StepSums(labels, parts)
        for micro, batch in enumerate(batches):
            ctx.micro_batch = micro
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in rows_of(batch, world, rank).items()}
            count = label_tokens(batch["labels"])
            sync = micro == train.grad_accum - 1
            if sharded:  # FSDP2 keeps gathered gradients until the step's last micro-batch, then reduce-scatters
                model.set_requires_gradient_sync(sync)
            with accelerator.no_sync(model) if not sync and world > 1 and not sharded else contextlib.nullcontext():
                with accelerator.autocast():
                    outputs = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
                    )
                    terms = hybrid.extra_losses(outputs, batch, ctx)
                    # the micro-batch's sum of token losses; 0 (and zero gradients) when it has no label token
                    task_sum = torch.where(count > 0, outputs.loss.float() * count, torch.zeros((), device=count.device))
                    loss = task_sum * task_scale
                    if terms:
                        loss = loss + sum(terms.values()) / train.grad_accum
                accelerator.backward(loss)
            sums.add(task_sum, terms, batch["attention_mask"])
            del batch, outputs, terms, loss, task_sum  # free the logits now, not when the next forward has made its own
        del batches
        ctx.step_tokens = None
        requested = bool(stop is not None and stop.requested)
        norm = (sharded_grad_norm(trainable) if sharded else total_grad_norm(trainable)) if check_grads else None
        values = sums.read(norm, accelerator, requested)  # the one host sync
        if values.stop and stop is not None:
            stop.requested = True  # every process stops after this same step
        streak = check_finite(values, task, step + 1, streak, train.max_nonfinite_steps)
        if streak:  # skipped: nothing of this step reaches the weights, the optimizer or the strategies
            optimizer.zero_grad(set_to_none=True)
            stats.skipped_steps += 1
            window.skipped += 1
        else:
            hybrid.after_backward(model, ctx)
            if train.max_grad_norm is not None and sharded:
                clip_sharded_grads_(trainable, train.max_grad_norm)
            elif train.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, train.max_grad_norm)
            follow_optimizer_settings(optimizer, hybrid.optimizer_settings())
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
            metrics = {**window.row(scheduler.get_last_lr()[0]), **ctx.metrics}
            ctx.metrics.clear()  # a strategy's value belongs to the window it was reported in
            accelerator.log({f"{task.name}/{k}": v for k, v in metrics.items()}, step=ctx.global_step)
            if accelerator.is_main_process:
                row = {"task": task.name, "step": step + 1, "global_step": ctx.global_step, **metrics}
                append_jsonl(ctx.run_dir / "train_log.jsonl", row)  # every term, lr, tokens/s, strategy metrics
            if progress is not None:
                progress.update(step + 1, metrics)
            stats.tokens += window.tokens
            window = LogWindow()
        if on_step_end(step + 1):
            break
    return stats


