"""MoFO as a strategy: the run's optimizer becomes MoFO (Chen et al. 2024, arXiv 2407.20999), which
moves only the ``fraction`` of each weight matrix's entries with the largest momentum per step.

It adds no loss and wraps nothing: it is listed beside whatever decides which weights train
(``full+mofo``, ``full+lwf+mofo``, ``freeze+mofo``). As a strategy its fraction is a declared
:class:`~retain.strategies.base.Strength`, so ``retain tune`` searches ``mofo.fraction`` and a
forgetting budget moves it during a run (a smaller fraction moves fewer entries: more protection).
The optimizer itself is ``retain.train.optim.MoFO``; ``train.optimizer: mofo`` with
``train.mofo_fraction`` is the same optimizer at a fixed fraction, and both spellings at one fraction
train the same weights, bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from retain.strategies.base import Strategy, StrategyConfig, Strength
from retain.strategies.registry import register_strategy

if TYPE_CHECKING:
    from retain.config import RunConfig


class MofoConfig(StrategyConfig):
    fraction: float = Field(
        0.15, gt=0, le=1,
        description="Share of each weight matrix's entries (largest |momentum|) updated per step (the authors' 0.15; "
                    "they recommend 0.05-0.2). Biases and norms take the full step.",
    )


@register_strategy("mofo")
class Mofo(Strategy):
    Config = MofoConfig
    strength = Strength("fraction", low=0.01, high=1.0, log=True, protects_more_when_higher=False)
    sharding_refusal = ("it ranks each weight's entries by momentum; sharded, each process would rank only its rows "
                        "(use train.parallel: ddp)")

    def optimizer_settings(self) -> dict[str, Any]:
        return {"optimizer": "mofo", "mofo_fraction": float(self.config.fraction)}

    def requirements(self, run: "RunConfig", where: str) -> list[str]:
        train = run.train
        if train.optimizer == "mofo" and train.mofo_fraction != self.config.fraction:
            return [f"train.optimizer: mofo asks for train.mofo_fraction: {train.mofo_fraction} and {where}.fraction is "
                    f"{self.config.fraction}; set one of them (drop train.optimizer: mofo, or give both the same fraction)"]
        return []
