"""Files that are never half-written, folders that are never half-replaced, and content hashes.

Every write in retain goes through :func:`atomic_file` / :func:`atomic_write_text` /
:func:`atomic_dir`: the content is written under a unique temporary name beside the target (so two
writers never collide and a killed process leaves the previous version intact), flushed to disk and
renamed into place, with the permissions a plain ``open()``/``mkdir`` would give under the umask.
``OSError`` becomes :class:`~retain.errors.OutputError` naming the target path and the cause (disk
full, permission, not a folder). A path built from a user's name goes through :func:`inside`, which
refuses one that leaves its folder; the lock of a folder being written is in ``retain.io_lock``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Literal

from retain.errors import OutputError, RetainError, os_error_of, output_error


#: Longest name that may become a file or folder name (task folders add a prefix; file systems allow 255 bytes).
SAFE_NAME_MAX = 100
_SAFE_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]")
SAFE_NAME_RULE = f"letters, digits, '.', '_' and '-', no leading dot, at most {SAFE_NAME_MAX} characters"


def unsafe_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as one file or folder name, or None when it can.

    Names users choose (tasks, bench items) become folder names; a separator or ``..`` would write
    outside the run folder, a leading dot would hide the folder, other characters break shells and
    file systems.
    """
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name.startswith("."):
        return "it starts with a dot"
    if len(name) > SAFE_NAME_MAX:
        return f"it is {len(name)} characters long"
    bad = sorted({ch for ch in name if not _SAFE_NAME_CHARS.fullmatch(ch)})
    if bad:
        return "it contains " + " ".join(repr(ch) for ch in bad[:5])
    return None


def check_safe_name(name: str) -> str:
    """``name`` unchanged, or a ``ValueError`` saying why it cannot become a folder name (a pydantic
    validator: the config error then names the key path, e.g. ``tasks[0].name``)."""
    problem = unsafe_name_problem(name)
    if problem is not None:
        raise ValueError(f"cannot be used as a folder name: {problem}; use {SAFE_NAME_RULE}")
    return name


