"""A quality gate over a results file: bounds a CI job can enforce, with readable violations.

With ``confidence`` (default 0.95) a bound holds only if the worse end of the measured value's paired
bootstrap interval (report items, ``retain.results.bootstrap``) meets it: a model whose retention
interval is [0.975, 0.989] does not pass a 0.98 floor. Values without items (KL, multi-task forgetting)
are checked as point estimates and the message says so. ``confidence=0`` checks point estimates.
A missing or non-finite value fails the bound it is checked against.

``check_gate`` only reports; turning violations into an exit code is the CLI's job.
"""

from __future__ import annotations

import math

from retain.results.schema import Results, StrategyRun, Summary
from retain.results.summary import fmt_interval, fmt_num, summarize


def _worse_end(value: float | None, interval: list[float] | None, is_max: bool) -> float | None:
    """The end of the interval a bound is checked against: the high end for a ceiling, the low for a floor."""
    if interval is None:
        return value
    return interval[1] if is_max else interval[0]


def _check(name: str, label: str, value: float | None, bound: float | None, is_max: bool,
           interval: list[float] | None = None, confidence: float = 0.0) -> str | None:
    if bound is None:
        return None
    kind = "max" if is_max else "min"
    if value is None:
        return f"{name}: {label} not measured ({kind} {fmt_num(bound)})"
    if not math.isfinite(value):
        return f"{name}: {label} is {value} (not a finite number), which fails {kind} {fmt_num(bound)}"
    if confidence > 0 and interval is None:
        return (f"{name}: {label} {fmt_num(value)} has no interval (a results file from before schema 1.2, or an "
                f"eval without per-item scores): rerun, or pass --confidence 0 to check point estimates "
                f"({kind} {fmt_num(bound)})")
    checked = _worse_end(value, interval, is_max)
    assert checked is not None
    if (checked > bound) if is_max else (checked < bound):
        op = ">" if is_max else "<"
        where = (f" (the {'upper' if is_max else 'lower'} end of {fmt_num(value)}{fmt_interval(interval)}, "
                 f"{confidence:.0%} interval)") if interval is not None else ""
        return f"{name}: {label} {fmt_num(checked)}{where} {op} {kind} {fmt_num(bound)}"
    return None


def _point(name: str, label: str, value: float | None, bound: float | None, is_max: bool, confidence: float) -> str | None:
    """A value without items: checked as a point estimate, and said so when intervals were asked for."""
    found = _check(name, label, value, bound, is_max)
    return f"{found} (point estimate)" if found and confidence > 0 and value is not None else found


def _run_violations(
    run: StrategyRun,
    max_forgetting: float | None,
    min_new_task: float | None,
    min_general_retention: float | None,
    max_kl: float | None,
    confidence: float,
) -> list[str]:
    s = summarize(run.records, run.task_names, confidence=confidence) if confidence > 0 else run.summary
    s = s.model_copy(update={"kl_from_base": run.summary.kl_from_base}) if run.records else run.summary
    retention = _interval(s, "general_retention_interval", confidence)
    checks = [
        _forgetting(run, s, max_forgetting, retention, confidence),
        _check(run.name, "new-task score", s.new_task_score, min_new_task, False,
               _interval(s, "new_task_score_interval", confidence), confidence),
        _check(run.name, "general retention", s.general_retention, min_general_retention, False, retention, confidence),
        _point(run.name, "KL from base", s.kl_from_base, max_kl, True, confidence),
    ]
    return [c for c in checks if c]


def _interval(summary: Summary, key: str, confidence: float) -> list[float] | None:
    return getattr(summary, key) if confidence > 0 else None


def _forgetting(run: StrategyRun, s: Summary, bound: float | None, retention: list[float] | None,
                confidence: float) -> str | None:
    """What ``max_forgetting`` bounds: with two or more tasks the Chaudhry forgetting F_T (a point
    estimate); with one task the drop of the general suite, 1 - general_retention (0.2 = lost a fifth of
    the base model's general score), whose worse end is 1 - the retention interval's low end."""
    if len(run.task_names) >= 2:
        return _point(run.name, "forgetting", s.forgetting, bound, True, confidence)
    drop = None if s.general_retention is None else 1.0 - s.general_retention
    interval = [1.0 - retention[1], 1.0 - retention[0]] if retention is not None else None
    return _check(run.name, "general drop (1 - retention)", drop, bound, True, interval, confidence)


def check_gate(
    results: Results,
    *,
    max_forgetting: float | None = None,
    min_new_task: float | None = None,
    min_general_retention: float | None = None,
    max_kl: float | None = None,
    strategy: str | None = None,
    confidence: float = 0.95,
) -> list[str]:
    """Human-readable violations of the given bounds (empty list = the gate passes).

    Each message names the strategy, the quantity, its measured value and the bound, e.g.
    ``"lora: general retention 0.620 < min 0.800"``. A bounded quantity that was not measured is a
    violation too ("not measured"), so a broken eval cannot pass the gate silently.

    * ``max_forgetting`` bounds the ``forgetting`` summary field (Chaudhry F_T) when the run has
      T >= 2 tasks; for a single task it bounds the general-suite drop, 1 - general_retention.
    * ``min_new_task`` bounds ``new_task_score`` (last task's primary score after training).
    * ``min_general_retention`` bounds ``general_retention`` (general after / before).
    * ``max_kl`` bounds ``kl_from_base`` (KL(base || model) after the last task).
    * ``strategy`` restricts the gate to the run of that name; an unknown name is a violation.
    * ``confidence``: bounds are checked against the worse end of the interval at this level (0: the
      point estimate); see the module docstring.
    """
    runs = results.runs if strategy is None else [r for r in results.runs if r.name == strategy]
    if strategy is not None and not runs:
        known = ", ".join(r.name for r in results.runs) or "none"
        return [f"{strategy}: no such strategy in the results (have: {known})"]
    if not runs:
        return ["results contain no strategy runs"]
    violations: list[str] = []
    for run in runs:
        violations += _run_violations(run, max_forgetting, min_new_task, min_general_retention, max_kl, confidence)
    return violations
