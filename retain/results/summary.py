"""From step records to the matrix R, the headline Summary, and the series the report plots.

The rules that turn many scores into a few numbers live here, in one place:

* the **primary** score of training task ``t`` at a record is the first score (in the record's
  insertion order) with ``role == "task"``, ``train_task == t`` and ``bounded``; it fills R;
* the **general** score of a record is the mean of its bounded general scores;
* bounded scores that are lower-is-better (an error rate) are turned into ``1 - value`` first, so
  that R and the general score are always higher-is-better, as the metrics assume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from retain.results import bootstrap, metrics
from retain.results.schema import Results, Score, StepRecord, StrategyRun, Summary

Series = tuple[str, list[float], list[float | None]]
"""A plotted line: (label, xs, ys); a None y is a gap."""


def _finite_or_none(x: float | None) -> float | None:
    """None for missing or NaN, so summaries store "not measured" one way only."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def oriented_value(score: Score) -> float:
    """A bounded score as higher-is-better: value, or 1 - value for a bounded lower-is-better one."""
    return score.value if score.higher_is_better else 1.0 - score.value


def primary_task_score(record: StepRecord, task: str) -> float | None:
    """The score that represents training task ``task`` in R at this record (None if not evaluated)."""
    for score in record.scores.values():
        if score.role == "task" and score.train_task == task and score.bounded:
            return oriented_value(score)
    return None


def general_score(record: StepRecord) -> float | None:
    """Mean of the record's bounded general scores, or None when it has none."""
    values = [oriented_value(s) for s in record.scores.values() if s.role == "general" and s.bounded]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _by_index(records: Iterable[StepRecord], n_tasks: int) -> dict[int, StepRecord]:
    """Records keyed by index, refusing duplicates and indices past the last task."""
    out: dict[int, StepRecord] = {}
    for rec in records:
        if rec.index > n_tasks:
            raise ValueError(f"record index {rec.index} exceeds the number of tasks ({n_tasks})")
        if rec.index in out:
            raise ValueError(f"two records share index {rec.index}")
        out[rec.index] = rec
    return out


def build_matrix(records: Sequence[StepRecord], task_names: Sequence[str]) -> list[list[float | None]]:
    """R as (T+1) x T nested lists: row = record.index, column j = task_names[j].

    Rows of records that are absent (an interrupted run) are all None, so R keeps its shape.
    """
    T = len(task_names)
    by_index = _by_index(records, T)
    rows: list[list[float | None]] = []
    for i in range(T + 1):
        rec = by_index.get(i)
        rows.append([None if rec is None else primary_task_score(rec, t) for t in task_names])
    return rows


def _last_trained(records: Sequence[StepRecord]) -> StepRecord | None:
    trained = [r for r in records if r.index > 0]
    return max(trained, key=lambda r: r.index) if trained else None


def _base(records: Sequence[StepRecord]) -> StepRecord | None:
    return next((r for r in records if r.index == 0), None)


def _matrix_metrics(R: list[list[float | None]]) -> dict[str, float | None]:
    if not R or not R[0]:
        return {"acc": None, "bwt": None, "fwt": None, "forgetting": None}
    values = metrics.compute_all(R, ["acc", "bwt", "fwt", "forgetting"])
    return {k: _finite_or_none(v) for k, v in values.items()}


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else None


def select_view(records: Sequence[StepRecord]) -> list[StepRecord]:
    """The records as the select part of every eval scored them (what choosers read)."""
    return [r.model_copy(update={"scores": {k: s.on("select") for k, s in r.scores.items()}}) for r in records]


def summarize(
    records: Sequence[StepRecord], task_names: Sequence[str], trainable_params: int | None = None,
    *, confidence: float = bootstrap.CONFIDENCE,
) -> Summary:
    """Headline numbers of one run; every field is None where it was not measured or is undefined.
    Intervals (paired bootstrap over the report items) where the scores carry their items."""
    R = build_matrix(records, task_names)
    base, last = _base(records), _last_trained(records)
    g_before = general_score(base) if base else None
    g_after = general_score(last) if last else None
    drift = last.drift if last else None
    memories = [r.peak_memory_bytes for r in records if r.peak_memory_bytes is not None]
    new, before = (R[-1][-1], R[0][-1]) if task_names else (None, None)
    retention = _finite_or_none(metrics.general_retention(g_before, g_after))
    gain = new - before if new is not None and before is not None else None
    intervals: dict[str, Any] = {}
    if base is not None and last is not None:
        draws = bootstrap.Draws()
        task = task_names[-1] if task_names else None
        found = {
            "general_retention_interval": bootstrap.interval(
                retention, bootstrap.retention_replicates(base, last, draws), confidence),
            "new_task_score_interval": bootstrap.interval(
                new, bootstrap.task_replicates(last, task, draws) if task else None, confidence),
            "gain_interval": bootstrap.interval(
                gain, bootstrap.gain_replicates(base, last, task, draws) if task else None, confidence),
        }
        intervals = {k: v.as_list() for k, v in found.items() if v is not None}
        if intervals:
            intervals["confidence"] = confidence
    return Summary(
        new_task_score=new,
        new_task_score_before=before,
        general_before=g_before,
        general_after=g_after,
        general_retention=retention,
        **_matrix_metrics(R),
        kl_from_base=drift.kl_from_base if drift else None,
        ppl_delta=drift.ppl_delta if drift else None,
        weight_rel_l2=drift.weight_rel_l2 if drift else None,
        task_kl=drift.task_kl if drift else None,
        seconds_per_step=_mean_or_none(r.seconds_per_step for r in records if r.index > 0),
        peak_memory_bytes=max(memories) if memories else None,
        trainable_params=trainable_params,
        gain=gain,
        **intervals,
    )


