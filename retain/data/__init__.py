"""Task data: read records, tokenize with loss masks, split, and batch."""

from retain.data.collate import collate, ensure_pad_token
from retain.data.records import DataError, Record, detect_format, load_records
from retain.data.task import TaskData, apply_limit, build_task_data, split_examples, split_items
from retain.data.tokenize import IGNORE_INDEX, Example, TokenizeStats, count_scored_tokens, tokenize_records

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "Record",
    "TaskData",
    "TokenizeStats",
    "apply_limit",
    "build_task_data",
    "collate",
    "count_scored_tokens",
    "detect_format",
    "ensure_pad_token",
    "load_records",
    "split_examples",
    "split_items",
    "tokenize_records",
]
