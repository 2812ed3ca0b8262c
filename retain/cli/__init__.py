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


def relaunch_as_processes() -> None:
    """``accelerate launch --cpu --num_processes N -m retain ...`` starts one process on CPUs; start the N
    processes it asked for instead (through torchrun), so that command trains on N processes."""
    import os

    from retain.train.processes import parent_cmdline, requested_cpu_processes, torchrun_command

    processes = requested_cpu_processes(os.environ, parent_cmdline())
    if processes is None:
        return
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    command = torchrun_command(processes, sys.argv[1:], sys.executable)
    os.execvpe(command[0], command, env)


def main() -> None:  # pragma: no cover - entry point
    relaunch_as_processes()
    try:
        app()
    except KeyboardInterrupt as err:  # outside a command's own handling: 130 for Ctrl-C, 143 for SIGTERM
        sys.exit(getattr(err, "exit_code", 130))
