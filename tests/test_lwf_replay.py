"""lwf ``anchor: replay`` (Dark Experience Replay on the rows replay mixes in) and replay's row marks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_config

from retain.data import Example
from retain.data.replay_buffer import REPLAYED, mix_rows
from retain.errors import ConfigError
from retain.strategies import build_strategy
from retain.strategies.registry import validate_run_config
from retain.train import finetune


def _batch(rows: int, width: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.arange(rows * width).reshape(rows, width) + 10
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# --------------------------------------------------------------------------------------------
# replay marks its rows


def test_mixed_rows_are_marked_token_by_token_and_append_keeps_every_task_row():
    batch = _batch(2)
    short = Example([4, 4], [4, 4])
    appended = mix_rows(batch, [short], pad_token_id=0, mode="append")
    assert appended["input_ids"][:2].tolist() == batch["input_ids"].tolist()  # every task row kept, unchanged
    assert appended["labels"][:2].tolist() == batch["labels"].tolist()
    assert appended[REPLAYED].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 0]]  # the padding of the row is not marked
    replaced = mix_rows(batch, [short], pad_token_id=0, mode="replace")
    assert replaced[REPLAYED].tolist() == [[0, 0, 0], [1, 1, 0]]
    # a second mixer keeps the first one's marks on the rows it keeps
    again = mix_rows(appended, [Example([7, 7, 7], [7, 7, 7])], pad_token_id=0, mode="append")
    assert again[REPLAYED].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="list the replay strategy before"):
        mix_rows({**batch, "teacher": torch.zeros(2)}, [short], 0, "replace")


# --------------------------------------------------------------------------------------------
# the distillation term, by hand


class StubTeacher:
    """Uniform teacher logits (p = [1/2, 1/2] over a 2-token vocabulary); records the rows it saw."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def logits(self, batch):
        self.seen.append(batch["input_ids"])
        rows, width = batch["input_ids"].shape
        return torch.zeros(rows, width, 2)

    def state_dict(self):
        return {}


def test_replay_kl_is_the_mean_over_the_steps_replayed_tokens_by_hand():
    """Two micro-batches of one step. Teacher p = (1/2, 1/2) everywhere. Student logits (0, ln 3) give
    q = (1/4, 3/4): KL(p||q) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3) =: a; logits (0, 0) give 0.

    micro 0: rows [task, replayed]; the replayed row's two tokens have KL 0 and a.
    micro 1: rows [task, replayed]; the replayed row has one real token (KL a) and one pad.
    The step's mean over its 3 replayed tokens is (0 + a + a) / 3; the task rows (wild logits) count nothing.
    """
    a = 0.5 * math.log(4 / 3)
    lwf = build_strategy("lwf", {"anchor": "replay", "temperature": 1.0, "alpha": 1.0})
    teacher = StubTeacher()
    lwf._teacher = teacher
    wild = torch.tensor([9.0, -9.0])
    q = torch.tensor([0.0, math.log(3)])
    flat = torch.zeros(2)
    micro = [
        {"input_ids": torch.tensor([[5, 6], [7, 8]]), "attention_mask": torch.tensor([[1, 1], [1, 1]]),
         REPLAYED: torch.tensor([[0, 0], [1, 1]]), "logits": torch.stack([torch.stack([wild, wild]), torch.stack([flat, q])])},
        {"input_ids": torch.tensor([[5, 6], [9, 0]]), "attention_mask": torch.tensor([[1, 1], [1, 0]]),
         REPLAYED: torch.tensor([[0, 0], [1, 0]]), "logits": torch.stack([torch.stack([wild, wild]), torch.stack([q, wild])])},
    ]
    ctx = SimpleNamespace(task=None, micro_batch=0, step_tokens=None, step_parts=2)
    for m, b in enumerate(micro):  # the loop: every transform of the step before the first forward
        ctx.micro_batch = m
        lwf.transform_batch({k: v for k, v in b.items() if k != "logits"}, ctx)
    ctx.step_tokens = torch.tensor(7.0)  # inside the loop (attention tokens of the step; not what replay uses)
    terms = []
    for m, b in enumerate(micro):
        ctx.micro_batch = m
        out = SimpleNamespace(logits=b["logits"])
        terms.append(lwf.extra_losses(out, b, ctx)["kl"])
    # the loop averages each term over the step's parts (micro-batches x processes)
    assert (sum(terms) / 2).item() == pytest.approx((0 + a + a) / 3, rel=1e-6)
    assert terms[0].item() == pytest.approx(a / 2 * 2 * 2 / 3, rel=1e-6)  # micro 0: mean a/2 over 2 tokens, x 2 x 2 parts / 3
    assert [s.tolist() for s in teacher.seen] == [[[7, 8]], [[9, 0]]]  # the teacher ran on the replayed rows only
    # hooks driven by hand (no step): the plain mean over the micro-batch's replayed tokens
    ctx.step_tokens = None
    assert lwf.extra_losses(SimpleNamespace(logits=micro[0]["logits"]), micro[0], ctx)["kl"].item() == pytest.approx(a / 2)


def test_a_batch_without_replayed_rows_gives_a_zero_term_and_no_teacher_pass():
    lwf = build_strategy("lwf", {"anchor": "replay"})
    lwf._teacher = teacher = StubTeacher()
    batch = _batch(2)
    ctx = SimpleNamespace(task=None, micro_batch=0, step_tokens=None, step_parts=1)
    lwf.transform_batch(batch, ctx)
    term = lwf.extra_losses(SimpleNamespace(logits=torch.zeros(2, 3, 2)), batch, ctx)["kl"]
    assert term.item() == 0.0 and not teacher.seen


# --------------------------------------------------------------------------------------------
# configuration and the real loop


def test_replay_anchor_needs_replay_listed_before_it(tiny_model_dir, text_file, tmp_path):
    def check(strategies):
        config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", strategies)
        return validate_run_config(config.model_copy(update={"general_data": config.tasks[0].data}))

    lwf = {"name": "lwf", "anchor": "replay"}
    with pytest.raises(ConfigError, match="list replay before lwf"):
        check(["full", lwf])
    with pytest.raises(ConfigError, match="list replay before lwf in strategies"):
        check(["full", lwf, "replay"])
    assert [s.name for s in check(["full", "replay", lwf])] == ["full", "replay", "lwf"]
    with pytest.raises(ConfigError, match="needs a live teacher"):
        check(["full", "replay", {**lwf, "teacher": "cached_topk"}])


def test_der_hybrid_trains_and_distils_on_replayed_rows(tiny_model_dir, text_file, pc_file, tmp_path):
    strategies = ["full", {"name": "replay", "ratio": 0.5, "mode": "append"}, {"name": "lwf", "anchor": "replay"}]
    config = run_config(str(tiny_model_dir), pc_file, tmp_path / "run", strategies, steps=4, log_every=1, grad_accum=2)
    config = config.model_copy(update={"general_data": config.tasks[0].data.model_copy(update={"path": str(text_file)})})
    finetune(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    kl = [r["loss/lwf/kl"] for r in rows]
    assert all(math.isfinite(v) and v >= 0 for v in kl)
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # the first step's student is the teacher
    assert max(kl[1:]) > 0  # then the replayed rows are pulled back towards it
    assert rows[-1]["replay/realised_ratio"] == pytest.approx(0.5, abs=0.1)
