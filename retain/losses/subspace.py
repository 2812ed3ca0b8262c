"""O-LoRA's subspace penalties (Wang et al., EMNLP Findings 2023), as pure tensor functions.

Each adapted layer has a frozen ``A_past`` (the LoRA A matrices of every earlier task stacked row-wise,
shape ``[r_past, d_in]``) and the trainable ``A_new`` of the current task (``[r, d_in]``). The rows of A
span the input subspace an adapter reads from; O-LoRA pushes the new task's rows to be orthogonal to
the old ones so the new update leaves the old tasks' input directions alone:

    L_orth = sum_layers sum_ij |(A_past A_new^T)_ij|

The authors' code also offers an L2 term on the new adapter, ``sum ||A_new||_2 + ||B_new||_2`` (norms,
not squared), with weight ``lambda2 = 0`` by default. The strategy multiplies by ``lambda1``/``lambda2``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def orthogonality(a_past: Tensor, a_new: Tensor) -> Tensor:
    """``sum_ij |(A_past A_new^T)_ij|`` for one layer; ``a_past`` [r_past, d], ``a_new`` [r, d]."""
    if a_past.shape[-1] != a_new.shape[-1]:
        raise ValueError(f"A_past has input size {a_past.shape[-1]} but A_new has {a_new.shape[-1]}")
    return (a_past.to(a_new.dtype) @ a_new.transpose(0, 1)).abs().sum()


def orthogonality_penalty(pairs: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Sum of :func:`orthogonality` over layers, given ``(A_past, A_new)`` per layer."""
    total: Tensor | None = None
    for a_past, a_new in pairs:
        term = orthogonality(a_past, a_new)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonality_penalty needs at least one (A_past, A_new) pair")
    return total


def l2_norm_penalty(tensors: Iterable[Tensor]) -> Tensor:
    """``sum_k ||T_k||_2`` (Frobenius norm of each tensor, not squared), as in the O-LoRA code."""
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    if not norms:
        raise ValueError("l2_norm_penalty needs at least one tensor")
    return torch.stack(norms).sum()
