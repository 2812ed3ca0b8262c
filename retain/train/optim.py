"""Optimizers the loop can train with beside torch's AdamW (``train.optimizer``).

MoFO, the Momentum-Filtered Optimizer (Chen et al. 2024, arXiv 2407.20999, TMLR 2025; authors' code
``YChen-zzz/MoFO``, ``open_instruct/algorithms_MoFO.py``): Adam in which each step moves only the entries
of each parameter block with the largest momentum, a greedy block-coordinate method that keeps the
fine-tuned weights close to the pre-trained ones without any pre-training data or change to the loss.

Per step t, for every parameter tensor W (one block; the authors' partition is one block per
``named_parameters`` entry) with gradient g:

    m_t = beta1 m_{t-1} + (1 - beta1) g              (every entry: the moments are never filtered)
    v_t = beta2 v_{t-1} + (1 - beta2) g^2
    S_t = the entries whose |m_t| is at least the k-th largest |m_t| in W,  k = max(1, floor(fraction * |W|))
    W  <- W (1 - lr * weight_decay)                  (decoupled decay, every entry, as AdamW)
    W  <- W - lr / (1 - beta1^t) * (m_t * 1[S_t]) / (sqrt(v_t / (1 - beta2^t)) + eps)

- The selection ranks the first moment m (the authors' ``state["m"]``, before bias correction, which is
  one scalar per tensor and does not change the ranking), within each tensor; ties at the threshold
  are all updated, as in the authors' ``>= threshold``.
- Blocks the authors leave unfiltered (biases and normalization weights: ``"bias"``/``"norm"`` in the
  name) take the full Adam update. Here that is every tensor with fewer than two dimensions, which is
  the same set in the loop's parameter groups (:func:`retain.train.loop.build_optimizer`): those groups
  carry ``fraction: 1``.
- Weight decay, when set, shrinks every entry, filtered or not (the authors' code does the same; the
  default ``train.weight_decay`` is 0, as in their scripts).
- ``fraction`` defaults to 0.15: the authors' scripts (``--MoFO_fraction 0.15``) and README example; the
  README recommends 5-20%.

The state is torch AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter; ``step`` a float32
scalar on the CPU), so checkpoints save and restore it with ``state_dict`` like AdamW's, and with
``fraction = 1`` every step is torch AdamW's single-tensor step, operation for operation (bit for bit).
Cost: one ``topk`` over each filtered tensor's |m| per step, and one temporary of its size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

#: The authors' scripts and README example (``--MoFO_fraction 0.15``).
MOFO_DEFAULT_FRACTION = 0.15


def top_fraction_mask(momentum: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """The entries of ``momentum`` with the largest magnitudes: at least ``max(1, floor(fraction * n))`` of
    them (ties at the threshold included); None when that is every entry."""
    n = momentum.numel()
    k = max(1, int(n * fraction))
    if k >= n:
        return None
    magnitude = momentum.abs()
    threshold = magnitude.flatten().topk(k, sorted=False).values.min()
    return magnitude >= threshold


class MoFO(torch.optim.Optimizer):
    """Adam(W) that updates only the top ``fraction`` of each tensor's entries by |first moment| (see the module)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fraction: float = MOFO_DEFAULT_FRACTION,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"MoFO's fraction must lie in (0, 1], got {fraction}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "fraction": fraction}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay, fraction = group["lr"], group["eps"], group["weight_decay"], group["fraction"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError("MoFO does not support sparse gradients")
                state = self.state[param]
                if not state:  # as torch's AdamW: the step count a float32 scalar on the CPU
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                step_t += 1
                if decay != 0:
                    param.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = step_t.item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                chosen = top_fraction_mask(exp_avg, fraction) if fraction < 1.0 else None
                update = exp_avg if chosen is None else torch.where(chosen, exp_avg, 0.0)
                param.addcdiv_(update, denom, value=-step_size)
        return loss