def build_run(
    name: str,
    task_names: Sequence[str],
    records: Sequence[StepRecord],
    config: dict[str, Any] | None = None,
    trainable_params: int | None = None,
) -> StrategyRun:
    """A StrategyRun with its matrix and summary filled from the records (one call for the trainer)."""
    ordered = sorted(records, key=lambda r: r.index)
    return StrategyRun(
        name=name,
        config=dict(config or {}),
        task_names=list(task_names),
        records=ordered,
        matrix=build_matrix(ordered, task_names),
        summary=summarize(ordered, task_names, trainable_params),
        select_summary=_select_summary(ordered, task_names, trainable_params),
        seed=(config or {}).get("train", {}).get("seed"),
    )


def _select_summary(records: Sequence[StepRecord], task_names: Sequence[str], trainable_params: int | None) -> Summary | None:
    """The headline numbers on the select part, when any score has one (else the run has no split)."""
    if not any(s.select is not None for r in records for s in r.scores.values()):
        return None
    return summarize(select_view(records), task_names, trainable_params)


# --- series for the plots ----------------------------------------------------------------------


def retention_series(results: Results) -> list[Series]:
    """Per strategy: general score of each record divided by the base's, over record index."""
    out: list[Series] = []
    for run in results.runs:
        base = _base(run.records)
        before = general_score(base) if base else None
        xs = [float(r.index) for r in run.records]
        ys = [_finite_or_none(metrics.general_retention(before, general_score(r))) for r in run.records]
        out.append((run.name, xs, ys))
    return out


def tradeoff_points(results: Results) -> list[tuple[str, float, float]]:
    """(strategy, new-task score, general retention) for every run that measured both."""
    points = []
    for run in results.runs:
        x, y = run.summary.new_task_score, run.summary.general_retention
        if x is not None and y is not None:
            points.append((run.name, x, y))
    return points


SWEEP_NAME = re.compile(r"^(?P<base>.+)@(?P<param>[^=@]+)=(?P<value>[^=@]+)$")
"""Sweep runs are named ``<strategy>@<param>=<value>``, e.g. ``lora+ewc@lambda=1000``."""


def _sweep_groups(results: Results) -> dict[tuple[str, str], list[tuple[float, StrategyRun]]]:
    groups: dict[tuple[str, str], list[tuple[float, StrategyRun]]] = {}
    for run in results.runs:
        match = SWEEP_NAME.match(run.name)
        if not match:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        groups.setdefault((match["base"], match["param"]), []).append((value, run))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in groups.items() if len(v) >= 2}


def sweep_series(results: Results) -> dict[str, list[Series]]:
    """Parameter sweeps found by run name, keyed by the swept parameter ("lambda").

    Each strategy swept over that parameter yields two series: its new-task score and its general
    retention against the parameter value, which is the trade-off the sweep is run to find.
    """
    out: dict[str, list[Series]] = {}
    for (base, param), runs in _sweep_groups(results).items():
        xs = [v for v, _ in runs]
        out.setdefault(param, []).extend(
            [
                (f"{base}: new task", xs, [r.summary.new_task_score for _, r in runs]),
                (f"{base}: retention", xs, [r.summary.general_retention for _, r in runs]),
            ]
        )
    return out


BUDGET_QUANTITIES = {
    "general_retention": ("min_general_retention", "general retention (subset)"),
    "kl": ("max_kl", "KL from base (nats/token)"),
    "task_forgetting": ("max_task_forgetting", "forgetting of earlier tasks (subset)"),
}
"""Measured quantity -> (its bound's name, axis label), for the budget plots."""


