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

from retain.config import DataConfig, RunConfig
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


def model_context(model: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cap_to_context(data: DataConfig, context: int | None, key: str) -> DataConfig:
    """``data`` with ``max_length`` at most the model's context, unless ``allow_longer_than_model``.

    A longer window trains positions the model never learnt (rotary models) or fails inside the model
    (learned positions); ``max_length: 100000`` on a 512-token model trained 15k-token windows silently.
    """
    if context is None or data.max_length <= context or data.allow_longer_than_model:
        return data
    logger.warning(
        "%s.max_length %d is longer than the model's context (%d tokens): capped at %d; set "
        "%s.allow_longer_than_model: true to keep it", key, data.max_length, context, context, key,
    )
    return data.model_copy(update={"max_length": context})


def fit_to_model(config: RunConfig, model: Any) -> RunConfig:
    """``config`` with every task's and general_data's max_length capped at the model's context."""
    context = model_context(model)
    tasks = [t.model_copy(update={"data": cap_to_context(t.data, context, f"tasks[{i}].data")}) for i, t in enumerate(config.tasks)]
    general = cap_to_context(config.general_data, context, "general_data") if config.general_data is not None else None
    if all(a.data is b.data for a, b in zip(tasks, config.tasks)) and general is config.general_data:
        return config
    return config.model_copy(update={"tasks": tasks, "general_data": general})


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
