"""What the strategies that mix stored rows into the task's batches share (``replay``, ``synthetic-replay``)."""

from __future__ import annotations

from retain.data.replay_buffer import RatioSchedule
from retain.strategies.base import Strategy, StrategyConfig


class RatioMixing(Strategy):
    """A strategy whose strength is ``config.ratio``, the share of rows its ``RatioSchedule`` (``self.schedule``,
    built in ``setup``) replaces with buffer rows in ``config.mode``."""

    @classmethod
    def extra_passes(cls, config: StrategyConfig, *, adapters: bool) -> float:
        """``append`` adds ratio / (1 - ratio) rows per task row (a forward and backward each); ``replace``
        trains the same rows per step."""
        mode, ratio = getattr(config, "mode", "replace"), float(getattr(config, "ratio", 0.0))
        return ratio / (1.0 - ratio) if mode == "append" else 0.0

    def set_strength(self, value: float) -> None:
        """A new ratio applies to the rows trained from now on: the schedule restarts its count (keeping the
        old count would replace whole batches until the new share of all earlier rows was caught up)."""
        super().set_strength(value)
        if getattr(self, "schedule", None) is not None:
            self.schedule = RatioSchedule(self.config.ratio, self.config.mode)  # type: ignore[attr-defined]
