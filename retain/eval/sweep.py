"""The alpha sweep: how much of a fine-tuning update to keep (WiSE-FT, ``retain.models.merging``).

Evaluate a grid of alphas with a callback and name the largest alpha whose forgetting,
``1 - general(alpha) / general(0)`` (the general-suite drop the CI gate bounds for one task), stays
within a budget; the sweep is written as a results file the report plots against alpha.

The alpha is chosen on the **select** part of every eval and the figures are reported on the
**report** part (``retain.eval.split``), so the chosen alpha's reported forgetting is not the best of
several noisy draws. Scores without a select part (an eval too small to split) serve both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from retain.results.schema import Results, Score, StepRecord, StrategyRun
from retain.results.summary import build_run, general_score, primary_task_score

SWEEP_NAME = "wise-ft"


@dataclass
class SweepPoint:
    alpha: float
    scores: dict[str, Score]
    general: float | None = None  # mean bounded general score (higher is better)
    new_task: float | None = None  # mean primary score of the trained tasks
    forgetting: float | None = None  # 1 - general / general at alpha 0 (report part)
    select_forgetting: float | None = None  # the same on the select part: what the budget chooses by


@dataclass
class SweepResult:
    points: list[SweepPoint]
    max_forgetting: float | None = None
    best_alpha: float | None = None  # largest alpha within the budget (None: no budget or none fits)
    task_names: list[str] = field(default_factory=list)


def parse_alphas(text: str) -> list[float] | None:
    """``"0.5"`` -> None (a single alpha, see float(text)); ``"sweep"`` -> 0, 0.1, ..., 1; ``"0,0.5,1"`` -> list."""
    text = text.strip().lower()
    if text == "sweep":
        return [round(i / 10, 10) for i in range(11)]
    if text.startswith("sweep:"):
        text = text[len("sweep:") :]
    elif "," not in text:
        return None
    values = sorted({float(v) for v in text.split(",") if v.strip()})
    if not values:
        raise ValueError("an alpha sweep needs at least one value")
    return values


def task_names_of(scores: Mapping[str, Score]) -> list[str]:
    """Training tasks the suite measures (role task), in first-seen order."""
    names: list[str] = []
    for score in scores.values():
        if score.role == "task" and score.train_task and score.train_task not in names:
            names.append(score.train_task)
    return names


def _new_task_score(scores: Mapping[str, Score], tasks: Sequence[str]) -> float | None:
    record = StepRecord(index=0, scores=dict(scores))
    values = [v for v in (primary_task_score(record, t) for t in tasks) if v is not None]
    return sum(values) / len(values) if values else None


def _on_select(scores: Mapping[str, Score]) -> dict[str, Score]:
    return {k: s.on("select") for k, s in scores.items()}


def _forgetting(general: float | None, reference: float | None) -> float | None:
    """``1 - general / reference``; None where nothing bounded was measured; 0 for a base scoring 0 (a
    bounded score at 0 has nothing to lose)."""
    if reference is None or general is None or math.isnan(general):
        return None
    return 1.0 - general / reference if reference > 0 else 0.0


def alpha_sweep(
    alphas: Iterable[float],
    evaluate: Callable[[float], Mapping[str, Score]],
    max_forgetting: float | None = None,
) -> SweepResult:
    """Evaluate every alpha (0 is added: it is the reference) and pick the largest one whose forgetting
    ``1 - general(alpha) / general(0)`` on the select part is at most ``max_forgetting``.

    Forgetting is None where the suite has no bounded general score (nothing to bound), and 0 where the
    base model's general score is 0.
    """
    grid = sorted({0.0, *(float(a) for a in alphas)})
    if any(a < 0 for a in grid):
        raise ValueError(f"alphas must be >= 0, got {grid}")
    points = [SweepPoint(alpha=a, scores=dict(evaluate(a))) for a in grid]
    tasks = task_names_of(points[0].scores)
    reference = general_score(StepRecord(index=0, scores=points[0].scores))
    select_reference = general_score(StepRecord(index=0, scores=_on_select(points[0].scores)))
    for point in points:
        point.general = general_score(StepRecord(index=0, scores=point.scores))
        point.new_task = _new_task_score(point.scores, tasks)
        point.forgetting = _forgetting(point.general, reference)
        point.select_forgetting = _forgetting(general_score(StepRecord(index=0, scores=_on_select(point.scores))),
                                              select_reference)
    best = None
    if max_forgetting is not None:
        fitting = [p.alpha for p in points if p.select_forgetting is not None and p.select_forgetting <= max_forgetting]
        best = max(fitting) if fitting else None
    return SweepResult(points, max_forgetting, best, tasks)


def sweep_results(result: SweepResult, base_model: str, tuned: str) -> Results:
    """The sweep as a results file: one run ``wise-ft@alpha=<a>`` per alpha (base record + merged record),
    which the report plots as new-task score and retention against alpha."""
    tasks = result.task_names or [tuned]
    base = result.points[0]
    runs: list[StrategyRun] = []
    for point in result.points:
        records = [
            StepRecord(index=0, scores=base.scores),
            StepRecord(index=len(tasks), task=tasks[-1], scores=point.scores),
        ]
        runs.append(
            build_run(f"{SWEEP_NAME}@alpha={point.alpha:g}", tasks, records, config={"alpha": point.alpha, "tuned": tuned})
        )
    return Results(base_model=base_model, scenario="wise-ft sweep", runs=runs)
