"""The overlap guard: no text a run trains, replays or anchors on may be a text the suite scores.

A general pool that shares texts with the general eval inflates retention (the model is rehearsed on
what it is then asked); task data that shares texts with the task eval inflates the new-task score.
So before a run trains, every record of every training-side input (task data, ``general_data``, each
strategy's ``data``) is compared with every record of every data file the suite scores (both parts:
a training text in the select part would bias what chooses).

Texts are compared whole after case-folding and collapsing white space; texts shorter than
``MIN_CHARS`` are skipped ("The end." closes many stories on both sides without being a leak). It does
not catch containment (a clause inside a longer training record).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from retain.config import DataConfig, RunConfig
from retain.data.records import load_records
from retain.errors import DataError
from retain.eval.suite import SuiteConfig

MIN_CHARS = 40


def normalized_key(text: str) -> bytes | None:
    """A short hash of the text case-folded with white space collapsed; None for a text too short to tell."""
    norm = " ".join(str(text).casefold().split())
    if len(norm) < MIN_CHARS:
        return None
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=12).digest()


def record_texts(record: dict[str, Any], data: DataConfig) -> list[str]:
    """The texts of one record as a run would read them: its text, its prompt + completion, or its chat turns."""
    if data.text_field in record:
        return [str(record[data.text_field])]
    if data.prompt_field in record:
        return [str(record[data.prompt_field]) + str(record.get(data.completion_field, ""))]
    if data.messages_field in record and isinstance(record[data.messages_field], list):
        return [str(m.get("content", "")) for m in record[data.messages_field] if isinstance(m, dict)]
    return []


def _keys(data: DataConfig) -> frozenset[bytes]:
    return _keys_cached(data.model_dump_json())


@lru_cache(maxsize=32)
def _keys_cached(dumped: str) -> frozenset[bytes]:
    data = DataConfig.model_validate(json.loads(dumped))
    found = set()
    for record in load_records(data):
        for text in record_texts(record, data):
            key = normalized_key(text)
            if key is not None:
                found.add(key)
    return frozenset(found)


@dataclass(frozen=True)
class Overlap:
    """``count`` texts of the training-side input ``source`` (``key``: where the run config names it) are
    texts that eval ``eval_name`` scores (its data ``eval_file``)."""

    key: str
    source: str
    eval_name: str
    eval_file: str
    count: int

    def describe(self) -> str:
        return (f"{self.key} {self.source} shares {self.count} text{'s' if self.count != 1 else ''} with eval "
                f"'{self.eval_name}' ({self.eval_file})")


def training_inputs(config: RunConfig) -> list[tuple[str, DataConfig]]:
    """(config key, data) of every text a run trains, replays or anchors on."""
    found = [(f"tasks[{i}].data", t.data) for i, t in enumerate(config.tasks)]
    if config.general_data is not None:
        found.append(("general_data", config.general_data))
    for i, spec in enumerate(config.strategies):
        data = spec.params.get("data")
        if isinstance(data, dict) and data.get("path"):
            found.append((f"strategies[{i}].data", DataConfig.model_validate(data)))
    return found


def find_overlaps(config: RunConfig, suite: SuiteConfig) -> list[Overlap]:
    """Every (training input, eval) pair that shares texts, with the count."""
    scored = [(task.name, task.data) for task in suite.tasks if isinstance(getattr(task, "data", None), DataConfig)]
    found = []
    for key, data in training_inputs(config):
        train = _keys(data)
        for name, eval_data in scored:
            count = len(train & _keys(eval_data))
            if count:
                found.append(Overlap(key, data.path, name, eval_data.path, count))
    return found


def overlap_guard(config: RunConfig, suite: SuiteConfig | None, *, allow: bool = False) -> list[str]:
    """Refuse a run whose training-side texts overlap the suite's, naming both files and the count;
    with ``allow`` (``--allow-overlap``) return the same findings as warnings for results.json."""
    if suite is None:
        return []
    overlaps = find_overlaps(config, suite)
    if overlaps and not allow:
        raise DataError(
            "training text overlaps evaluation text, which would inflate the scores:\n  "
            + "\n  ".join(o.describe() for o in overlaps),
            hint="use disjoint files (general_data must never be the general eval's text), or pass --allow-overlap "
            "to proceed with a warning recorded in results.json",
        )
    return [f"overlap allowed: {o.describe()}" for o in overlaps]
