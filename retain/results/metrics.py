"""Continual-learning metrics over an accuracy matrix R. Pure functions, numpy only.

Conventions
-----------
``R`` has shape ``(T + 1, T)`` (nested lists or an ``np.ndarray``):

* **rows** are model states: row 0 is the base model, row ``i`` (1..T) is the model after training
  through task ``i``. Row indices therefore coincide with the 1-indexed task numbers of the papers.
* **columns** are evaluation tasks, 0-indexed in code: column ``c`` holds task ``c + 1`` of the papers.

So the papers' ``a_{i,j}`` (1-indexed task ``j``) is ``R[i][j - 1]`` here, and "the score of task j
right after it was trained" is ``R[j][j - 1]``. Every formula below is written in the papers'
1-indexed form; the code translates.

Scores entering R are bounded and higher-is-better (accuracy, next-token accuracy); losses are not
put in R (see ``general_retention`` for those).

Missing entries
---------------
``None`` or ``NaN`` marks a cell that was not evaluated. Each metric is a mean of per-task terms; a
term that needs a missing cell is dropped and the mean is taken over the remaining terms (nanmean).
A metric with no computable term is ``NaN``. Dropping rather than raising lets a partly evaluated
run (an interrupted sequence, an eval skipped to save time) still be summarized; the report shows
the missing cells, so nothing is hidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np

MatrixLike = Union[np.ndarray, Sequence[Sequence[Union[float, None]]]]

NAN = float("nan")


def as_matrix(R: MatrixLike) -> np.ndarray:
    """Return R as a float array with NaN for missing cells, after checking its (T+1) x T shape."""
    try:
        arr = np.array(R, dtype=float)  # copies; None -> NaN
    except (TypeError, ValueError) as exc:
        raise ValueError(f"R must be a rectangular matrix of numbers or None: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"R must be 2-D (T+1 rows x T columns), got {arr.ndim}-D")
    n_rows, n_cols = arr.shape
    if n_cols < 1 or n_rows != n_cols + 1:
        raise ValueError(
            f"R must have T+1 rows (row 0 = base model) and T >= 1 columns; got shape {arr.shape}"
        )
    return arr


def n_tasks(R: MatrixLike) -> int:
    """Number of training tasks T (columns of R)."""
    return as_matrix(R).shape[1]


def _mean(terms: Sequence[float] | np.ndarray) -> float:
    """Mean ignoring NaN terms; NaN (without a numpy warning) when nothing is left."""
    arr = np.asarray(terms, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else NAN


# --- paper definitions -------------------------------------------------------------------------


def average_accuracy(R: MatrixLike) -> float:
    """ACC = (1/T) sum_j R[T][j]: how good the final model is on every task of the sequence."""
    arr = as_matrix(R)
    return _mean(arr[-1])


def backward_transfer_per_task(R: MatrixLike) -> np.ndarray:
    """BWT terms R[T][j] - R[j][j] for tasks j = 1..T-1 (length T-1; negative = forgotten)."""
    arr = as_matrix(R)
    T = arr.shape[1]
    return np.array([arr[T, c] - arr[c + 1, c] for c in range(T - 1)], dtype=float)


def backward_transfer(R: MatrixLike) -> float:
    """BWT = 1/(T-1) sum_{j<T} (R[T][j] - R[j][j]) (Lopez-Paz & Ranzato 2017, paper form).

    Negative means later training hurt earlier tasks. Undefined for T < 2 (no earlier task), where
    it returns NaN rather than 0 so a single-task run is not mistaken for "no forgetting".
    """
    return _mean(backward_transfer_per_task(R))


def forward_transfer_per_task(R: MatrixLike) -> np.ndarray:
    """FWT terms R[j-1][j] - R[0][j] for tasks j = 2..T (length T-1)."""
    arr = as_matrix(R)
    T = arr.shape[1]
    # Task j (1-indexed) is column j-1; the state before training it is row j-1.
    return np.array([arr[j - 1, j - 1] - arr[0, j - 1] for j in range(2, T + 1)], dtype=float)


def forward_transfer(R: MatrixLike) -> float:
    """FWT = 1/(T-1) sum_{j>1} (R[j-1][j] - R[0][j]): how much earlier tasks help a task not yet seen.

    R[0] is the base model, so this measures transfer relative to where the base model started.
    NaN for T < 2.
    """
    return _mean(forward_transfer_per_task(R))


def forgetting_per_task(R: MatrixLike, k: int | None = None) -> np.ndarray:
    """Chaudhry et al. 2018 forgetting f_j^k = max_{l in {j..k-1}} R[l][j] - R[k][j] for j = 1..k-1.

    ``k`` is the row (state after training task k), default T. The paper writes the max over
    l in {1..k-1}, but a_{l,j} is only defined once task j has been learned (l >= j), so the rows
    before task j (including the base model, row 0) are excluded: a base model that happened to do
    well on a task before training on it should not count as knowledge that was later forgotten.
    Returns an array of length k-1 (empty for k < 2). Missing cells are skipped inside the max.
    """
    arr = as_matrix(R)
    T = arr.shape[1]
    k = T if k is None else int(k)
    if not 1 <= k <= T:
        raise ValueError(f"k must be in 1..T={T} (a row after training), got {k}")
    out = np.full(max(k - 1, 0), NAN)
    for j in range(1, k):  # 1-indexed task j, column j-1
        past = arr[j:k, j - 1]  # rows l = j..k-1
        past = past[~np.isnan(past)]
        if past.size and not math.isnan(arr[k, j - 1]):
            out[j - 1] = past.max() - arr[k, j - 1]
    return out


def forgetting(R: MatrixLike, k: int | None = None) -> float:
    """Average forgetting F_k = 1/(k-1) sum_{j<k} f_j^k (default k = T); NaN for k < 2.

    Positive means knowledge was lost; unlike -BWT it measures from each task's best point.
    """
    return _mean(forgetting_per_task(R, k))


# --- named variants of other codebases ---------------------------------------------------------


def gem_backward_transfer(R: MatrixLike) -> float:
    """BWT as GEM's released code computes it: the T-1 paper terms summed and divided by T.

    Their code averages over all T tasks, the last one contributing a zero term. For T = 1 it is 0.
    """
    arr = as_matrix(R)
    terms = backward_transfer_per_task(arr)
    return _nan_sum_over(terms, arr.shape[1])


def gem_forward_transfer(R: MatrixLike) -> float:
    """FWT as GEM's released code computes it: the T-1 paper terms summed and divided by T."""
    arr = as_matrix(R)
    terms = forward_transfer_per_task(arr)
    return _nan_sum_over(terms, arr.shape[1])


