"""A small default suite for a Trainer script that brings only its training files.

Each file is split by a hash of its record's content (so the split does not depend on file order or on
a seed), the held-out part is written beside the run and scored, and only the rest is trained on,
replayed or anchored on: nothing scored was ever seen in training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retain.config import DataConfig
from retain.data import load_records
from retain.errors import DataError
from retain.io import atomic_write_text


def held_out(record: dict[str, Any], buckets: int) -> bool:
    """A record is held out when the sha256 of its canonical JSON falls in bucket 0 of ``buckets``."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % buckets == 0


def record_text(record: dict[str, Any]) -> str:
    """The whole text of a record (text, prompt + completion, or chat turns), for loss on held-out text."""
    if "text" in record:
        return str(record["text"])
    if "prompt" in record and "completion" in record:
        return f"{record['prompt']}{record['completion']}"
    if "messages" in record:
        return "\n".join(str(m.get("content", "")) for m in record["messages"])
    raise DataError(f"cannot score a record with fields {sorted(record)}: expected text, prompt+completion or messages")


@dataclass
class Split:
    train: Path  # what may be trained, replayed or anchored on
    held_out: Path  # what is scored, as {"text": ...} lines


def split_file(path: str | Path, out_dir: Path, name: str, buckets: int = 10) -> Split:
    """Write ``out_dir/<name>.train.jsonl`` and ``out_dir/<name>.heldout.jsonl`` (about 1 in ``buckets``)."""
    records = [dict(r) for r in load_records(DataConfig(path=str(path)))]
    train = [r for r in records if not held_out(r, buckets)]
    scored = [r for r in records if held_out(r, buckets)]
    if not scored or not train:  # tiny files: keep the split, by position
        train, scored = records[:-max(1, len(records) // buckets)], records[-max(1, len(records) // buckets):]
    if not train:
        raise DataError(f"{path}: too few records ({len(records)}) to hold some out for scoring")
    split = Split(out_dir / f"{name}.train.jsonl", out_dir / f"{name}.heldout.jsonl")
    atomic_write_text(split.train, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    atomic_write_text(split.held_out, "".join(json.dumps({"text": record_text(r)}, ensure_ascii=False) + "\n" for r in scored))
    return split


def default_suite(task: str, task_held_out: Path, general_held_out: Path | None, max_length: int = 256,
                  prompts: list[str] | None = None) -> dict[str, Any]:
    """General loss and next-token accuracy on held-out general text; task loss and accuracy on held-out task text."""
    def data(path: Path) -> dict[str, Any]:
        return {"path": str(path), "max_length": max_length}

    tasks: list[dict[str, Any]] = []
    if general_held_out is not None:
        tasks += [
            {"name": "general_loss", "type": "loss", "data": data(general_held_out), "max_examples": 64},
            {"name": "general_acc", "type": "next_token_accuracy", "data": data(general_held_out), "max_examples": 64},
        ]
    tasks += [
        {"name": f"{task}_acc", "type": "next_token_accuracy", "role": "task", "train_task": task,
         "data": data(task_held_out), "max_examples": 64},
        {"name": f"{task}_loss", "type": "loss", "role": "task", "train_task": task, "data": data(task_held_out),
         "max_examples": 64},
    ]
    suite: dict[str, Any] = {"tasks": tasks}
    if prompts:
        suite["sample_prompts"] = prompts
        suite["probe_prompts"] = prompts
    return suite
