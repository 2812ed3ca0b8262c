"""Replay: the buffer is uniform, bounded and balanced; the ratio holds; the mix is padded right; runs resume."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, ClassVar

import pytest
import torch
from conftest import run_config
from resume_utils import assert_kill_resume_matches

from retain.data import IGNORE_INDEX, Example
from retain.data.replay_buffer import RatioSchedule, ReplayBuffer, mix_from_buffer, mix_rows
from retain.strategies import Strategy, register_strategy
from retain.strategies.registry import _REGISTRY, available_strategies
from retain.train import finetune
from retain.train.checkpoint import load_nested, save_nested


def _ex(tag: int, length: int = 3) -> Example:
    return Example([tag] * length, [tag] * length)


def chi_square_p_value(counts: list[int], expected: float) -> float:
    """Upper tail of the chi-square statistic with len(counts) - 1 degrees of freedom."""
    stat = sum((c - expected) ** 2 / expected for c in counts)
    dof = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_reservoir_keeps_a_uniform_sample_of_a_stream():
    # 100 items streamed into 10 slots, 1500 independent buffers: each item should be kept 150 times.
    n_items, capacity, trials = 100, 10, 1500
    counts = Counter()
    for trial in range(trials):
        buffer = ReplayBuffer(capacity, seed=trial)
        buffer.extend("task", (_ex(i, 1) for i in range(n_items)))
        assert len(buffer) == capacity
        counts.update(e.input_ids[0] for e in buffer.reservoirs["task"].items)
    observed = [counts[i] for i in range(n_items)]
    p = chi_square_p_value(observed, trials * capacity / n_items)
    assert p > 1e-3, f"inclusion counts are not uniform (chi-square p = {p:.2e}): {observed}"
    # the test has power: a buffer that only kept the first items would fail it
    assert chi_square_p_value([trials] * capacity + [0] * (n_items - capacity), trials * capacity / n_items) < 1e-6


def test_new_source_shrinks_old_ones_uniformly_and_buffer_stays_bounded():
    counts = Counter()
    trials = 1500
    for trial in range(trials):
        buffer = ReplayBuffer(20, seed=trial)
        buffer.extend("first", (_ex(i, 1) for i in range(40)))
        buffer.extend("second", (_ex(100 + i, 1) for i in range(40)))
        assert [len(r.items) for r in buffer.reservoirs.values()] == [10, 10]
        counts.update(e.input_ids[0] for e in buffer.reservoirs["first"].items)
    p = chi_square_p_value([counts[i] for i in range(40)], trials * 10 / 40)
    assert p > 1e-3, f"the shrunk reservoir is not uniform (p = {p:.2e})"
    three = ReplayBuffer(10, seed=0)
    for source in "abc":
        three.extend(source, (_ex(i) for i in range(50)))
    assert len(three) == 10 and [r.capacity for r in three.reservoirs.values()] == [4, 3, 3]


def test_rows_are_balanced_across_sources():
    buffer = ReplayBuffer(30, seed=1)
    buffer.extend("a", (_ex(1) for _ in range(25)))
    buffer.extend("b", (_ex(2) for _ in range(3)))
    buffer.extend("c", (_ex(3) for _ in range(8)))
    drawn = Counter(source for source, _ in buffer.sample(3001))
    assert max(drawn.values()) - min(drawn.values()) <= 1, drawn


@pytest.mark.parametrize("mode", ["replace", "append"])
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.25])
def test_ratio_holds_over_many_batches(mode, ratio):
    schedule = RatioSchedule(ratio, mode)
    task_rows = replayed = 0
    for step in range(2000):
        rows = 4 + step % 5  # uneven batch sizes
        k = schedule.rows_for(rows)
        replayed += k
        task_rows += rows - k if mode == "replace" else rows
        total = task_rows + replayed
        assert abs(replayed - ratio * total) <= 1 + ratio, (step, replayed, total)
    assert replayed / (task_rows + replayed) == pytest.approx(ratio, abs=2e-3)


def test_mix_rows_replaces_or_appends_and_pads_like_collate():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[-100, 6, 7], [8, 9, -100]]),
    }
    long = Example([1, 2, 3, 4, 5], [IGNORE_INDEX, 2, 3, 4, 5])
    replaced = mix_rows(batch, [Example([4, 4], [4, 4])], pad_token_id=0, mode="replace")
    assert replaced["input_ids"].tolist() == [[5, 6, 7], [4, 4, 0]]
    assert replaced["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert replaced["labels"].tolist() == [[-100, 6, 7], [4, 4, -100]]
    appended = mix_rows(batch, [long], pad_token_id=0, mode="append")  # cut to the batch's width (3)
    assert appended["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [1, 2, 3]]
    assert appended["labels"][2].tolist() == [-100, 2, 3]
    wide = mix_rows(batch, [long], pad_token_id=0, mode="append", max_length=5)
    assert wide["input_ids"].shape == (3, 5) and wide["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="list the replay strategy before"):
        mix_rows({**batch, "teacher": torch.zeros(2)}, [long], 0, "replace")


def test_buffer_state_round_trips_through_a_checkpoint(tmp_path):
    buffer = ReplayBuffer(8, seed=3)
    buffer.extend("a", (Example([i, i + 1, i + 2][: 1 + i % 3], [IGNORE_INDEX, i + 1, i + 2][: 1 + i % 3]) for i in range(30)))
    buffer.extend("b", (_ex(i) for i in range(5)))
    buffer.sample(5)
    save_nested(buffer.state_dict(), tmp_path, "buffer")
    restored = ReplayBuffer(1, seed=99)
    restored.load_state_dict(load_nested(tmp_path, "buffer"))
    assert [(s, e.input_ids, e.labels) for s, e in restored.sample(20)] == [
        (s, e.input_ids, e.labels) for s, e in buffer.sample(20)
    ]
    buffer.add("b", _ex(77))
    restored.add("b", _ex(77))
    assert [e.input_ids for e in restored.reservoirs["b"].items] == [e.input_ids for e in buffer.reservoirs["b"].items]


def test_empty_buffer_leaves_batches_and_ratio_alone():
    schedule = RatioSchedule(0.5, "replace")
    batch = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long), "labels": torch.ones(4, 3, dtype=torch.long)}
    out, k = mix_from_buffer(batch, ReplayBuffer(4), schedule, 0)
    assert out is batch and k == 0 and schedule.rows == 0


class BatchRecorder(Strategy):
    """Sees every batch after replay's transform."""

    batches: ClassVar[list[tuple[str, torch.Tensor]]] = []

    def transform_batch(self, batch, ctx):
        self.batches.append((ctx.task.name, batch["input_ids"].clone()))
        return batch


