"""Reading task data into plain records (one ``dict`` per example) and guessing their format.

Every record remembers where it came from (``Record.where``, e.g. ``train.jsonl:12``) so that a bad
value found later, after shuffling and splitting, is still reported with its file and line.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from retain.config import DATA_FILE_SUFFIXES, DataConfig
from retain.errors import DataError

__all__ = ["DataError", "Record", "detect_format", "load_records"]

SUPPORTED_SUFFIXES = DATA_FILE_SUFFIXES


class Record(dict):
    """A record (field -> value) that also carries its origin, for error messages."""

    where: str | None = None

    @classmethod
    def at(cls, values: dict[str, Any], where: str) -> "Record":
        record = cls(values)
        record.where = where
        return record


def record_where(record: dict[str, Any], index: int, source: str) -> str:
    """Origin of a record: its own ``where`` or, for plain dicts, its position in ``source``."""
    return getattr(record, "where", None) or f"{source} record {index + 1}"


# --------------------------------------------------------------------------------------------
# Per-format readers


def _unreadable(path: Path, err: OSError) -> DataError:
    """A data file that exists but cannot be read (permission, a folder named like a file, I/O)."""
    return DataError(f"{path}: cannot read the file ({err.strerror or err}). Check its permissions.")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err}). Re-save the file as UTF-8.") from None
    except OSError as err:
        raise _unreadable(path, err) from None


def _too_deep(where: str) -> DataError:
    return DataError(f"{where}: JSON nested too deeply to read (thousands of levels); records must be flat objects.")


def _object_or_error(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: expected a JSON object like {{\"text\": ...}}, got {type(value).__name__}. "
            "Each record must be an object mapping field names to values."
        )
    return value


def _parse_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: malformed JSON ({err.msg} at column {err.colno}). "
                "A .jsonl file needs exactly one JSON object per line; fix or delete this line."
            ) from None
        except RecursionError:
            raise _too_deep(where) from None
        records.append(Record.at(_object_or_error(value, where), where))
    return records


def read_jsonl(path: Path) -> list[Record]:
    return _parse_jsonl(path, _read_text(path))


def read_json(path: Path) -> list[Record]:
    """A list of objects or ``{"data": [...]}``; JSON-lines content in a ``.json`` file also works."""
    text = _read_text(path)
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep(str(path)) from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: the file is really JSON lines
            return _parse_jsonl(path, text)
        raise DataError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}). "
            "A .json file must hold a list of objects or {\"data\": [...]}."
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            f"{path}: expected a list of objects or {{\"data\": [...]}} at the top level, "
            f"got {type(value).__name__}."
        )
    return [
        Record.at(_object_or_error(item, f"{path} item {i}"), f"{path} item {i}")
        for i, item in enumerate(value, start=1)
    ]


def _raise_csv_field_limit() -> None:
    """Long documents in one cell exceed csv's 128 KiB default field limit."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def read_delimited(path: Path, delimiter: str) -> list[Record]:
    _raise_csv_field_limit()
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            records = [Record.at(dict(row), f"{path}:{reader.line_num}") for row in reader]
            header = reader.fieldnames  # read inside the block: an empty file reads its header lazily
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err}). Re-save the file as UTF-8.") from None
    except OSError as err:
        raise _unreadable(path, err) from None
    except csv.Error as err:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{path}: cannot parse as {kind}: {err}") from None
    if header is None:
        return []
    for record in records:
        record.pop(None, None)  # cells beyond the header; the header defines the fields
    return records


def read_txt(path: Path, text_field: str) -> list[Record]:
    """The whole file is one document; packing cuts it into windows later."""
    content = _read_text(path)
    return [Record.at({text_field: content}, str(path))] if content.strip() else []


def read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for broken files
        raise DataError(f"{path}: cannot read as Parquet: {err}") from None
    return [Record.at(row, f"{path} row {i}") for i, row in enumerate(rows, start=1)]


