"""A hybrid is a list of strategies: each hook runs them in list order and combines their returns."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from retain.strategies.base import Batch, Strategy, StrategyContext, TaskInfo
from retain.strategies.registry import check_compatible


class Hybrid:
    """Runs the hooks of several strategies as one.

    - ``setup`` chains the model through each strategy in list order.
    - ``transform_batch`` passes the batch through each transform in turn.
    - ``extra_losses`` collects every strategy's named terms as ``"<strategy>/<term>"`` so each is
      logged on its own and none can silently overwrite another.
    """

    def __init__(self, strategies: list[Strategy]) -> None:
        check_compatible(strategies)
        self.strategies = strategies

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.strategies)

    @property
    def modifies_frozen_weights(self) -> bool:
        return any(s.modifies_frozen_weights for s in self.strategies)

    def optimizer_settings(self) -> dict[str, Any]:
        """Every strategy's ``train`` optimizer keys, merged in list order (what the loop's optimizer takes)."""
        settings: dict[str, Any] = {}
        for strategy in self.strategies:
            settings.update(strategy.optimizer_settings())
        return settings

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        for strategy in self.strategies:
            model = strategy.setup(model, ctx)
            ctx.model = model
        return model

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        for strategy in self.strategies:
            strategy.before_task(task, ctx)

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        for strategy in self.strategies:
            batch = strategy.transform_batch(batch, ctx)
        return batch

    def extra_losses(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for strategy in self.strategies:
            for key, value in strategy.extra_losses(outputs, batch, ctx).items():
                terms[f"{strategy.name}/{key}"] = value
        return terms

    def after_backward(self, model: nn.Module, ctx: StrategyContext) -> None:
        for strategy in self.strategies:
            strategy.after_backward(model, ctx)

    def after_step(self, model: nn.Module, ctx: StrategyContext) -> None:
        for strategy in self.strategies:
            strategy.after_step(model, ctx)

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        for strategy in self.strategies:
            strategy.after_task(task, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {s.name: s.state_dict() for s in self.strategies}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        for strategy in self.strategies:
            strategy.load_state_dict(state.get(strategy.name, {}), ctx)
