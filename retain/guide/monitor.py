"""Watching a trial while it trains: intermediate (new-task score, general retention), and when to give up.

A trial is scored on a reduced suite (the general evals and the current task's), on the ``select`` part
of each eval only (what chooses never reads what is reported), every ``eval.every_n_steps`` steps and at
the end of every task but the last. Whether to stop it is one pure function, :func:`prune_reason`:

- dominance: a finished trial beat it on both scores, by ``DOMINANCE_MARGIN``, at the same step. This is
  the only rule that may stop a trial below the retention floor;
- with a retention floor R: a point that keeps R (retention >= R) may be stopped when its new-task
  score is below the median of at least ``MEDIAN_MIN_TRIALS`` finished trials that kept R at that step.

No trial is stopped for its retention alone: retention does not only fall as training goes on
(protected runs recover as the learning rate decays: full+replay on stories-contracts keeps 0.809 at
step 20 of a 40-step trial and 0.905 after 300 steps), and a trial that keeps less may still be the
one the confirmation at the full budget picks.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

from torch import nn

from retain.eval.participant import GO_ON, Decision, Participant
from retain.eval.runner import SuiteObserver, step_eval_due
from retain.eval.suite import SuiteConfig, evaluate_suite
from retain.results import metrics
from retain.results.schema import Score, StepRecord
from retain.results.summary import general_score, primary_task_score

#: how much better on both scores a finished trial must have been to call a running one hopeless
DOMINANCE_MARGIN = 0.01
#: finished trials that kept the floor at a step before their median may stop a trial that keeps it too
MEDIAN_MIN_TRIALS = 3

Point = tuple[float, float]
"""(new-task score, general retention), both higher-is-better, on the select part."""


def dominated(point: Point, others: list[Point], margin: float = DOMINANCE_MARGIN) -> bool:
    """Whether some other point is better on both coordinates by at least ``margin``."""
    return any(o[0] >= point[0] + margin and o[1] >= point[1] + margin for o in others)


def prune_reason(point: Point, finished: list[Point], floor: float | None) -> str | None:
    """Why a running trial at ``point`` should stop, or None to let it go on. ``finished``: the points
    of finished trials at the same step. Never a reason about retention alone (see the module doc)."""
    if dominated(point, finished):
        return f"beaten on both scores by {DOMINANCE_MARGIN:g}+ by a finished trial"
    if floor is None or point[1] < floor:
        return None
    kept = sorted(p[0] for p in finished if p[1] >= floor)
    if len(kept) < MEDIAN_MIN_TRIALS:
        return None
    median = statistics.median(kept)
    if point[0] < median:
        return (f"keeps the floor {floor:g} but its new-task score {point[0]:.3f} is below the median {median:.3f} "
                f"of the {len(kept)} finished trials that kept it")
    return None


def intermediate_suite(suite: SuiteConfig, task: str) -> SuiteConfig:
    """The evals that decide the two numbers at a mid-task point: general ones and the current task's
    (with the suite's own split, so their select items are those of the full suite)."""
    tasks = [t for t in suite.tasks if t.role == "general" or t.train_task == task]
    return SuiteConfig(tasks=tasks, split=suite.split)


def select_scores(scores: dict[str, Score]) -> dict[str, Score]:
    """Scores as the select part read them (a run's records hold the report part, the select value beside it)."""
    return {k: s.on("select") for k, s in scores.items()}


def point_from_scores(base: dict[str, Score], scores: dict[str, Score], task: str) -> tuple[float | None, float | None]:
    """(task's primary score, general retention) of a set of scores against the base model's."""
    now = StepRecord(index=1, scores=scores)
    before = general_score(StepRecord(index=0, scores=base))
    retention = metrics.general_retention(before, general_score(now))
    return primary_task_score(now, task), retention


class TrialObserver(Participant):
    """A run observer around the SuiteObserver: the same results, plus ``report(step, new_task, retention)``
    at intermediate points (which may raise ``optuna.TrialPruned`` to stop the run)."""

    name = "trial"

    def __init__(self, inner: SuiteObserver, report: Callable[[int, float | None, float | None], None]) -> None:
        self.inner = inner
        self.report = report
        self._suites: dict[str, SuiteConfig] = {}

    @property
    def suite(self) -> SuiteConfig:
        return self.inner.suite

    def set_budget(self, budget: Any) -> None:
        self.inner.set_budget(budget)

    def record_warnings(self, warnings: list[str]) -> None:
        self.inner.record_warnings(warnings)

    def on_start(self, model: nn.Module, ctx: Any) -> None:
        self.inner.on_start(model, ctx)

    def on_run_end(self, outcome: Any) -> None:
        self.inner.on_run_end(outcome)

    def on_step_end(self, model: nn.Module, ctx: Any, task: Any, step: int, *, stopping: bool) -> Decision:
        if step_eval_due(ctx, step) and not stopping and step < task.steps:  # a task end is scored by on_task_end
            self.score_step(ctx, task)
        return GO_ON

    def score_step(self, ctx: Any, task: Any) -> None:
        """A mid-task point on the select part only, against the base model's select values."""
        suite = self._suites.setdefault(task.name, intermediate_suite(self.inner.suite, task.name))
        unwrapped = ctx.unwrapped_model
        scores = evaluate_suite(unwrapped, ctx.tokenizer, suite, self.inner.batch_size, part="select")
        unwrapped.train()
        self.report(ctx.global_step, *point_from_scores(select_scores(self.inner.base_scores), scores, task.name))

    def on_task_end(self, model: nn.Module, ctx: Any, task: Any, stats: Any) -> Decision:
        self.inner.on_task_end(model, ctx, task, stats)
        if task.index < len(ctx.tasks) - 1:
            record = self.inner.records[task.index + 1]
            self.report(ctx.global_step, *point_from_scores(
                select_scores(self.inner.base_scores), select_scores(record.scores), task.name))
        return GO_ON
