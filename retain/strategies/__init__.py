"""Mitigation strategies: one file each, registered by name, composed into hybrids by listing them."""

from retain.strategies.base import Strategy, StrategyConfig, StrategyContext, TaskInfo
from retain.strategies.compose import Hybrid
from retain.strategies.registry import (
    available_strategies,
    build_strategies,
    build_strategy,
    get_strategy_class,
    register_strategy,
)

__all__ = [
    "Hybrid",
    "Strategy",
    "StrategyConfig",
    "StrategyContext",
    "TaskInfo",
    "available_strategies",
    "build_strategies",
    "build_strategy",
    "get_strategy_class",
    "register_strategy",
]
