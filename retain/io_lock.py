"""One writer per output folder: a lock file naming its holder (command, pid, host, start time).

Two ``retain train`` into one ``output.dir`` mixed one run's config with the other's checkpoints, and a
resume then exported the wrong weights. Every command that fills a folder (train, bench, demo, merge)
holds :data:`LOCK_FILE` in it while it works: a second writer is refused at once, naming the holder.

The exclusion itself is the kernel's (``flock``): it ends with the holding process, however it ends,
so a lock left by a killed run is taken over with a message, never mistaken for a live one. The file's
content only says who holds it. A lock written on another host is never taken over: retain cannot see
whether that process still runs (delete the file when it does not).
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from retain.errors import StateError
from retain.io import LOCK_FILE, ensure_dir, folder_entries, output_errors, refuse_inputs, remove_stale_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the content alone decides
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("retain")

__all__ = ["LOCK_FILE", "FolderLock", "writing_to"]

_held: set["FolderLock"] = set()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def _read_holder(fd: int) -> dict[str, object]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, object]) -> str:
    """``retain train (pid 123 on host-a, started 2024-05-01 10:00:00)``."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started))) if isinstance(started, (int, float)) else "?"
    return f"{holder.get('command') or 'retain'} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when})"


class FolderLock:
    """The lock of one folder, held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, folder: str | os.PathLike[str], command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.fd: int | None = None
        self.owner = os.getpid()

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise a ``StateError`` naming the process that holds it."""
        ensure_dir(self.folder, f"create the folder for {self.command}")
        while True:
            with output_errors(self.path, "create the lock file"):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if self._lock_or_refuse(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder released (and removed) the file between our open and flock: again
        self.fd = fd
        self._write_holder()
        _held.add(self)
        return self

    def _lock_or_refuse(self, fd: int) -> bool:
        """True when ``fd`` now holds the lock of the file at ``self.path``; False to retry."""
        holder = _read_holder(fd)
        here = socket.gethostname()
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    self._refuse(_read_holder(fd) or holder)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # a file system without flock: the content alone decides (below)
            else:
                try:
                    if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                        return False
                except FileNotFoundError:
                    return False
                holder = _read_holder(fd)
                if holder and holder.get("host") not in (None, here):
                    self._refuse(holder, other_host=True)
                if holder:
                    log.warning("%s: taking over the lock of %s, which ended without releasing it", self.folder,
                                describe_holder(holder))
                return True
        pid = holder.get("pid")
        if holder and (holder.get("host") != here or (isinstance(pid, int) and _pid_running(pid))):
            self._refuse(holder, other_host=holder.get("host") != here)
        if holder:
            log.warning("%s: taking over the lock of %s, which is no longer running", self.folder, describe_holder(holder))
        return True

    def _refuse(self, holder: dict[str, object], other_host: bool = False) -> None:
        who = describe_holder(holder) if holder else "another retain process"
        raise StateError(
            f"{self.folder} is in use by {who}: one writer per folder",
            hint=(f"if that process no longer runs on {holder.get('host')}, delete {self.path}" if other_host else
                  "wait for it to finish (or stop it), or choose another output folder"),
        )

    def _write_holder(self) -> None:
        assert self.fd is not None
        holder = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        with output_errors(self.path, "write the lock file"):
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, (json.dumps(holder) + "\n").encode())

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and let the lock go; a no-op when not held."""
        if self.fd is None or os.getpid() != self.owner:  # a forked child never releases its parent's lock
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None
            _held.discard(self)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@atexit.register
def _release_all() -> None:
    for lock in list(_held):
        lock.release()


@contextmanager
def writing_to(
    folder: str | os.PathLike[str],
    command: str,
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    what: str = "--out",
    remove_if_created: bool = False,
) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (its inputs are checked first: no lock file in an input).

    ``remove_if_created``: when the block fails and the folder did not exist before, remove it if it
    holds nothing (temporaries aside), so a failed command leaves no empty folder behind (``retain
    merge``); what it did write (a sweep's results) stays.
    """
    folder = Path(folder)
    refuse_inputs(folder, inputs, what)
    created = not folder.exists() and not folder.is_symlink()
    lock = FolderLock(folder, command).acquire()
    try:
        yield folder
    except BaseException:
        lock.release()
        if remove_if_created and created and folder.is_dir():
            remove_stale_temporaries(folder)
            if not folder_entries(folder):
                shutil.rmtree(folder, ignore_errors=True)
        raise
    lock.release()
