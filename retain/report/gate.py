"""A quality gate over a results file: bounds a CI job can enforce, with readable violations.

``check_gate`` only reports; turning violations into an exit code is the CLI's job.
"""

from __future__ import annotations

from retain.results.schema import Results, StrategyRun
from retain.results.summary import fmt_num


def _measured_forgetting(run: StrategyRun) -> tuple[str, float | None]:
    """What ``max_forgetting`` bounds for this run, and its name in messages.

    With two or more tasks it is the Chaudhry forgetting F_T over the task sequence. With a single
    task there is no earlier task to forget, so it is the drop of the general suite instead,
    1 - general_retention (0.2 = lost a fifth of the base model's general score).
    """
    if len(run.task_names) >= 2:
        return "forgetting", run.summary.forgetting
    retention = run.summary.general_retention
    return "general drop (1 - retention)", None if retention is None else 1.0 - retention


def _check(name: str, label: str, value: float | None, bound: float | None, is_max: bool) -> str | None:
    if bound is None:
        return None
    kind = "max" if is_max else "min"
    if value is None:
        return f"{name}: {label} not measured ({kind} {fmt_num(bound)})"
    if (value > bound) if is_max else (value < bound):
        op = ">" if is_max else "<"
        return f"{name}: {label} {fmt_num(value)} {op} {kind} {fmt_num(bound)}"
    return None


def _run_violations(
    run: StrategyRun,
    max_forgetting: float | None,
    min_new_task: float | None,
    min_general_retention: float | None,
    max_kl: float | None,
) -> list[str]:
    s = run.summary
    label, forgot = _measured_forgetting(run)
    checks = [
        _check(run.name, label, forgot, max_forgetting, is_max=True),
        _check(run.name, "new-task score", s.new_task_score, min_new_task, is_max=False),
        _check(run.name, "general retention", s.general_retention, min_general_retention, is_max=False),
        _check(run.name, "KL from base", s.kl_from_base, max_kl, is_max=True),
    ]
    return [c for c in checks if c]


def check_gate(
    results: Results,
    *,
    max_forgetting: float | None = None,
    min_new_task: float | None = None,
    min_general_retention: float | None = None,
    max_kl: float | None = None,
    strategy: str | None = None,
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
    """
    runs = results.runs if strategy is None else [r for r in results.runs if r.name == strategy]
    if strategy is not None and not runs:
        known = ", ".join(r.name for r in results.runs) or "none"
        return [f"{strategy}: no such strategy in the results (have: {known})"]
    if not runs:
        return ["results contain no strategy runs"]
    violations: list[str] = []
    for run in runs:
        violations += _run_violations(run, max_forgetting, min_new_task, min_general_retention, max_kl)
    return violations
