"""L2 to the starting weights: ``lambda/2 * ||theta - theta_0||^2`` over the trainable weights.

``theta_0`` is the trainable weights when the first task starts (the base model with ``full``; the
fresh adapters with ``lora``). Every weight counts the same, which is exactly what the
importance-weighted regularizers (ewc, ewc-lora, importance) claim to improve on: they must beat
this baseline at the same budget to earn their cost. State: one copy of the trainable weights.

Default ``lambda_ = 0.1``: on ``retain bench stories-contracts`` (300 steps, full fine-tuning) it keeps
76% of full fine-tuning's new-task gain with 57% of its forgetting; 0.3 keeps 59% / 48%, 1 keeps 33% /
28% (``bench/strength_sweep.py``). Its scale depends on how far the weights move (learning rate,
steps), not on the data.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field
from torch import Tensor, nn

from retain.losses.quadratic import quadratic_penalty
from retain.models.sharding import is_sharded, local_dict, sharded_parameters, summed_over_shards
from retain.strategies._shared.calibration import check_same_parameters, detached_copy, on_device
from retain.strategies.base import Strategy, StrategyConfig, StrategyContext, Strength, TaskInfo
from retain.strategies.registry import register_strategy


class L2Config(StrategyConfig):
    lambda_: float = Field(
        0.1,
        ge=0,
        validation_alias=AliasChoices("lambda_", "lambda"),
        description="Penalty strength (0.1: the knee of the stories-contracts sweep, bench/strength_sweep.py).",
    )


@register_strategy("l2")
class L2ToBase(Strategy):
    supports_sharding = True  # the anchor is sharded like the weights
    Config = L2Config
    strength = Strength("lambda_", 1e-3, 1e3)
    quadratic_state = True

    def __init__(self, config: L2Config | None = None) -> None:
        super().__init__(config)
        self.anchor: dict[str, Tensor] | None = None
        self._params: dict[str, nn.Parameter] | None = None
        self._sharded = False

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        params = self._live(ctx)
        if self.anchor is None:
            self.anchor = detached_copy(params)

    def extra_losses(self, outputs: Any, batch: dict[str, Tensor], ctx: StrategyContext) -> dict[str, Tensor]:
        if self.anchor is None or self.config.lambda_ == 0:
            return {}
        partial = quadratic_penalty(local_dict(self._live(ctx)), local_dict(self.anchor))  # each process its rows
        return {"penalty": 0.5 * self.config.lambda_ * summed_over_shards(partial, self._sharded)}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor} if self.anchor is not None else {}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self.anchor = dict(state["anchor"]) if "anchor" in state else None
        self._params = None

    def _live(self, ctx: StrategyContext) -> dict[str, nn.Parameter]:
        if self._params is None:
            self._params = sharded_parameters(ctx.unwrapped_model)
            self._sharded = is_sharded(ctx.unwrapped_model)
            if self.anchor is not None:
                check_same_parameters(self.anchor, self._params, self.name)
                self.anchor = on_device(self.anchor, self._params)
        return self._params
