"""One error hierarchy for everything a user can get wrong, and the exit codes the CLI maps them to.

Library code raises these with a message that names the file, line or config key and says what to
do; the CLI (``retain.cli``) is the only place that turns them into ``error: ...`` lines and exit
codes. Anything that is not a ``RetainError`` is a bug in retain and is reported as one.

Exit codes (documented in the README):

    0    success
    1    a gate (``retain gate``, a forgetting budget that was exhausted with ``on_exhausted: stop``)
    2    a user error: config, data, model, state (checkpoint/resume), output (filesystem)
    3    training diverged (non-finite loss or gradients)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class RetainError(Exception):
    """Base of every error a user can act on. ``hint`` is one optional line on what to do next."""

    exit_code: int = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(RetainError, ValueError):
    """A configuration problem: the message names the key path (``train.lr``) and the fix."""


class DataError(RetainError, ValueError):
    """A data problem: the message names the file (and line/field where relevant) and the fix."""


class ModelError(RetainError):
    """A model or adapter that cannot be loaded or used as asked (wrong base, unknown id, ...)."""


class StateError(RetainError):
    """A checkpoint, resume or cache state that does not fit the run (another config, a damaged file)."""


class OutputError(RetainError, OSError):
    """Writing failed: the message names the path and the cause (disk full, permission, not a folder)."""


class DivergenceError(RetainError, RuntimeError):
    """Training diverged (non-finite loss or gradients); the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class GateError(RetainError):
    """A bound the user set was not met (exit code 1, not a usage error)."""

    exit_code = EXIT_GATE


_CAUSES = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or the process's file-size limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, not a file",
    errno.ENAMETOOLONG: "the name is too long",
}


def output_error(path: str | os.PathLike[str], err: OSError, action: str = "write") -> OutputError:
    """An ``OutputError`` naming ``path`` and the cause of ``err`` in words a user can act on."""
    cause = _CAUSES.get(err.errno or -1) or (err.strerror or type(err).__name__)
    where = err.filename if err.filename and str(err.filename) != str(path) else None
    detail = f" (at {where})" if where else ""
    hint = None
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free space (or raise the limit), then rerun with --resume: the last complete checkpoint is kept"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a folder you can write to (e.g. --set output.dir=runs/new)"
    return OutputError(f"cannot {action} {Path(path)}: {cause}{detail}", hint=hint)
