"""Reports of results: self-contained HTML with plots, markdown tables, and the CI gate.

Light imports only here; ``retain.report.html`` and ``retain.report.plots`` load matplotlib and are
imported on first use of ``render_html`` / ``write_report``.
"""

from __future__ import annotations

from typing import Any

from retain.report.gate import check_gate

__all__ = ["check_gate", "render_html", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("render_html", "write_report"):
        from retain.report import html

        return getattr(html, name)
    raise AttributeError(f"module 'retain.report' has no attribute {name!r}")