def read_file(path: Path, cfg: DataConfig) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    if suffix in (".csv", ".tsv"):
        return read_delimited(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".txt":
        return read_txt(path, cfg.text_field)
    if suffix == ".parquet":
        return read_parquet(path)
    raise DataError(
        f"{path}: unsupported file type '{suffix}'. Use one of {', '.join(SUPPORTED_SUFFIXES)}, "
        "a directory of such files, or a Hugging Face dataset name."
    )


def _data_files(directory: Path) -> list[Path]:
    """Supported files under ``directory`` (recursively), sorted, skipping hidden ones."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _unreadable_folder(directory: Path) -> Path | None:
    """``directory`` or a folder inside it that cannot be listed: a listing skips it silently, and the
    data would look absent ("no data files") or, worse, smaller than it is."""
    folders = [directory, *(p for p in directory.rglob("*") if p.is_dir())]
    return next((folder for folder in folders if not os.access(folder, os.R_OK | os.X_OK)), None)


def read_directory(directory: Path, cfg: DataConfig) -> list[Record]:
    denied = _unreadable_folder(directory)
    if denied is not None:
        raise DataError(f"{denied}: cannot read the folder (permission denied). Check its permissions (chmod a+rx).")
    files = _data_files(directory)
    if not files:
        raise DataError(
            f"{directory}: directory has no data files ({', '.join(SUPPORTED_SUFFIXES)}). "
            "Point data.path at a file or a directory that contains some."
        )
    return [record for path in files for record in read_file(path, cfg)]


def read_hub(cfg: DataConfig) -> list[Record]:
    """Anything ``datasets.load_dataset`` understands, e.g. a hub name when online."""
    try:
        import datasets

        dataset = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
        rows: Iterable[dict[str, Any]] = dataset.to_list() if hasattr(dataset, "to_list") else dataset
    except Exception as err:  # network, missing dataset, bad split: all surface the same way
        raise DataError(
            f"{cfg.path}: neither a local file nor a loadable dataset "
            f"(datasets.load_dataset failed: {type(err).__name__}: {err}). "
            "Check data.path (and data.subset/data.split for hub datasets)."
        ) from None
    label = cfg.path if cfg.subset is None else f"{cfg.path}[{cfg.subset}]"
    return [Record.at(dict(row), f"{label}:{cfg.split} row {i}") for i, row in enumerate(rows, start=1)]


def _looks_local(path: str) -> bool:
    """Paths with a data-file suffix or a path prefix are meant as files, not hub names."""
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES or path.startswith(("/", "./", "../", "~"))


def _why_absent(path: Path) -> str | None:
    """Why a path that names something is neither a file nor a folder (a link loop, a dangling link, no
    permission), or None when there is simply nothing there."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path}: a symbolic link loop ({path} -> {os.readlink(path)} -> ... never reaches a file)"
        if err.errno in (errno.EACCES, errno.EPERM):
            return f"{path}: cannot be read (permission denied on a folder along the path)"
        if path.is_symlink():
            return f"{path}: a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def load_records(cfg: DataConfig) -> list[dict[str, Any]]:
    """Read ``cfg.path`` (file, directory or loadable dataset) into records; never empty."""
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        records = read_directory(path, cfg)
    elif path.is_file():
        records = read_file(path, cfg)
    elif (why := _why_absent(path)) is not None:
        raise DataError(f"{why}. Check data.path.")
    elif _looks_local(cfg.path):
        raise DataError(
            f"file not found: {cfg.path}. Check data.path (relative paths in a run YAML start from the YAML's "
            "folder; paths given with --set from the working directory)."
        )
    else:
        records = read_hub(cfg)
    if not records:
        raise DataError(
            f"{cfg.path}: no records found (the dataset is empty). Add data or point data.path elsewhere."
        )
    return records


# --------------------------------------------------------------------------------------------
# Format detection

_FIELD_KEYS = {
    "chat": ("messages_field",),
    "prompt_completion": ("prompt_field", "completion_field"),
    "text": ("text_field",),
}


def detect_format(records: list[dict[str, Any]], cfg: DataConfig) -> str:
    """``cfg.format`` unless it is ``auto``; then the first format whose fields the first record has."""
    if cfg.format != "auto":
        return cfg.format
    if not records:
        raise DataError(f"{cfg.path}: no records to detect the data format from.")
    first = records[0]
    for fmt, keys in _FIELD_KEYS.items():
        if all(getattr(cfg, key) in first for key in keys):
            return fmt
    fields = ", ".join(map(str, first)) or "(none)"
    raise DataError(
        f"{record_where(first, 0, cfg.path)}: cannot tell the data format; the first record has fields: {fields}. "
        f"Set data.text_field (now '{cfg.text_field}') for plain text, data.prompt_field/data.completion_field "
        f"(now '{cfg.prompt_field}'/'{cfg.completion_field}') for prompt/completion pairs, or "
        f"data.messages_field (now '{cfg.messages_field}') for chats; or set data.format explicitly."
    )
