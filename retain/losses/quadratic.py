"""Quadratic weight penalties as pure tensor functions (the statistics that weigh them: ``retain.stats``).

Every regularizer in ``l2``, ``ewc``, ``ewc-lora`` and ``importance`` is a weighted quadratic
distance to anchor weights, ``sum_i w_i (theta_i - theta*_i)^2``; they differ only in the weights
``w`` (none, a diagonal Fisher, a Synaptic-Intelligence importance) and in what ``theta`` is (a
weight, or a LoRA update ``Delta W = s B A``). The strategies multiply by ``lambda / 2``.

Parameters are passed as ``{name: tensor}`` dicts so the same functions serve full weights,
adapter weights and ``Delta W`` matrices.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping

import torch
from torch import Tensor

LayerBalance = Literal["penalty_share", "task_share", "uniform"]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


class _WeightedSquare(torch.autograd.Function):
    """``sum w (x - a)^2`` with the gradient ``2 w (x - a)`` recomputed in backward.

    Saves only references to tensors that already exist (the weight, its anchor, its statistics), so
    a penalty over every weight of a large model adds no activation memory and one autograd node per
    tensor instead of four.
    """

    @staticmethod
    def forward(ctx, value: Tensor, anchor: Tensor | None, weight: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(value, anchor, weight)
        diff = value.detach() if anchor is None else value.detach() - anchor.to(value.dtype)
        square = diff.pow(2) if weight is None else weight.to(value.dtype) * diff.pow(2)
        return square.sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        value, anchor, weight = ctx.saved_tensors
        diff = value if anchor is None else value - anchor.to(value.dtype)
        grad = 2.0 * diff if weight is None else 2.0 * weight.to(value.dtype) * diff
        return grad * grad_output, None, None


def weighted_square(value: Tensor, anchor: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """``sum w (value - anchor)^2`` for one tensor (anchor 0 and w 1 when None), memory-lean gradient."""
    return _WeightedSquare.apply(value, anchor, weight)


def quadratic_penalty(
    params: Mapping[str, Tensor], anchors: Mapping[str, Tensor], weights: Mapping[str, Tensor] | None = None
) -> Tensor:
    """``sum_i w_i (theta_i - anchor_i)^2`` over every named tensor (``w = 1`` when ``weights`` is None).

    Anchors and weights may be stored in another dtype (e.g. bfloat16); they are cast to the
    parameter's dtype so the penalty's gradient has the parameter's precision.
    """
    total: Tensor | None = None
    for name, value in params.items():
        term = weighted_square(value, anchors[name], None if weights is None else weights[name])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("quadratic_penalty needs at least one parameter")
    return total


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its transformer block (``block.3``), or embeddings / head / final."""
    match = _BLOCK.search(name)
    if match:
        return f"block.{int(match.group(1))}"
    if "lm_head" in name:
        return "head"
    if any(key in name for key in ("embed", "wte", "wpe")):
        return "embeddings"
    return "final"


