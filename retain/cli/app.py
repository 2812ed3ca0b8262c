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
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from retain.errors import EXIT_INTERRUPTED, RetainError, environment_error, raise_interrupted

EXIT_BUG = 70  # EX_SOFTWARE: an internal error, not the user's

app = typer.Typer(
    help="Fine-tune causal LMs on new skills without catastrophic forgetting, and measure what they still know.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
class _HelpTable(Table):
    """typer's option tables, where nothing is cut: at 80 columns rich shrank every column alike and cut
    option names (``--min-general-retenti…``) and defaults with an ellipsis. Option names keep their
    width; the type and help columns wrap, and a word longer than its column folds onto the next line."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        if renderables and isinstance(renderables[-1], Columns) and all(isinstance(r, Text) for r in renderables[-1].renderables):
            # the help, the default and "[required]" as one text, so it wraps (and folds) like one
            renderables = (*renderables[:-1], Text(" ").join(renderables[-1].renderables))
        super().add_row(*renderables, **kwargs)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        if len(self.columns) >= 3:  # an options panel (the commands list has two columns and wraps already)
            for column in self.columns[:-2]:
                column.no_wrap = True
            for column in self.columns:
                column.overflow = "fold"
        return super().__rich_console__(console, options)


def _readable_help() -> None:
    """typer's help panels, fixed where they misled: a flag is shown without a type (not ``--resume
    <bool>``, as if it took a value), and no option name or default is cut at 80 columns."""
    import typer.rich_utils
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "retain_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.retain_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    if getattr(typer.rich_utils, "Table", None) is Table:
        typer.rich_utils.Table = _HelpTable  # type: ignore[misc]


_readable_help()
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
        from importlib import metadata

        try:
            version = metadata.version("retain")
        except metadata.PackageNotFoundError:  # run from a checkout that is not installed
            version = "0+unknown"
        typer.echo(f"retain {version}")
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