@pytest.fixture
def recorder():
    register_strategy("test-batch-recorder")(BatchRecorder)
    BatchRecorder.batches = []
    yield BatchRecorder
    _REGISTRY.pop("test-batch-recorder", None)


def _rows_with_char(batches, task: str, char_id: int) -> tuple[int, int]:
    rows = torch.cat([ids for name, ids in batches if name == task])
    return int((rows == char_id).any(dim=1).sum()), rows.shape[0]


def test_replay_mixes_earlier_task_rows_at_the_ratio(recorder, tiny_model_dir, tokenizer, tmp_path):
    first, second = tmp_path / "x.jsonl", tmp_path / "y.jsonl"
    first.write_text("".join(json.dumps({"text": "xxxxxxxx"}) + "\n" for _ in range(20)))
    second.write_text("".join(json.dumps({"text": "yyyyyyyy"}) + "\n" for _ in range(20)))
    config = run_config(str(tiny_model_dir), first, tmp_path / "run", ["full", {"name": "replay", "ratio": 0.25}, "test-batch-recorder"], steps=12)
    config.tasks[0].data.max_length = 8
    config.tasks.append(config.tasks[0].model_copy(update={"name": "t2", "data": config.tasks[0].data.model_copy(update={"path": str(second)})}))
    finetune(config)
    x = tokenizer.convert_tokens_to_ids("x")
    replayed, total = _rows_with_char(recorder.batches, "t2", x)
    assert total == 12 * 4 and replayed == 12  # 25% of the second task's rows are the first task's
    assert _rows_with_char(recorder.batches, "t1", tokenizer.convert_tokens_to_ids("y"))[0] == 0


def test_general_pool_is_replayed_from_the_first_task(recorder, tiny_model_dir, tokenizer, text_file, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": "zzzz"}) + "\n" for _ in range(10)))
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full", {"name": "replay", "ratio": 0.5, "data": {"path": str(pool), "max_length": 8}}, "test-batch-recorder"], steps=4)
    finetune(config)
    replayed, total = _rows_with_char(recorder.batches, "t1", tokenizer.convert_tokens_to_ids("z"))
    assert (replayed, total) == (8, 16)


def test_replay_needs_a_source_when_asked_for_general(tiny_model_dir, text_file, tmp_path):
    from retain.errors import ConfigError

    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full", {"name": "replay", "source": "general"}], steps=2)
    with pytest.raises(ConfigError, match="general_data"):
        finetune(config)


@pytest.mark.slow
def test_full_plus_replay_resumes_exactly_after_a_kill(tiny_model_dir, text_file, pc_file, tmp_path):
    strategies: list[Any] = ["full", {"name": "replay", "ratio": 0.25}]
    if "ewc" in available_strategies():
        strategies.insert(1, {"name": "ewc"})
    assert_kill_resume_matches(
        tmp_path, tiny_model_dir, text_file, strategies, general_data={"path": str(pc_file), "max_length": 32}
    )


@pytest.mark.parametrize("name", ["replay", "synthetic-replay"])
def test_a_new_ratio_restarts_the_schedule(name):
    """Both mixing strategies share one set_strength: the new ratio counts from the rows trained next."""
    from retain.strategies import build_strategy

    strategy = build_strategy(name, {})
    strategy.set_strength(0.3)  # before setup: no schedule yet, only the config moves
    assert strategy.config.ratio == pytest.approx(0.3) and getattr(strategy, "schedule", None) is None
    strategy.schedule = RatioSchedule(0.3, strategy.config.mode)
    strategy.schedule.rows_for(8)
    strategy.set_strength(0.5)
    assert strategy.schedule.ratio == pytest.approx(0.5) and strategy.schedule.rows == 0