def penalty_per_layer(
    params: Mapping[str, Tensor], anchors: Mapping[str, Tensor], weights: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """``quadratic_penalty`` split by ``layer_of``: one differentiable sum per layer."""
    groups: dict[str, dict[str, Tensor]] = {}
    for name, value in params.items():
        groups.setdefault(layer_of(name), {})[name] = value
    return {layer: quadratic_penalty(group, anchors, weights) for layer, group in groups.items()}


def layer_coefficients(
    layer_terms: Mapping[str, Tensor], task_loss: Tensor, balance: LayerBalance = "penalty_share"
) -> dict[str, Tensor]:
    """Per-layer multipliers (detached: they steer, they are not optimized) of each layer's penalty term.

    ``layer_terms`` are the already-scaled penalty terms ``T_l = lambda/2 * R_l``; ``task_loss`` is the
    current task loss L. Because ``c_l`` is detached, the force pulling layer l back is
    ``c_l * dT_l/dtheta``; a sensible balance holds a layer that drifted further at least as hard.

    - ``penalty_share`` (default): ``c_l = T_l / (T_l + L)``, the layer's share of the pair (its
      penalty, the task loss). Monotone: with ``T = a d^2`` (drift d) the force ``2 a d * T/(T+L)``
      grows with d, faster than linearly while ``T < L`` and like ``uniform`` beyond; a layer that
      barely moved is hardly held, one that drifted far is held in full.
    - ``uniform``: ``c_l = 1`` (plain element-wise penalty, no layer balancing). Monotone.
    - ``task_share``: ``c_l = L / (T_l + L)``. **Not monotone** (kept for comparison): the force is
      the gradient of ``L log(1 + T_l/L)``, which *falls* as a layer drifts past ``T_l = L`` (1.71 at
      drift 1, 0.92 at 4, 0.25 at 16 for ``a = L = 1``), so a layer that moved far is let go.

    Song et al. 2025 (arXiv 2501.13669) §4.3 define the paper's coefficient; its formula could not be
    read here, so none of these is claimed to be it.
    """
    if balance == "uniform":
        return {layer: torch.ones((), device=term.device) for layer, term in layer_terms.items()}
    if balance not in ("penalty_share", "task_share"):
        raise ValueError(f"unknown layer balance '{balance}'; choose penalty_share, uniform or task_share")
    loss = task_loss.detach().float().clamp_min(0.0)
    out = {}
    for layer, term in layer_terms.items():
        t = term.detach().float().clamp_min(0.0)
        denominator = (t + loss).clamp_min(torch.finfo(torch.float32).tiny)
        out[layer] = (t if balance == "penalty_share" else loss) / denominator
    return out


def restoring_force(balance: LayerBalance, drift: float, curvature: float = 1.0, task_loss: float = 1.0) -> float:
    """The pull back on a layer whose penalty is ``T = curvature * drift^2`` under ``balance``:
    ``c(T) * dT/d drift`` with ``c`` held fixed (detached), as the optimizer sees it."""
    term = torch.tensor(curvature * drift * drift)
    c = layer_coefficients({"layer": term}, torch.tensor(task_loss), balance)["layer"]
    return float(c) * 2.0 * curvature * drift


# ---------------------------------------------------------------------------------------------
# Sparse (top-k) statistics: the penalty over the kept elements only


def global_threshold(values: Mapping[str, Tensor], keep_fraction: float, iterations: int = 48) -> float:
    """The value above which ``keep_fraction`` of all elements lie (bisection on counts, so no
    concatenated copy of every element is made; ties at the threshold are all kept)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    total = sum(t.numel() for t in values.values())
    want = max(int(round(keep_fraction * total)), 1)
    if want >= total:
        return float("-inf")
    low = min(float(t.float().min()) for t in values.values())
    high = max(float(t.float().max()) for t in values.values())
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        count = sum(int((t.float() >= middle).sum()) for t in values.values())
        if count >= want:
            low = middle
        else:
            high = middle
    return low


def top_elements(values: Mapping[str, Tensor], keep_fraction: float) -> dict[str, Tensor]:
    """Per tensor, the flat indices (int64) of its elements among the top ``keep_fraction`` of all."""
    threshold = global_threshold(values, keep_fraction)
    return {name: (t.reshape(-1).float() >= threshold).nonzero().squeeze(1) for name, t in values.items()}


def sparse_weighted_square(value: Tensor, index: Tensor, anchor: Tensor, weight: Tensor) -> Tensor:
    """``sum_k w_k (value.flat[index_k] - anchor_k)^2``: the quadratic penalty on kept elements only."""
    picked = value.reshape(-1).index_select(0, index.to(value.device, torch.int64))
    return (weight.to(value.dtype) * (picked - anchor.to(value.dtype)).pow(2)).sum()


def sparse_penalty_per_layer(params: Mapping[str, Tensor], sparse: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``penalty_per_layer`` for sparse statistics ``{name: {index, anchor, weight}}``."""
    out: dict[str, Tensor] = {}
    for name, value in params.items():
        entry = sparse[name]
        term = sparse_weighted_square(value, entry["index"], entry["anchor"], entry["weight"])
        layer = layer_of(name)
        out[layer] = term if layer not in out else out[layer] + term
    return out


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """The update a LoRA adapter adds to its matrix, ``Delta W = scaling * B @ A``, shape (out, in)."""
    return scaling * (lora_b @ lora_a)
