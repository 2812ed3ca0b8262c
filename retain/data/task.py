"""One task's data end to end: load, limit, split into train/validation, tokenize.

Records are split *before* tokenization so that no record contributes to both parts (a packed
window could otherwise mix a validation document into training). Only when there are too few
records to split (e.g. one ``.txt`` file is a single record) are packed text windows split instead.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

from retain.config import DataConfig
from retain.data.records import detect_format, load_records
from retain.data.sampling import Stream, derive_seed
from retain.data.tokenize import Example, TokenizeStats, tokenize_records

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class TaskData:
    train: list[Example]
    validation: list[Example]
    format: str
    stats: TokenizeStats  # of the training part
    source: str
    validation_stats: TokenizeStats | None = None


def split_items(items: Sequence[T], validation_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic (by ``seed``) train/validation split; both parts keep the input order.

    With a positive fraction and at least two items each part gets at least one item, so a small
    dataset still yields a validation score instead of silently none.
    """
    n = len(items)
    if validation_fraction <= 0 or n < 2:
        return list(items), []
    n_val = min(n - 1, max(1, round(n * validation_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [item for i, item in enumerate(items) if i not in held_out]
    validation = [item for i, item in enumerate(items) if i in held_out]
    return train, validation


def split_examples(
    examples: list[Example], validation_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """``split_items`` for examples (use it on records instead when documents must not straddle parts)."""
    return split_items(examples, validation_fraction, seed)


def apply_limit(records: list[T], limit: int | None, seed: int) -> list[T]:
    """A seeded random subset of ``limit`` records (in file order), so a limit samples the whole file."""
    if limit is None or limit >= len(records):
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def build_task_data(cfg: DataConfig, tokenizer: Any, seed: int) -> TaskData:
    records = load_records(cfg)
    fmt = detect_format(records, cfg)
    fixed = cfg.model_copy(update={"format": fmt})  # both parts use the format seen on the whole file
    records = apply_limit(records, cfg.limit, derive_seed(seed, Stream.DATA_LIMIT))
    source = cfg.path
    split_seed = derive_seed(seed, Stream.VALIDATION_SPLIT)
    if cfg.validation_fraction > 0 and len(records) >= 2:
        train_records, val_records = split_items(records, cfg.validation_fraction, split_seed)
        train, stats = tokenize_records(train_records, tokenizer, fixed, source)
        validation, val_stats = tokenize_records(val_records, tokenizer, fixed, f"{source} (validation part)")
        return TaskData(train, validation, fmt, stats, source, val_stats)
    examples, stats = tokenize_records(records, tokenizer, fixed, source)
    if cfg.validation_fraction <= 0:
        return TaskData(examples, [], fmt, stats, source)
    if fmt != "text":
        logger.warning("%s: one record only, so no validation part (data.validation_fraction ignored)", source)
        return TaskData(examples, [], fmt, stats, source)
    train, validation = split_items(examples, cfg.validation_fraction, split_seed)
    return TaskData(
        train,
        validation,
        fmt,
        TokenizeStats.of(train, stats.n_records, stats.n_truncated),
        source,
        TokenizeStats.of(validation, stats.n_records),
    )
