"""Full fine-tuning: every weight trains. The forgetting reference every other strategy is judged by."""

from __future__ import annotations

from torch import nn

from retain.strategies.base import Strategy, StrategyContext
from retain.strategies.registry import register_strategy


@register_strategy("full")
class FullFineTuning(Strategy):
    supports_sharding = True
    wraps_model = True

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
