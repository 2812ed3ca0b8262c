"""Results: the versioned ``results.json`` schema, the continual-learning metrics, and the rules that
turn per-state scores into the accuracy matrix R and a headline summary."""

from retain.results.schema import SCHEMA_VERSION, Drift, Results, Score, StepRecord, StrategyRun, Summary
from retain.results.summary import build_matrix, build_run, general_score, summarize

__all__ = [
    "SCHEMA_VERSION",
    "Drift",
    "Results",
    "Score",
    "StepRecord",
    "StrategyRun",
    "Summary",
    "build_matrix",
    "build_run",
    "general_score",
    "summarize",
]
