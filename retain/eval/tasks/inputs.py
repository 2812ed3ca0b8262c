"""Eval types that read records from a data file: loading, fields, prompts, and their errors.

Every problem with the data is a ``DataError`` naming the eval, the file, the record and the field,
so a user can fix the suite or the data without reading a traceback.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from retain.config import DataConfig
from retain.data.records import SUPPORTED_SUFFIXES, load_records, record_where
from retain.data.sampling import seeded_subset
from retain.errors import ConfigError, DataError
from retain.eval.tasks.base import EvalTaskConfig, SharedWork
from retain.io import content_hash


def looks_local(path: str) -> bool:
    """A data file suffix or a ./ ../ prefix: meant as a file, not a hub dataset name."""
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES or path.startswith(("./", "../", "/", "~"))


def resolve_path(path: str, base: Path, always: bool = False) -> str:
    """A relative path against ``base`` if it names something there (or looks like a file path);
    hub dataset names ("org/name") are left alone."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if always or candidate.exists() or looks_local(path):
        return str(candidate.resolve())
    return path


class DataEval(EvalTaskConfig):
    """An eval over the records of ``data`` (a file, folder or hub dataset)."""

    data: DataConfig = Field(description="Eval data; relative paths resolve against the suite file's folder.")
    max_examples: int | None = Field(None, gt=0, description="Seeded subsample of the records.")
    seed: int = Field(0, description="Seed of the max_examples subsample.")

    def resolved(self, base: Path) -> "DataEval":
        copy = self.model_copy(deep=True)
        copy.data.path = resolve_path(self.data.path, base)
        return copy

    def input_files(self) -> dict[str, str]:
        return {"data.path": self.data.path} if looks_local(self.data.path) else {}

    def hash_payload(self) -> dict[str, Any]:
        payload = self.model_dump(mode="json")
        content = content_hash(self.data.path)
        if content is not None:  # same data under another path hashes the same, edited data not
            payload["data"]["path"] = f"sha256:{content}"
        return payload

    def records(self, shared: SharedWork | None = None) -> list[dict[str, Any]]:
        """All records of ``data``, read once per suite run."""
        shared = shared or SharedWork()
        return shared.get(("records", self.data.model_dump_json()), self._load)

    splits = True

    def sampled_records(self, shared: SharedWork | None = None) -> list[dict[str, Any]]:
        """The records this eval scores: its pool (the seeded ``max_examples`` subsample, all of them when
        unset), and of the pool the items of its part (``retain.eval.split``)."""
        pool = seeded_subset(self.records(shared), self.max_examples, self.seed)
        return [pool[i] for i in self.item_ids(len(pool))]

    def _load(self) -> list[dict[str, Any]]:
        try:
            return load_records(self.data)
        except DataError as err:
            raise DataError(f"eval '{self.name}': {err}", hint=err.hint) from None

    def where(self, record: dict[str, Any], index: int) -> str:
        return record_where(record, index, self.data.path)

    def field(self, record: dict[str, Any], key: str, index: int, option: str = "the *_field option") -> Any:
        """``record[key]``, or a DataError naming the record, the missing field and what to set."""
        if key not in record:
            raise DataError(
                f"eval '{self.name}': {self.where(record, index)} has no field '{key}' "
                f"(fields: {', '.join(map(str, record)) or '(none)'}). Set {option} of this eval, or fix the data."
            )
        return record[key]


def template_fields(template: str) -> list[str]:
    """Record fields a ``str.format`` template reads (``{text}``, ``{meta[id]}`` -> text, meta)."""
    roots = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        root = field_name.split(".")[0].split("[")[0]
        if not root or root.isdigit():
            raise ValueError(f"'{{{field_name}}}' is positional; name a record field, e.g. {{text}}")
        roots.append(root)
    return roots


class PromptedEval(DataEval):
    """A data eval whose records are turned into prompts (a field, or a template over fields)."""

    prompt_field: str = Field("prompt", description="Record field holding the prompt (unless prompt_template).")
    prompt_template: str | None = Field(
        None, description='Prompt built from record fields, e.g. "Clause: {text}\\nAnswer:"; else prompt_field.'
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                template_fields(value)
            except ValueError as err:  # unbalanced braces, positional fields
                raise ValueError(f"not a usable template ({err})") from None
        return value

    def prompt(self, record: dict[str, Any], index: int) -> str:
        if self.prompt_template is None:
            return str(self.field(record, self.prompt_field, index, "prompt_field or prompt_template"))
        for key in template_fields(self.prompt_template):
            self.field(record, key, index, "prompt_template")
        try:
            return self.prompt_template.format_map(record)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise ConfigError(
                f"eval '{self.name}': prompt_template {self.prompt_template!r} cannot be filled from "
                f"{self.where(record, index)}: {type(err).__name__}: {err}"
            ) from None