def inside(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / parts...``, refused with an ``OutputError`` when the result would lie outside ``root``.

    Every path built from a name goes through this, so a name that slipped past validation can never
    replace a file outside the folder it belongs to. The check is on the written path (``..`` and
    absolute parts), not on links the user made inside the folder on purpose.
    """
    base = Path(os.path.abspath(root))
    target = Path(os.path.normpath(base.joinpath(*parts)))
    if target == base or not target.is_relative_to(base):
        raise OutputError(
            f"refusing to write {Path(root).joinpath(*parts)}: it is not inside {root}, the folder it belongs to",
            hint=f"names that become paths must be plain names: {SAFE_NAME_RULE}",
        )
    return Path(root).joinpath(*parts)


#: The lock file of a folder a command is writing (``retain.io_lock``); never counted as its content.
LOCK_FILE = ".retain.lock"


def folder_entries(folder: str | os.PathLike[str]) -> list[Path]:
    """What ``folder`` holds, sorted, without its lock file (a folder holding only a lock is empty)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []


def default_cache_dir() -> Path:
    """``$RETAIN_CACHE_DIR`` or ``~/.cache/retain``: base-model imports, eval scores, statistics."""
    return Path(os.environ.get("RETAIN_CACHE_DIR") or Path.home() / ".cache" / "retain").expanduser()


@contextmanager
def output_errors(path: str | os.PathLike[str], action: str = "write") -> Iterator[None]:
    """Turn a failed write inside the block into an ``OutputError`` naming ``path``.

    Besides ``OSError`` this catches what safetensors and torch raise for a full disk or a file-size
    limit (see :func:`retain.errors.os_error_of`); every other exception passes unchanged.
    """
    try:
        yield
    except RetainError:
        raise
    except Exception as err:
        os_err = os_error_of(err)
        if os_err is None:
            raise
        raise output_error(path, os_err, action) from err


def _refuse_file_in_the_way(folder: Path, what: str) -> None:
    """``mkdir`` on a path through a regular file fails with an opaque EEXIST/ENOTDIR; name the file."""
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            return
        if candidate.exists():
            raise OutputError(
                f"cannot {what}: {candidate} is a file, not a folder",
                hint="choose another output path, or move that file away",
            )


def first_missing_folder(folder: str | os.PathLike[str]) -> Path | None:
    """The outermost folder on the way to ``folder`` that does not exist yet (what creating it makes), or None."""
    missing = None
    for candidate in (Path(folder), *Path(folder).parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def ensure_dir(folder: str | os.PathLike[str], purpose: str = "create the folder") -> Path:
    """Create ``folder`` (and its parents) and check that a file can be written in it; an
    ``OutputError`` names a file in the way, or the cause (permission, read-only, disk full).

    Commands call it before loading a model, so a bad output path fails in a second, not after an
    hour of training or evaluation.
    """
    folder = Path(folder)
    _refuse_file_in_the_way(folder, f"{purpose} {folder}")
    with output_errors(folder, purpose):
        folder.mkdir(parents=True, exist_ok=True)
    with output_errors(folder, "write in the folder"):
        fd, probe = tempfile.mkstemp(prefix=".retain-probe-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    return folder


def _resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute with every symlink that exists along it followed (a link to an input is that input)."""
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _overlap(target: Path, source: Path) -> str | None:
    """How ``target`` (an output) meets ``source`` (an input): 'is', 'contains', 'is inside', or None."""
    if target == source:
        return "is"
    if source.is_relative_to(target):
        return "contains"
    if target.is_relative_to(source) and source.is_dir():
        return "is inside"
    return None


def refuse_inputs(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], what: str) -> None:
    """Refuse an output that is, contains or is inside one of the command's own inputs (symlinks
    followed), whatever ``--overwrite`` says: replacing the output would destroy what is being read.

    Inputs that do not exist on this machine (hub ids) cannot overlap and are skipped.
    """
    target = _resolved(path)
    for source in inputs:
        if source is None or str(source) == "":
            continue
        original = Path(source).expanduser()
        if not original.exists():
            continue
        how = _overlap(target, _resolved(original))
        if how is not None:
            raise OutputError(
                f"refusing to write {what} {Path(path)}: it {how} {original}, an input of this command "
                "(even --overwrite would destroy what is being read)",
                hint=f"choose another {what}",
            )


def prepare_output(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    what: str = "--out",
    kind: Literal["folder", "file"] = "folder",
    flag: str = "--overwrite",
) -> Path:
    """Check an output before any work is done, the same way for every command that writes one.

    * It must not be, contain or be inside one of ``inputs`` (even with ``overwrite``).
    * A non-empty folder (``kind="folder"``) or an existing file (``kind="file"``) is refused unless
      ``overwrite``: retain never replaces something it was not asked to replace.
    * A file where a folder is expected (or the reverse) is refused; then the folder (or the file's
      folder) is created and probed for writability (:func:`ensure_dir`).

    Returns ``path``. The caller replaces the old content itself, atomically where it can
    (:func:`atomic_dir` / :func:`atomic_file`).
    """
    target = Path(path)
    refuse_inputs(target, inputs, what)
    if kind == "folder":
        if target.exists() and not target.is_dir():
            raise OutputError(f"cannot write {what} {target}: it is a file, not a folder", hint=f"choose another {what}")
        if target.is_dir() and not overwrite and folder_entries(target):
            names = [p.name for p in folder_entries(target)]
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise OutputError(
                f"{what} {target} is not empty (it holds {shown}); retain does not replace it unless asked",
                hint=f"choose a new or empty folder, or pass {flag} to replace its contents",
            )
        ensure_dir(target, f"create {what}")
    else:
        if target.is_dir():
            raise OutputError(f"cannot write {what} {target}: it is a folder, not a file", hint=f"choose another {what}")
        if target.exists() and not overwrite:
            raise OutputError(
                f"{what} {target} already exists; retain does not replace it unless asked",
                hint=f"choose another file name, or pass {flag} to replace it",
            )
        ensure_dir(target.parent if str(target.parent) else Path("."), f"create the folder of {what}")
    return target


def empty_folder(folder: str | os.PathLike[str]) -> None:
    """Delete everything inside ``folder`` (what ``--overwrite`` replaces) but its lock; links are removed,
    not followed."""
    folder = Path(folder)
    with output_errors(folder, "empty"):
        for entry in folder_entries(folder):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except FileNotFoundError:  # another process of the same run removed it first
                continue


def _make_parent(path: Path) -> None:
    _refuse_file_in_the_way(path.parent, f"write {path}")
    with output_errors(path.parent, "create the folder"):
        path.parent.mkdir(parents=True, exist_ok=True)


def current_umask() -> int:
    """The process's umask, read without changing it where ``/proc`` allows (``os.umask`` has no getter)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(target: Path, folder: bool) -> int:
    """The permissions a plain ``open()`` / ``mkdir`` would give ``target`` under the current umask, or the
    mode of what it replaces. ``tempfile`` creates 0600 files and 0700 folders, which renamed into
    place would lock everyone else (a service account loading the model) out."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return (0o777 if folder else 0o666) & ~current_umask()


def give_plain_modes(folder: Path) -> None:
    """Everything inside a freshly written ``folder`` gets the modes of the umask (executable bits kept):
    libraries (transformers' shard writer) stage files through ``tempfile`` too, and leave them 0600."""
    mask = current_umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        wanted = (0o777 if path.is_dir() else 0o666 | (mode & 0o111)) & ~mask
        if mode & 0o7777 != wanted:
            os.chmod(path, wanted)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (and its regular files) to disk; a no-op where folders cannot be opened."""
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                fsync_file(child)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The file gets the mode a plain ``open()`` would give it under the umask (or the mode of the file it
    replaces), never tempfile's 0600.
    """
    target = Path(path)
    _make_parent(target)
    with output_errors(target):
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with output_errors(target):  # the caller's own writes: a full disk names the target
            yield tmp
        with output_errors(target):
            os.chmod(tmp, plain_mode(target, folder=False))
            fsync_file(tmp)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        with output_errors(path):
            tmp.write_text(text, encoding="utf-8")
    return Path(path)


def append_jsonl(path: str | os.PathLike[str], row: object) -> None:
    """Append one JSON line (logs that grow during a run; a torn last line is the worst a kill leaves)."""
    with output_errors(path, "append to"), open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def atomic_write_json(path: str | os.PathLike[str], value: object, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=False))


@contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    A folder already at ``final`` is moved aside first and deleted after the rename, so at every
    moment either the old or the new folder is complete. On failure the temporary folder is removed
    and ``final`` is untouched. The folder ends with the mode a plain ``mkdir`` would give it (or the
    mode of the folder it replaces), never tempfile's 0700.
    """
    final = Path(final)
    _make_parent(final)
    with output_errors(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        with output_errors(final):  # save_pretrained & co. inside the block: a full disk names the folder
            yield tmp
        with output_errors(final):
            give_plain_modes(tmp)
            os.chmod(tmp, plain_mode(final, folder=True))
            fsync_dir(tmp)
            if final.exists():
                if (final / LOCK_FILE).is_file():  # the folder stays locked: its lock moves into the new one
                    os.replace(final / LOCK_FILE, tmp / LOCK_FILE)
                old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what killed writers left behind in ``folder`` (``.tmp-*`` / ``.old-*`` names)."""
    for pattern in (".tmp-*", ".old-*"):
        for leftover in folder.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Content hashes


@functools.lru_cache(maxsize=512)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (memoized by path, modification time and size)."""
    stat = os.stat(path)
    return _file_sha256(str(path), stat.st_mtime_ns, stat.st_size)


def content_hash(path: str | os.PathLike[str]) -> str | None:
    """sha256 of a file, or of a folder's sorted (relative name, file hash) list; None if not local.

    Hidden files and folders are skipped, so caches and editor files do not change the hash.
    """
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
        listing = [(str(f.relative_to(p)), file_sha256(f)) for f in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return None