def _nan_sum_over(terms: np.ndarray, denominator: int) -> float:
    """GEM-style mean: sum of the available terms over a fixed denominator (0-terms included)."""
    if terms.size and np.isnan(terms).all():
        return NAN
    return float(np.nansum(terms)) / denominator


def avalanche_forgetting_per_task(R: MatrixLike) -> np.ndarray:
    """Avalanche's per-experience forgetting R[j][j] - R[T][j] for j = 1..T-1 (no max over the past)."""
    return -backward_transfer_per_task(R)


def avalanche_forgetting(R: MatrixLike) -> float:
    """Avalanche's stream forgetting: mean_{j<T} (R[j][j] - R[T][j]). Equals -BWT; NaN for T < 2."""
    return _mean(avalanche_forgetting_per_task(R))


# --- retention of a general score (not part of R) ----------------------------------------------


def general_retention(
    before: float | None, after: float | None, higher_is_better: bool = True
) -> float:
    """Fraction of the base model's general ability kept, as a ratio where 1.0 = unchanged.

    Higher-is-better scores: after / before. Lower-is-better scores (loss, perplexity): before / after,
    so the result still reads "higher is better" and < 1 means the model got worse. NaN when either
    value is missing or the denominator is 0 (the ratio is undefined, not infinite).
    """
    if before is None or after is None:
        return NAN
    num, den = (after, before) if higher_is_better else (before, after)
    num, den = float(num), float(den)
    if math.isnan(num) or math.isnan(den) or den == 0.0:
        return NAN
    return num / den


# --- registry ----------------------------------------------------------------------------------

METRICS: dict[str, Callable[[MatrixLike], float]] = {
    "acc": average_accuracy,
    "bwt": backward_transfer,
    "fwt": forward_transfer,
    "forgetting": forgetting,
    "gem_bwt": gem_backward_transfer,
    "gem_fwt": gem_forward_transfer,
    "avalanche_forgetting": avalanche_forgetting,
}
"""Matrix metrics by name, so a report or config can select a variant ("gem_bwt") explicitly."""


def compute_all(R: MatrixLike, names: Sequence[str] | None = None) -> dict[str, float]:
    """Every registered metric (or the ``names`` given) of R, keyed by registry name."""
    arr = as_matrix(R)
    chosen = list(METRICS) if names is None else list(names)
    unknown = [n for n in chosen if n not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {name: METRICS[name](arr) for name in chosen}
