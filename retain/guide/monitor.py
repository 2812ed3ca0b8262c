"""Watching a trial while it trains: intermediate (new-task score, general retention), and when to give up.

A trial is scored on a reduced suite (the general evals and the current task's) every
``eval.every_n_steps`` steps and at the end of every task but the last. The pruning rules are small
pure functions so they can be checked by hand:

- with a retention floor R: optuna's median rule compares its floor-aware score with earlier trials
  at the same step. No trial is cut for its retention alone: retention does not only fall as training
  goes on (protected runs recover as the learning rate decays: full+replay on stories-contracts keeps
  0.809 at step 20 of a 40-step trial and 0.905 after 300 steps);
- without a floor (two objectives): a trial that a finished trial beat on both scores, by a margin, at
  the same step is hopeless.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from retain.eval.participant import GO_ON, Decision, Participant
from retain.eval.runner import SuiteObserver, step_eval_due
from retain.eval.suite import SuiteConfig, evaluate_suite
from retain.results import metrics
from retain.results.schema import Score, StepRecord
from retain.results.summary import general_score, primary_task_score

#: how far below the floor an intermediate retention may be before the trial is cut
RETENTION_SLACK = 0.02
#: how much better on both scores a finished trial must have been to call a running one hopeless
DOMINANCE_MARGIN = 0.01

Point = tuple[float, float]


def floor_value(new_task: float, retention: float, floor: float) -> float:
    """The single-objective score of a point under a retention floor: its new-task score when it keeps
    the floor (within the slack), else that score minus one, so any point that keeps the floor ranks
    above every point that does not."""
    return new_task if retention >= floor - RETENTION_SLACK else new_task - 1.0


def dominated(point: Point, others: list[Point], margin: float = DOMINANCE_MARGIN) -> bool:
    """Whether some other point is better on both coordinates by at least ``margin``."""
    return any(o[0] >= point[0] + margin and o[1] >= point[1] + margin for o in others)


def intermediate_suite(suite: SuiteConfig, task: str) -> SuiteConfig:
    """The evals that decide the two numbers at a mid-task point: general ones and the current task's."""
    tasks = [t for t in suite.tasks if t.role == "general" or t.train_task == task]
    return SuiteConfig(tasks=tasks)


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
        suite = self._suites.setdefault(task.name, intermediate_suite(self.inner.suite, task.name))
        unwrapped = ctx.unwrapped_model
        scores = evaluate_suite(unwrapped, ctx.tokenizer, suite, self.inner.batch_size)
        unwrapped.train()
        self.report(ctx.global_step, *point_from_scores(self.inner.base_scores, scores, task.name))

    def on_task_end(self, model: nn.Module, ctx: Any, task: Any, stats: Any) -> Decision:
        self.inner.on_task_end(model, ctx, task, stats)
        if task.index < len(ctx.tasks) - 1:
            record = self.inner.records[task.index + 1]
            self.report(ctx.global_step, *point_from_scores(self.inner.base_scores, record.scores, task.name))
        return GO_ON
