"""Synaptic-Intelligence importance (Zenke et al. 2017): each weight's contribution to the decrease
of a loss along an optimization path, divided by how far it moved.

    omega_i = -sum_t g_i(t) * delta_theta_i(t)        (path integral, accumulated step by step)
    Omega_i = omega_i / (Delta_i^2 + xi)               (Delta_i: the weight's total change)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from retain.models.runtime import eval_mode, model_device
from retain.stats.per_example import (
    Collate,
    batches,
    forward_logits,
    has_label_tokens,
    per_example_nll,
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
) -> tuple[dict[str, Tensor], int]:
    """Element-wise importance from plain SGD steps on general data; the weights are restored after.

    Each step takes the mean gradient of a batch (``omega -= g * delta``, ``delta = -lr g``), then
    ``Omega = omega / (Delta^2 + xi)`` with ``Delta`` the pass's total change (Zenke et al. 2017).
    One forward/backward per batch, no per-example gradients: this is why it is cheap. Returns
    (importance, steps taken). Dropout is off so the pass is deterministic.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    device = model_device(model)
    world, rank = world_of(accelerator)
    start = {n: p.detach().clone() for n, p in params.items()}
    omega = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    scored = [e for e in examples if has_label_tokens(e)]
    taken = 0
    try:
        with eval_mode(model, no_grad=False):
            for batch_examples in batches(scored, batch_size):
                if steps is not None and taken >= steps:
                    break
                mine = batch_examples[rank::world]
                grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
                if mine:
                    batch = to_device(collate(mine), device)
                    loss = per_example_nll(forward_logits(model, batch), batch["labels"]).sum() / len(batch_examples)
                    raw = torch.autograd.grad(loss, tensors, allow_unused=True)
                    grads = {n: (g.float() if g is not None else torch.zeros_like(grads[n])) for n, g in zip(names, raw)}
                grads = sum_across_processes(grads, accelerator)
                deltas = {n: -lr * grads[n] for n in names}
                with torch.no_grad():
                    for n, p in params.items():
                        p.add_(deltas[n].to(p.dtype))
                si_path_step_(omega, grads, deltas)
                taken += 1
        change = {n: (params[n].detach().float() - start[n].float()) for n in names}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
    return si_importance(omega, change, xi), taken

