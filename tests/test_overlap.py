"""The overlap guard: training-side text that the suite scores is refused, named with both files and the count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retain.config import DataConfig, load_config_dict
from retain.errors import DataError
from retain.eval.overlap import find_overlaps, normalized_key, overlap_guard
from retain.eval.suite import SuiteConfig
from retain.eval.tasks.text import NextTokenAccuracyEval


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_texts_match_across_case_and_white_space_and_short_ones_are_skipped():
    story = "Once upon a time there was a little dog who liked to run in the park."
    assert normalized_key(story) == normalized_key("  ONCE upon a time there was a little dog\\n who liked to run in the park. ".replace("\\n", "\n"))
    assert normalized_key(story) != normalized_key(story + " Then it rained.")
    assert normalized_key("The end.") is None  # closes many stories on both sides without being a leak


def test_general_data_that_is_the_general_eval_is_refused_naming_both_files(tmp_path):
    texts = [f"story number {i}: the little dog ran to the park and played all day long." for i in range(12)]
    pool = _jsonl(tmp_path / "pool.jsonl", texts[:8])
    held = _jsonl(tmp_path / "held.jsonl", texts[5:])  # 3 of its texts are in the pool
    task = _jsonl(tmp_path / "task.jsonl", [f"the licensee shall not assign this agreement, clause {i}." for i in range(9)])
    config = load_config_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": "t", "data": {"path": str(task)}}],
                               "strategies": ["full", {"name": "replay", "data": {"path": str(pool)}}],
                               "general_data": {"path": str(pool)}})
    suite = SuiteConfig(tasks=[NextTokenAccuracyEval(name="stories", data=DataConfig(path=str(held)))])
    found = find_overlaps(config, suite)
    assert [(o.key, o.count) for o in found] == [("general_data", 3), ("strategies[1].data", 3)]
    with pytest.raises(DataError, match=rf"general_data {pool} shares 3 texts with eval 'stories' \({held}\)"):
        overlap_guard(config, suite)
    warnings = overlap_guard(config, suite, allow=True)
    assert warnings[0] == f"overlap allowed: general_data {pool} shares 3 texts with eval 'stories' ({held})"
    clean = SuiteConfig(tasks=[NextTokenAccuracyEval(name="stories", data=DataConfig(path=str(_jsonl(tmp_path / "other.jsonl", texts[8:] + ["x" * 50]))))])
    assert overlap_guard(config, clean) == []
