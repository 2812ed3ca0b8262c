"""Synaptic-Intelligence importance (Zenke et al. 2017): each weight's contribution to the decrease
of a loss along an optimization path, divided by how far it moved.

    omega_i = -sum_t g_i(t) * delta_theta_i(t)        (path integral, accumulated step by step)
    Omega_i = omega_i / (Delta_i^2 + xi)               (Delta_i: the weight's total change)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from retain.models.runtime import eval_mode, model_device
from retain.models.sharding import is_sharded
from retain.stats.per_example import (
    Collate,
    batches,
    forward_logits,
    has_label_tokens,
    per_example_nll,
    scored_tokens,
    sum_across_processes,
    to_device,
    world_of,
)


def si_path_step_(omega: dict[str, Tensor], grads: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> None:
    """Synaptic-Intelligence path integral, one step: ``omega -= g * delta_theta`` in place.

    With ``g`` the loss gradient and ``delta_theta`` the step the optimizer took, ``-g * delta``
    is each weight's first-order contribution to the decrease of the loss.
    """
    for name, grad in grads.items():
        omega[name].sub_(grad.to(omega[name].dtype) * deltas[name].to(omega[name].dtype))


def si_importance(
    omega: Mapping[str, Tensor], total_change: Mapping[str, Tensor], xi: float = 1e-3, clamp: bool = True
) -> dict[str, Tensor]:
    """``Omega = omega / (Delta^2 + xi)`` (Zenke et al. 2017), ``Delta`` the weights' total change.

    A negative ``omega`` (a weight whose moves, to first order, raised the loss) would reward
    moving it away; ``clamp`` sets those to zero.
    """
    out = {}
    for name, value in omega.items():
        importance = value / (total_change[name].to(value.dtype).pow(2) + xi)
        out[name] = importance.clamp_min(0.0) if clamp else importance
    return out



GeneralOptimizer = Literal["adamw", "sgd"]


def build_path_optimizer(
    tensors: Sequence[Tensor],
    kind: GeneralOptimizer,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """A fresh optimizer for the importance pass: ``adamw`` (what ``retain train`` uses) or plain ``sgd``."""
    if kind == "adamw":
        return torch.optim.AdamW(list(tensors), lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(list(tensors), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{kind}' for the importance pass; choose adamw or sgd")


def record_path(
    params: Mapping[str, Tensor],
    gradients: Iterable[Callable[[], Mapping[str, Tensor]]],
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """Walk an optimizer along a path and integrate Synaptic Intelligence on the way.

    ``gradients`` yields, per step, a function returning the loss gradient at the current weights;
    the optimizer takes its step from it and ``omega -= g * (theta_after - theta_before)`` credits each
    weight with its first-order share of the loss decrease (whatever the optimizer: Adam's steps are
    not ``-lr g``, which is why the actual displacement is used). Returns (omega, total change
    ``Delta``, steps). The weights are left where the path ends; ``.grad`` is restored.
    """
    names = list(params)
    start = {n: params[n].detach().float().clone() for n in names}
    omega = {n: torch.zeros_like(start[n]) for n in names}
    saved = {n: params[n].grad for n in names}
    steps = 0
    try:
        for gradient_at in gradients:
            grads = {n: g.float() for n, g in gradient_at().items()}
            before = {n: params[n].detach().float().clone() for n in names}
            for n in names:
                params[n].grad = grads[n].to(params[n].dtype)
            optimizer.step()
            with torch.no_grad():
                deltas = {n: params[n].detach().float() - before[n] for n in names}
            si_path_step_(omega, grads, deltas)
            steps += 1
    finally:
        for n in names:
            params[n].grad = saved[n]
    change = {n: params[n].detach().float() - start[n] for n in names}
    return omega, change, steps


def path_integral_importance(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    examples: Sequence[Any],
    collate: Collate,
    *,
    lr: float,
    batch_size: int = 8,
    steps: int | None = None,
    xi: float = 1e-3,
    accelerator: Any | None = None,
    optimizer: GeneralOptimizer = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
) -> tuple[dict[str, Tensor], int]:
    """Element-wise SI importance recorded along a real optimization path on general data; the weights
    are restored after.

    ``optimizer`` (default ``adamw``, the training optimizer, at the run's ``lr``) takes ``steps`` steps
    (default: one pass over ``examples``; more cycle over them again) on batches' token-mean NLL,
    the training loss. Then ``Omega = omega / (Delta^2 + xi)`` (Zenke et al. 2017) with ``Delta`` the
    pass's total change. Adam moves every weight by about ``lr`` per step, so at a fine-tuning learning
    rate ``Delta^2`` is comparable to ``xi`` and both the path and ``xi`` shape Omega. (Plain SGD at
    such a rate moves weights by ``lr * g``, far below sqrt(xi): Omega is then ``lr * sum g^2 / xi``, a
    batch-gradient Fisher whatever ``xi`` and ``lr``.) One forward/backward per batch, no per-example
    gradients. Returns (importance, steps taken). Dropout is off so the pass is deterministic.

    A sharded (FSDP2) model: ``params`` are its sharded parameters, every process runs every batch and
    the result is sharded like them (each process its rows).
    """
    names = list(params)
    tensors = [params[n] for n in names]
    device = model_device(model)
    world, rank = world_of(accelerator)
    scored = [e for e in examples if has_label_tokens(e)]
    groups = list(batches(scored, batch_size))
    total_steps = len(groups) if steps is None else (steps if groups else 0)

    sharded = is_sharded(model)

    def sharded_gradient(batch_examples: list[Any]) -> dict[str, Tensor]:
        """Every process runs the whole batch (a sharded forward is a collective); FSDP2's averaging
        reduce-scatter of identical gradients leaves each process its rows of the batch gradient."""
        batch = to_device(collate(batch_examples), device)
        count = scored_tokens(batch["labels"]).sum().float().clamp_min(1.0)
        loss = per_example_nll(forward_logits(model, batch), batch["labels"], "sum").sum() / count
        for p in tensors:
            p.grad = None
        loss.backward()
        grads = {n: (p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                 for n, p in zip(names, tensors)}
        for p in tensors:
            p.grad = None
        return grads

    def gradient_for(batch_examples: list[Any]) -> Callable[[], dict[str, Tensor]]:
        def compute() -> dict[str, Tensor]:
            if sharded:
                return sharded_gradient(batch_examples)
            mine = batch_examples[rank::world]
            grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            local = torch.zeros(1, dtype=torch.float32, device=device)
            batch = None
            if mine:
                batch = to_device(collate(mine), device)
                local += float(scored_tokens(batch["labels"]).sum())
            count = sum_across_processes({"tokens": local}, accelerator)["tokens"].clamp_min(1.0)
            if batch is not None:
                loss = per_example_nll(forward_logits(model, batch), batch["labels"], "sum").sum() / count
                raw = torch.autograd.grad(loss, tensors, allow_unused=True)
                grads = {n: (g.float() if g is not None else torch.zeros_like(grads[n])) for n, g in zip(names, raw)}
            return sum_across_processes(grads, accelerator)

        return compute

    schedule = (gradient_for(groups[i % len(groups)]) for i in range(total_steps))
    start = {n: p.detach().clone() for n, p in params.items()}
    walker = build_path_optimizer(tensors, optimizer, lr, betas, weight_decay)
    try:
        with eval_mode(model, no_grad=False):
            omega, change, taken = record_path(params, schedule, walker)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
    return si_importance(omega, change, xi), taken
