"""The typer application, its consoles, and the one place that turns errors into messages and exit codes.

Every command is wrapped by :func:`command`: a :class:`~retain.errors.RetainError` prints
``error: <what and where>`` and at most one hint line, then exits with the error's code; Ctrl-C exits
130 with one ``interrupted: ...`` line (``retain train`` says where it stopped and the command that
continues the run). An ``OSError`` of the machine (disk full, file-size limit, permission) that some write path left
unwrapped is reported like an ``OutputError`` (exit 2). SIGTERM is handled like Ctrl-C (exit 143, one ``terminated: ...`` line). Any other exception is a bug in retain: one
line says so and where the full traceback was written (exit 70).
``retain --debug ...`` (or ``RETAIN_DEBUG=1``) lets every exception through with its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from retain.errors import EXIT_INTERRUPTED, RetainError, environment_error, raise_interrupted

EXIT_BUG = 70  # EX_SOFTWARE: an internal error, not the user's

app = typer.Typer(
    help="Fine-tune causal LMs on new skills without catastrophic forgetting, and measure what they still know.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console() if sys.stdout.isatty() else Console(width=220)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 10_000)

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.lr=3e-4 (repeatable).")

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("RETAIN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def fail(message: str, code: int = 2, hint: str | None = None) -> None:
    """Print ``error: message`` (+ one hint line) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    if hint:
        err_console.print(f"hint: {escape(hint)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _write_traceback() -> Path | None:
    text = traceback.format_exc()
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        path = folder / f"retain-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        try:
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def command(function: F) -> F:
    """Map errors to one-line messages and exit codes (see the module docstring)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except RetainError as err:
            if debug_enabled():
                raise
            fail(str(err), err.exit_code, err.hint)
        except KeyboardInterrupt as err:
            if debug_enabled():
                raise
            said = str(err)  # a command may say where it stopped and how to continue (retain train)
            word = getattr(err, "word", "interrupted")  # SIGTERM: "terminated", exit 143
            err_console.print(f"{word}: {escape(said)}" if said else word, soft_wrap=True, highlight=False)
            raise typer.Exit(getattr(err, "exit_code", EXIT_INTERRUPTED))
        except Exception as err:  # noqa: BLE001 - the one place that reports bugs
            if debug_enabled():
                raise
            machine = environment_error(err)  # a full disk that a write path did not wrap is still no bug
            if machine is not None:
                fail(str(machine), machine.exit_code, machine.hint)
            where = _write_traceback()
            saved = f"; full traceback in {where}" if where else ""
            fail(
                f"internal error (a bug in retain, please report it): {type(err).__name__}: {err}{saved}",
                EXIT_BUG,
            )

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Our own progress bar and tables are the output; silence the libraries' per-file bars and notices."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("accelerate").setLevel(logging.ERROR)


class _WarningLines(logging.Handler):
    """retain's warnings (truncated examples, small data, skipped steps) as ``warning: ...`` lines on stderr,
    each printed once, never also as a Python ``UserWarning``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err_console.print(f"[yellow]warning:[/] {escape(record.getMessage())}", soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging must never break a run
            self.handleError(record)


def show_warnings() -> None:
    """Route the ``retain`` loggers' warnings to the terminal (once per process)."""
    logger = logging.getLogger("retain")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        handler = _WarningLines(logging.WARNING)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _print_version(value: bool) -> None:
    if value:
        from retain import __version__

        typer.echo(f"retain {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (also RETAIN_DEBUG=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print retain's version and exit."
    ),
) -> None:
    """Fine-tune causal LMs on new skills without catastrophic forgetting, and measure what they still know."""
    if debug:
        os.environ["RETAIN_DEBUG"] = "1"
    if threading.current_thread() is threading.main_thread():  # SIGTERM (docker stop, Slurm) ends a command like Ctrl-C
        signal.signal(signal.SIGTERM, raise_interrupted)
    quiet_libraries()
    show_warnings()
