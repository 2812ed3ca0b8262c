"""Run participants: what takes part in a run beside the strategies (evaluation, a forgetting budget).

This lives in ``eval`` because evaluation is the lowest layer that takes part in a run (the suite
observer); the budget (``retain.train.budgeted``) and the recipe sit above it.

A strategy changes what the model learns; a participant watches the run and may decide its course. The
recipe (``retain.train.run``) calls every participant at the same few points, in list order, and reads
back a :class:`Decision` where a participant may end the run. Nothing crosses the training loop as an
exception: a budget that wants the run to stop says so in its return value, and the recipe stops at
the next boundary it owns (after the step, or after the task's outputs).

Points, per run::

    on_start(base model)                 before any strategy wraps the model (also on resume)
    load_state_dict(state)               on resume, before the strategies load theirs
    per task:
      on_task_start(model, task)         after before_task (a task that resumes mid-way skips it)
      on_step_end(model, task, step) -> Decision   after each optimizer step, before its checkpoint
      on_train_end(model, task)          the task's steps are done, before the strategies consolidate
                                         (a budget restores its kept point here)
      on_task_end(model, task, stats) -> Decision   after consolidation and the task's outputs
      checkpoint: state_dict(), checkpoint_meta(); then after_checkpoint()
    on_run_end(outcome)                  after the final model is written
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import nn

from retain.errors import GateError

#: ``ctx`` is the run's ``retain.strategies.StrategyContext`` and ``task`` its ``TaskInfo`` (a layer above).
Context = Any
Task = Any


@dataclass(frozen=True)
class Decision:
    """What a participant wants of the run after a step or a task: go on, or stop with ``error``."""

    stop: GateError | None = None

    @property
    def stops(self) -> bool:
        return self.stop is not None


GO_ON = Decision()


def first_stop(decisions: list[Decision]) -> Decision:
    """The first decision that stops the run, else ``GO_ON``."""
    return next((d for d in decisions if d.stops), GO_ON)


class Participant(Protocol):
    """Every point the recipe calls. Each is a no-op here, so a participant that subclasses this writes
    only the ones it needs (as a strategy does).

    ``name`` keys the participant's state in checkpoints (``<name>.json`` beside the weights); a
    participant without state returns None from ``state_dict``.
    """

    name: ClassVar[str] = ""

    def on_start(self, model: nn.Module, ctx: Context) -> None:
        return None

    def on_task_start(self, model: nn.Module, ctx: Context, task: Task) -> None:
        return None

    def on_step_end(self, model: nn.Module, ctx: Context, task: Task, step: int, *, stopping: bool) -> Decision:
        """``step``: the steps of ``task`` done so far (from 1); ``stopping``: the run stops after this step
        (Ctrl-C), so optional work may be skipped."""
        return GO_ON

    def on_train_end(self, model: nn.Module, ctx: Context, task: Task) -> None:
        return None

    def on_task_end(self, model: nn.Module, ctx: Context, task: Task, stats: Any) -> Decision:
        return GO_ON

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        return None

    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON-able facts the checkpoint's ``meta.json`` keeps (read without loading the checkpoint)."""
        return {}

    def after_checkpoint(self) -> None:
        return None

    def on_run_end(self, outcome: Any) -> None:
        return None