def budget_series(run: StrategyRun) -> tuple[list[Series], dict[str, tuple[list[Series], float]]]:
    """A budgeted run's trajectory against the global step: one series per adapted strength, and per
    bounded quantity its measured series with the bound (the line the run must stay on the right side of)."""
    if run.budget is None:
        return [], {}
    checks = run.budget.checks
    xs = [float(c.global_step) for c in checks]
    labels = list(dict.fromkeys(k for c in checks for k in c.strengths))
    strengths: list[Series] = [(label, xs, [c.strengths.get(label) for c in checks]) for label in labels]
    quantities: dict[str, tuple[list[Series], float]] = {}
    kept = [next((c for c in checks if c.task == d.task and c.step == d.kept_step), None) for d in run.budget.tasks]
    kept_checks = [c for c in kept if c is not None]
    for key, (bound, label) in BUDGET_QUANTITIES.items():
        if bound in run.budget.bounds:
            ys = [getattr(c, key) for c in checks]
            if any(y is not None for y in ys):
                marks: Series = ("kept (task end)", [float(c.global_step) for c in kept_checks], [getattr(c, key) for c in kept_checks])
                quantities[label] = ([(run.name, xs, ys), marks], run.budget.bounds[bound])
    return strengths, quantities


# --- table cells shared by the HTML and markdown summaries -------------------------------------

MISSING = "—"

SUMMARY_HEADERS = [
    "strategy",
    "new task (before → after)",
    "general (before → after)",
    "retention",
    "ACC",
    "BWT",
    "forgetting",
    "KL from base",
    "weight drift",
    "s/step",
    "peak memory",
    "trainable params",
]


def fmt_num(x: float | int | None) -> str:
    """Three decimals in the usual range, three significant digits for small or huge values.

    Small values (weight drift, KL) keep their digits: 0.00123, not 0.001. '—' when missing.
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    x = float(x)
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:.3f}"
    return f"{x:.3g}"


def fmt_bytes(n: int | None) -> str:
    """Bytes in binary units (GiB for accelerator memory), '—' when missing."""
    if n is None:
        return MISSING
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # unreachable; keeps type checkers content


def fmt_count(n: int | None) -> str:
    """Parameter counts as 350, 12.3K, 4.5M, 6.7B; '—' when missing."""
    if n is None:
        return MISSING
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def fmt_change(before: float | None, after: float | None) -> str:
    return f"{fmt_num(before)} → {fmt_num(after)}"


def fmt_interval(interval: list[float] | None) -> str:
    """`` [low, high]`` after a value (its report-part interval), or nothing without one."""
    return f" [{fmt_num(interval[0])}, {fmt_num(interval[1])}]" if interval else ""


def run_label(run: StrategyRun, results: Results | None = None) -> str:
    """The run's name, with its seed when several runs of the results share the name."""
    twins = results is not None and sum(r.name == run.name for r in results.runs) > 1
    return f"{run.name} (seed {run.seed})" if twins and run.seed is not None else run.name


def summary_cells(run: StrategyRun, results: Results | None = None) -> list[str]:
    """One formatted row of the summary table, matching SUMMARY_HEADERS; intervals (report items,
    paired bootstrap) in brackets where the run has them."""
    s = run.summary
    return [
        run_label(run, results),
        fmt_change(s.new_task_score_before, s.new_task_score) + fmt_interval(s.new_task_score_interval),
        fmt_change(s.general_before, s.general_after),
        fmt_num(s.general_retention) + fmt_interval(s.general_retention_interval),
        fmt_num(s.acc),
        fmt_num(s.bwt),
        fmt_num(s.forgetting),
        fmt_num(s.kl_from_base),
        fmt_num(s.weight_rel_l2),
        fmt_num(s.seconds_per_step),
        fmt_bytes(s.peak_memory_bytes),
        fmt_count(s.trainable_params),
    ]


AGGREGATE_HEADERS = ["strategy", "seeds", "new task after", "gain", "share of first's gain", "retention",
                     "retention seed sd", "vs first: retention", "vs first: gain"]


def _estimate_cell(estimate: Any) -> str:
    return MISSING if estimate is None else fmt_num(estimate.value) + fmt_interval(estimate.interval)


def aggregate_cells(aggregate: Any) -> list[str]:
    """One row of the over-seeds table: report-part means with crossed intervals, and the verdict of
    the paired difference to the first item ("tie" unless its interval excludes 0)."""
    def versus(key: str) -> str:
        diff = aggregate.difference.get(key)
        return MISSING if diff is None else f"{fmt_num(diff.value)}{fmt_interval(diff.interval)} {aggregate.verdict.get(key, '')}"

    retention = aggregate.general_retention
    return [
        aggregate.name, ",".join(map(str, aggregate.seeds)), _estimate_cell(aggregate.new_task_score),
        _estimate_cell(aggregate.gain), fmt_num(aggregate.share_of_reference_gain), _estimate_cell(retention),
        fmt_num(retention.seed_sd if retention is not None else None), versus("general_retention"), versus("gain"),
    ]
