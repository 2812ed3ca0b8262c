"""Results schema, summaries, reports (HTML, markdown) and the CI gate.

Light imports only here; ``retain.report.html`` and ``retain.report.plots`` load matplotlib and are
imported on first use of ``render_html`` / ``write_report``.
"""

from __future__ import annotations

from typing import Any

from retain.report.gate import check_gate
from retain.report.schema import (
    SCHEMA_VERSION,
    Drift,
    Results,
    Score,
    StepRecord,
    StrategyRun,
    Summary,
)
from retain.report.summary import build_matrix, build_run, general_score, summarize

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
    "check_gate",
    "general_score",
    "render_html",
    "summarize",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in ("render_html", "write_report"):
        from retain.report import html

        return getattr(html, name)
    raise AttributeError(f"module 'retain.report' has no attribute {name!r}")
