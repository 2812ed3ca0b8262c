"""Paired bootstrap intervals for the figures retain reports, from the per-item scores of the report part.

Why paired: the base model and the fine-tuned one are scored on the same report items, so most of the
item-to-item spread cancels in their ratio or difference; resampling items *jointly* for both keeps
that pairing. Evals over the same pool (a loss and an accuracy on one set of windows) share one draw.

Why over seeds too: with several training seeds every seed is scored on the same report items, so seeds
and items are crossed factors. A replicate draws seeds (with replacement) and, separately, items; the
statistic is the mean over the drawn seeds. A difference between two strategies uses the same draws
for both (paired on seed, data order and items). With few seeds the seed part is coarse (3 seeds give
10 distinct multisets), so the spread between seeds is reported beside the interval.

Percentile intervals, ``B = 2000`` replicates from a fixed seed: a results file is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retain.results.schema import ItemScores, Score, StepRecord

REPLICATES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval at ``confidence``."""

    value: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _rows(items: ItemScores, draw: np.ndarray) -> np.ndarray:
    """The value of ``items`` under each row of ``draw`` (B x n item indices)."""
    num = np.asarray(items.num, dtype=np.float64)[draw].sum(axis=1)
    den = np.asarray(items.den, dtype=np.float64)[draw].sum(axis=1) if items.den is not None else draw.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = num / den
    return np.exp(ratio) if items.exp else ratio


class Draws:
    """One resampling of items per pool size, shared by every eval over a pool of that size (evals over
    the same pool: paired), and by every model state and seed (paired before/after and across seeds)."""

    def __init__(self, replicates: int = REPLICATES, seed: int = 0) -> None:
        self.replicates = replicates
        self.seed = seed
        self._by_size: dict[int, np.ndarray] = {}

    def of(self, n: int) -> np.ndarray:
        if n not in self._by_size:
            rng = np.random.default_rng([self.seed, n])
            self._by_size[n] = rng.integers(0, n, size=(self.replicates, n))
        return self._by_size[n]

    def values(self, score: Score) -> np.ndarray:
        """Replicates of a bounded score as higher-is-better (as R and the general score read it)."""
        assert score.items is not None
        rows = _rows(score.items, self.of(len(score.items.num)))
        return rows if score.higher_is_better else 1.0 - rows


def _general(record: StepRecord) -> list[tuple[str, Score]]:
    return [(k, s) for k, s in record.scores.items() if s.role == "general" and s.bounded]


def _primary(record: StepRecord, task: str) -> Score | None:
    return next((s for s in record.scores.values() if s.role == "task" and s.train_task == task and s.bounded), None)


def retention_replicates(base: StepRecord, after: StepRecord, draws: Draws) -> np.ndarray | None:
    """General retention (mean bounded general score after / before) under each replicate; None when an
    eval lacks items (a file from before schema 1.2) or the two records score different items."""
    before, now = dict(_general(base)), dict(_general(after))
    keys = [k for k in before if k in now]
    if not keys or any(not _pairs(before[k], now[k]) for k in keys):
        return None
    top = np.mean([draws.values(now[k]) for k in keys], axis=0)
    bottom = np.mean([draws.values(before[k]) for k in keys], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return top / bottom


def _pairs(a: Score, b: Score) -> bool:
    return a.items is not None and b.items is not None and len(a.items.num) == len(b.items.num)


def task_replicates(record: StepRecord, task: str, draws: Draws) -> np.ndarray | None:
    """Task ``task``'s primary score at ``record`` under each replicate (None without items)."""
    score = _primary(record, task)
    return draws.values(score) if score is not None and score.items is not None else None


def gain_replicates(base: StepRecord, after: StepRecord, task: str, draws: Draws) -> np.ndarray | None:
    """The primary score of ``task`` after minus before, paired item by item."""
    a, b = _primary(after, task), _primary(base, task)
    if a is None or b is None or not _pairs(a, b):
        return None
    return draws.values(a) - draws.values(b)


def interval(point: float | None, replicates: np.ndarray | None, confidence: float = CONFIDENCE) -> Interval | None:
    """The percentile interval of ``replicates`` around ``point``; None without either."""
    if point is None or replicates is None or math.isnan(point):
        return None
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return None
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(point), float(low), float(high), confidence)


def over_seeds(points: Sequence[float | None], per_seed: Sequence[np.ndarray | None], confidence: float = CONFIDENCE,
               seed: int = 0) -> Interval | None:
    """The mean of the seeds' ``points`` with the crossed interval: replicate ``r`` averages
    ``per_seed[s][r]`` over a resample of the seeds (every seed's replicates use the same item draws,
    so items stay paired). For a paired difference pass per-seed differences."""
    if not per_seed or any(x is None for x in per_seed) or any(p is None for p in points):
        return None
    matrix = np.stack([np.asarray(x) for x in per_seed])  # seeds x replicates
    seeds, replicates = matrix.shape
    picks = np.random.default_rng([seed, 7]).integers(0, seeds, size=(replicates, seeds))
    crossed = matrix[picks, np.arange(replicates)[:, None]].mean(axis=1)
    return interval(float(np.mean([float(p) for p in points])), crossed, confidence)  # type: ignore[arg-type]


def verdict(difference: Interval | None, a: str, b: str) -> str:
    """"a beats b" only when the paired interval of (a - b) excludes 0, else "tie"."""
    if difference is None:
        return "no interval"
    if difference.low > 0:
        return f"{a} beats {b}"
    if difference.high < 0:
        return f"{b} beats {a}"
    return "tie"
