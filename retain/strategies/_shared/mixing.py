"""What the strategies that mix stored rows into the task's batches share (``replay``, ``synthetic-replay``)."""

from __future__ import annotations

from retain.data.replay_buffer import RatioSchedule
from retain.strategies.base import Strategy


class RatioMixing(Strategy):
    """A strategy whose strength is ``config.ratio``, the share of rows its ``RatioSchedule`` (``self.schedule``,
    built in ``setup``) replaces with buffer rows in ``config.mode``."""

    def set_strength(self, value: float) -> None:
        """A new ratio applies to the rows trained from now on: the schedule restarts its count (keeping the
        old count would replace whole batches until the new share of all earlier rows was caught up)."""
        super().set_strength(value)
        if getattr(self, "schedule", None) is not None:
            self.schedule = RatioSchedule(self.config.ratio, self.config.mode)  # type: ignore[attr-defined]
