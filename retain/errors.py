"""One error hierarchy for everything a user can get wrong, and the exit codes the CLI maps them to.

Library code raises these with a message that names the file, line or config key and says what to
do; the CLI (``retain.cli``) is the only place that turns them into ``error: ...`` lines and exit
codes. Anything that is not a ``RetainError`` is a bug in retain and is reported as one.

Exit codes (documented in the README):

    0    success
    1    a gate (``retain gate``, a forgetting budget that was exhausted with ``on_exhausted: stop``)
    2    a user error: config, data, model, state (checkpoint/resume), output (filesystem)
    3    training diverged (non-finite loss or gradients)
    130  interrupted (Ctrl-C, SIGINT)
    143  terminated (SIGTERM: docker stop, Kubernetes, Slurm preemption)
"""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


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


class ModelError(RetainError, ValueError):
    """A model or adapter that cannot be loaded or used as asked (wrong base, unknown id, ...).

    Also a ``ValueError``, like ``ConfigError`` and ``DataError``: these cases raised ``ValueError``
    before the hierarchy existed, and callers that catch it keep working.
    """


class StateError(RetainError):
    """A checkpoint, resume or cache state that does not fit the run (another config, a damaged file)."""


class OutputError(RetainError, OSError):
    """Writing failed: the message names the path and the cause (disk full, permission, not a folder)."""


class DivergenceError(RetainError, RuntimeError):
    """Training diverged (non-finite loss or gradients); the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal: SIGINT (Ctrl-C, exit 130) or SIGTERM (exit 143). The message may say
    where the command stopped and how to continue; the CLI prints it on one line."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.word = "interrupted" if signum == signal.SIGINT else "terminated"


def raise_interrupted(signum: int, frame: object) -> None:
    """A signal handler: SIGTERM stops a command the way Ctrl-C does (cleanups run, one line, exit 143)."""
    raise Interrupted(signum=signum)


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
    errno.EEXIST: "a file (not a folder) is in the way",
    errno.ENAMETOOLONG: "the name is too long",
}

#: Errors of the machine, never of retain's code: full disk, quotas, limits, permissions.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)
_WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

# safetensors (Rust) reports "... I/O error: File too large (os error 27)"; Python "[Errno 28] ...".
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
# torch.save's C++ writer reports a short write without an errno.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")


def os_error_of(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: itself, or one that a library wrapped into another type.

    safetensors and torch raise their own exception types for a failed write (disk full, a file-size
    limit); without this they would look like bugs in retain rather than a full disk.
    """
    if isinstance(err, RetainError):
        return None
    if isinstance(err, OSError):
        return err
    if not isinstance(err, Exception):
        return None
    text = str(err)
    match = _ERRNO_IN_TEXT.search(text)
    if match:
        number = int(match.group(1) or match.group(2))
        return OSError(number, os.strerror(number))
    if isinstance(err, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILURES):
        return OSError(errno.EIO, "the write stopped part-way (disk full or a file-size limit?)")
    return None


def _shown_location(path: str | os.PathLike[str] | None, filename: object) -> str | None:
    """Where exactly the error happened, when that says more than ``path``; never a temporary name
    (``.name.xyz.tmp``, ``.tmp-name-xyz/``) that the atomic writers use and delete again."""
    if not filename or (path is not None and str(filename) == str(path)):
        return None
    if any(part.startswith((".tmp-", ".old-")) or (part.startswith(".") and part.endswith(".tmp")) for part in Path(str(filename)).parts):
        return None
    return str(filename)


def output_error(path: str | os.PathLike[str] | None, err: OSError, action: str = "write") -> OutputError:
    """An ``OutputError`` naming ``path`` and the cause of ``err`` in words a user can act on."""
    cause = _CAUSES.get(err.errno or -1) or (err.strerror or type(err).__name__)
    where = _shown_location(path, err.filename)
    detail = f" (at {where})" if where else ""
    hint = None
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        hint = "free space (or raise the limit), then rerun; a training run continues with --resume from its last complete checkpoint"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a folder you can write to (for retain train: --set output.dir=runs/new)"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        hint = "choose another output path, or move the file that is in the way"
    target = f" {Path(path)}" if path is not None else ""
    return OutputError(f"cannot {action}{target}: {cause}{detail}", hint=hint)


def environment_error(err: BaseException) -> OutputError | None:
    """An ``OutputError`` for an error of the machine (disk full, limit, permission) that escaped
    without one, or None when ``err`` is something else (then it is a bug)."""
    os_err = os_error_of(err)
    if os_err is None or os_err.errno not in ENVIRONMENT_ERRNOS:
        return None
    action = "write" if os_err.errno in _WRITE_ONLY_ERRNOS else "access"
    return output_error(os_err.filename, os_err, action)
