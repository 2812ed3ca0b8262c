"""The ``retain`` command line: one module per command group, registered on one typer app.

Commands are thin shells over the library; :mod:`retain.cli.app` is the only place that maps
errors to messages and exit codes.
"""

from __future__ import annotations

import sys

from retain.cli import (  # noqa: F401  (each module registers its commands)
    bench,
    convert,
    evaluate,
    generate,
    recommend,
    results,
    train,
    tune,
)
from retain.cli.app import app
from retain.cli.importance import importance_app
from retain.cli.merge import merge_command

app.command("merge")(merge_command)
app.add_typer(importance_app, name="importance", help="Compute importance statistics (Fisher, SI) once and reuse them.")

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
