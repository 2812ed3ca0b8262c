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
    layer_terms: Mapping[str, Tensor], task_loss: Tensor, balance: LayerBalance = "task_share"
) -> dict[str, Tensor]:
    """Per-layer multipliers (detached: they steer, they are not optimized) of each layer's penalty term.

    ``layer_terms`` are the already-scaled penalty terms ``lambda/2 * R_l``; ``task_loss`` is the
    current task loss L.

    - ``task_share`` (default): ``c_l = L / (T_l + L)``: each layer's weighted term ``c_l T_l`` stays
      below both ``T_l`` and ``L``, so no layer's penalty can drown the task loss, while a layer that
      barely moved is penalized in full.
    - ``penalty_share``: ``c_l = T_l / (T_l + L)``: each layer's term weighted by its share of the
      pair (its penalty, the task loss): a layer that drifted far is held harder, one that barely
      moved hardly at all.
    - ``uniform``: ``c_l = 1`` (plain element-wise penalty, no layer balancing).
    """
    if balance == "uniform":
        return {layer: torch.ones((), device=term.device) for layer, term in layer_terms.items()}
    loss = task_loss.detach().float().clamp_min(0.0)
    out = {}
    for layer, term in layer_terms.items():
        t = term.detach().float().clamp_min(0.0)
        denominator = (t + loss).clamp_min(torch.finfo(torch.float32).tiny)
        out[layer] = (t if balance == "penalty_share" else loss) / denominator
    return out


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """The update a LoRA adapter adds to its matrix, ``Delta W = scaling * B @ A``, shape (out, in)."""
    return scaling * (lora_b @ lora_a)
