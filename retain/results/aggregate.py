"""One bench item over several training seeds: means with crossed intervals, and paired differences.

Every seed of every item is scored on the same report items (the split does not depend on the training
seed), and seed ``s`` gives every item the same data order, so two items are compared seed by seed and
item by item (``retain.results.bootstrap``). A difference is called a win only when its interval
excludes 0; otherwise the verdict is "tie".
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import numpy as np

from retain.results import bootstrap
from retain.results.schema import Aggregate, Estimate, StepRecord, StrategyRun

#: figure -> (point of one run, replicates of one run)
Figure = Callable[[StrategyRun, bootstrap.Draws], tuple[float | None, np.ndarray | None]]


def _ends(run: StrategyRun) -> tuple[StepRecord | None, StepRecord | None]:
    base = next((r for r in run.records if r.index == 0), None)
    trained = [r for r in run.records if r.index > 0]
    return base, (max(trained, key=lambda r: r.index) if trained else None)


def _retention(run: StrategyRun, draws: bootstrap.Draws) -> tuple[float | None, np.ndarray | None]:
    base, last = _ends(run)
    if base is None or last is None:
        return None, None
    return run.summary.general_retention, bootstrap.retention_replicates(base, last, draws)


def _new_task(run: StrategyRun, draws: bootstrap.Draws) -> tuple[float | None, np.ndarray | None]:
    _, last = _ends(run)
    if last is None or not run.task_names:
        return None, None
    return run.summary.new_task_score, bootstrap.task_replicates(last, run.task_names[-1], draws)


def _gain(run: StrategyRun, draws: bootstrap.Draws) -> tuple[float | None, np.ndarray | None]:
    base, last = _ends(run)
    if base is None or last is None or not run.task_names:
        return None, None
    return run.summary.gain, bootstrap.gain_replicates(base, last, run.task_names[-1], draws)


FIGURES: dict[str, Figure] = {"general_retention": _retention, "new_task_score": _new_task, "gain": _gain}


def _estimate(points: Sequence[float | None], replicates: Sequence[np.ndarray | None]) -> Estimate | None:
    found = bootstrap.over_seeds(points, replicates)
    if found is None:
        return None
    values = [float(p) for p in points if p is not None]
    return Estimate(value=found.value, interval=[found.low, found.high],
                    seed_sd=statistics.stdev(values) if len(values) > 1 else None, per_seed=values)


def aggregate_seeds(runs: Sequence[StrategyRun]) -> list[Aggregate]:
    """Per item (runs sharing a name, in first-seen order), over the seeds it ran with."""
    by_name: dict[str, list[StrategyRun]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    draws = bootstrap.Draws()
    figures = {name: {key: [fig(r, draws) for r in group] for key, fig in FIGURES.items()} for name, group in by_name.items()}
    reference = next(iter(by_name), None)
    out = []
    for name, group in by_name.items():
        mine = figures[name]
        aggregate = Aggregate(
            name=name, seeds=[int(r.seed) if r.seed is not None else -1 for r in group],
            **{key: _estimate([p for p, _ in mine[key]], [x for _, x in mine[key]]) for key in FIGURES},
            select=_select_means(group),
        )
        if reference is not None and name != reference:
            aggregate.versus = reference
            _compare(aggregate, group, by_name[reference], mine, figures[reference])
        out.append(aggregate)
    ref = next((a for a in out if a.name == reference), None)
    for aggregate in out:
        if ref is not None and ref.gain is not None and aggregate.gain is not None and ref.gain.value:
            aggregate.share_of_reference_gain = aggregate.gain.value / ref.gain.value
    return out


def _select_means(group: Sequence[StrategyRun]) -> dict[str, float]:
    means = {}
    for key in ("general_retention", "new_task_score", "gain"):
        values = [getattr(r.select_summary, key) for r in group if r.select_summary is not None]
        values = [v for v in values if v is not None]
        if values:
            means[key] = float(np.mean(values))
    return means


def _compare(aggregate: Aggregate, group: Sequence[StrategyRun], reference: Sequence[StrategyRun],
             mine: dict, theirs: dict) -> None:
    """Differences to the reference item, paired seed by seed (only seeds both ran)."""
    ref_seed = {r.seed: i for i, r in enumerate(reference)}
    pairs = [(i, ref_seed[r.seed]) for i, r in enumerate(group) if r.seed in ref_seed]
    for key in FIGURES:
        points, reps = [], []
        for i, j in pairs:
            (a, xa), (b, xb) = mine[key][i], theirs[key][j]
            points.append(None if a is None or b is None else a - b)
            reps.append(None if xa is None or xb is None else xa - xb)
        estimate = _estimate(points, reps) if pairs else None
        if estimate is not None:
            aggregate.difference[key] = estimate
            low, high = estimate.interval or [float("nan"), float("nan")]
            aggregate.verdict[key] = bootstrap.verdict(
                bootstrap.Interval(estimate.value, low, high), aggregate.name, str(aggregate.versus))
