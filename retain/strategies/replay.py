"""Replay: mix a small share of earlier tasks' examples, or of a general pool, into every batch.

Ibrahim et al. 2024 (continual pre-training) find even 1% replay helps, 5% suffices for weak shifts
and 25-50% is needed for strong ones. The default is 25%, measured: on ``retain bench stories-contracts``
(300 steps, general replay into full fine-tuning, a strong shift) 25% keeps 94% of full fine-tuning's
new-task gain with 13% of its forgetting; 5% keeps 98% / 45%, 1% keeps 100% / 82%
(``bench/strength_sweep.py``).

Where the rows come from: a bounded :class:`~retain.data.replay_buffer.ReplayBuffer`. After each task its
training examples are streamed into the buffer (reservoir sampling, so the buffer keeps a uniform sample
however long the task); a general pool (this strategy's ``data``, or the run's ``general_data``) is
streamed in before the first task. The buffer splits its capacity evenly across sources and draws rows
round-robin across them, so every earlier task (and the general pool) is replayed equally.

How rows are mixed (``mode``):
- ``replace`` (default): replayed rows take the place of the batch's last rows. The batch keeps its size,
  so memory and step time stay those of the run without replay; the new task sees ``1 - ratio`` of the
  rows it would otherwise see.
- ``append``: replayed rows are added after the task rows. Every task row is kept; a step costs up to
  ``1 + ratio / (1 - ratio)`` times as much.
Either way replayed rows are cut to the batch's width (or ``max_length``), so replaying long general
text into a short-sequence task cannot blow up a step.

The buffer, its generator state and the ratio counters are in ``state_dict``, so a killed run resumes
with exactly the rows the uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from retain.config import DataConfig, RunConfig
from retain.data.replay_buffer import RatioSchedule, ReplayBuffer, mix_from_buffer
from retain.data.sampling import Stream
from retain.strategies._shared.mixing import RatioMixing
from retain.strategies.base import (
    Batch,
    StrategyConfig,
    StrategyContext,
    Strength,
    TaskInfo,
    has_general_text,
)
from retain.strategies.registry import register_strategy

GENERAL_SOURCE = "@general"  # cannot clash with a task name used as a source


class ReplayConfig(StrategyConfig):
    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="Share of all trained rows that are replayed (0.25: the stories-contracts knee).")
    mode: Literal["replace", "append"] = Field(
        "replace", description="replace: replayed rows take the place of task rows (same step cost); append: added."
    )
    source: Literal["auto", "past_tasks", "general", "both"] = Field(
        "auto",
        description="auto: earlier tasks, plus the general pool when `data` or the run's general_data is set.",
    )
    data: DataConfig | None = Field(None, description="General pool to replay; default: the run's general_data.")
    buffer_size: int = Field(1000, gt=0, description="Examples kept in the buffer, split evenly across sources.")
    max_length: int | None = Field(
        None, gt=1, description="Cut replayed rows to this many tokens; default: the current batch's width."
    )
    seed: int | None = Field(None, description="Seed of the buffer's generator; default: train.seed.")


@register_strategy("replay")
class Replay(RatioMixing):
    supports_sharding = True  # host-side mixing of batches only
    Config = ReplayConfig
    strength = Strength("ratio", 0.01, 0.9)  # a strong shift may need most rows replayed to hold a budget

    @classmethod
    def stores_real_data(cls, config: StrategyConfig) -> bool:
        return True

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        general = has_general_text(self.config.data, run)
        if self.config.source in ("general", "both") and not general:
            return [
                f"source: {self.config.source} needs text to replay: set general_data or {where}.data; "
                f"or set {where}.source: past_tasks"
            ]
        if not self._uses_general(run) and len(run.tasks) < 2:
            return [
                f"source: {self.config.source} replays earlier tasks, and this run has one task, so nothing would "
                f"be replayed. Set general_data or {where}.data to replay general text, or add a task"
            ]
        return []

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        self.buffer = ReplayBuffer(self.config.buffer_size, seed=ctx.seed_for(self, Stream.REPLAY_BUFFER))
        self.schedule = RatioSchedule(self.config.ratio, self.config.mode)
        return model

    def _uses_general(self, run: RunConfig) -> bool:
        if self.config.source in ("general", "both"):
            return True
        return self.config.source == "auto" and has_general_text(self.config.data, run)

    def _uses_past_tasks(self) -> bool:
        return self.config.source in ("auto", "past_tasks", "both")

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self._uses_general(ctx.config) and GENERAL_SOURCE not in self.buffer.sources:
            self.buffer.extend(GENERAL_SOURCE, ctx.general_examples(self.config.data, self.name))

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        mixed, k = mix_from_buffer(batch, self.buffer, self.schedule, ctx.tokenizer.pad_token_id, self.config.max_length)
        if len(self.buffer):
            ctx.log("replay/realised_ratio", self.schedule.realised)
        return mixed

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self._uses_past_tasks():
            self.buffer.extend(task.name, task.train_examples)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        if state:
            self.buffer.load_state_dict(state["buffer"])
            self.schedule.load_state_dict(state["schedule"])
