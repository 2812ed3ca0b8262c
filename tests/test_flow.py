"""FLOW (Sanyal et al. 2025): weight each example by exp(-L_base / tau) inside the loop's token-mean loss."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_config
from test_lwf_fip_stm import make_ctx

from retain.data import IGNORE_INDEX, Example
from retain.errors import ConfigError
from retain.losses.distill import next_token_cross_entropy
from retain.models.tiny import tiny_model
from retain.stats.token_tables import TokenTable
from retain.strategies import build_strategy
from retain.strategies.flow import SAMPLE_WEIGHT, example_losses, flow_weights
from retain.strategies.registry import validate_run_config
from retain.train import finetune

LN2, LN43 = math.log(2), math.log(4 / 3)


def test_weights_are_exp_of_minus_the_base_loss_over_the_median():
    weights, tau = flow_weights(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert tau == 2.0
    assert weights.tolist() == pytest.approx([math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)])
    weights, tau = flow_weights(torch.tensor([1.0, 2.0, 3.0, 5.0, float("nan")], dtype=torch.float64), tau_scale=0.5)
    assert tau == pytest.approx(0.5 * 2.5)  # the median of an even count: the middle pair's mean
    assert weights[-1].item() == 0.0 and weights[0].item() == pytest.approx(math.exp(-1 / 1.25))


def test_example_loss_is_the_mean_ce_over_its_scored_tokens():
    # two examples; per-token base CEs (position 0 is never predicted, prompt tokens are not scored)
    examples = [Example([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]), Example([5, 6], [5, 6])]
    table = TokenTable({"ce": torch.tensor([0.0, 9.0, 1.0, 3.0, 0.0, 4.0])}, torch.tensor([4, 2]))
    assert example_losses(examples, table).tolist() == [2.0, 4.0]


def _hand_batch():
    """Two rows, vocabulary of 2. logits (0, 0) give CE ln 2 for either token; (0, ln 3) give CE ln(4/3)
    for token 1. Row 0 scores positions 1 and 2 (CE ln2 each); row 1 scores position 2 only (CE ln(4/3))."""
    flat, tilted = [0.0, 0.0], [0.0, math.log(3)]
    logits = torch.tensor([[flat, flat, flat], [flat, tilted, flat]], requires_grad=True)
    labels = torch.tensor([[3, 0, 1], [3, IGNORE_INDEX, 1]])
    ids = labels.clamp_min(0)
    return logits, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    SAMPLE_WEIGHT: torch.tensor([[0.5] * 3, [2.0] * 3])}


def test_task_loss_plus_term_is_the_weighted_token_mean_by_hand():
    """Weights 0.5 and 2: FLOW's loss = (0.5 (ln2 + ln2) + 2 ln(4/3)) / 3 scored tokens."""
    logits, batch = _hand_batch()
    flow = build_strategy("flow", {})
    ctx = SimpleNamespace(task=None, micro_batch=0, step_tokens=None, step_parts=1)
    flow.transform_batch({k: v for k, v in batch.items() if k != SAMPLE_WEIGHT}, ctx)  # counts 3 scored tokens
    task = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX)
    term = flow.extra_losses(SimpleNamespace(logits=logits), batch, ctx)["reweight"]
    expected = (0.5 * 2 * LN2 + 2 * LN43) / 3
    assert task.item() == pytest.approx((2 * LN2 + LN43) / 3)
    assert (task + term).item() == pytest.approx(expected)
    # and its gradient is the weighted loss's
    (got,) = torch.autograd.grad(task + term, logits)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    (want,) = torch.autograd.grad((ce * torch.tensor([[0.5], [2.0]])).sum() / 3, logits)
    assert torch.allclose(got, want)


def test_in_the_loop_each_micro_batch_is_its_share_of_the_step_mean():
    """Two micro-batches of one step, the hand batch twice: the mean over parts of the terms is
    sum (w - 1) CE / (6 scored tokens) = 2 (-ln2 + ln(4/3)) / 6."""
    logits, batch = _hand_batch()
    flow = build_strategy("flow", {})
    ctx = SimpleNamespace(task=None, micro_batch=0, step_tokens=None, step_parts=2)
    for m in range(2):
        ctx.micro_batch = m
        flow.transform_batch({k: v for k, v in batch.items() if k != SAMPLE_WEIGHT}, ctx)
    ctx.step_tokens = torch.tensor(12.0)
    terms = []
    for m in range(2):
        ctx.micro_batch = m
        terms.append(flow.extra_losses(SimpleNamespace(logits=logits), batch, ctx)["reweight"])
    assert (sum(terms) / 2).item() == pytest.approx(2 * (-LN2 + LN43) / 6)


def test_rows_get_their_base_model_weight_and_other_rows_weigh_one(tmp_path, tokenizer, pc_file):
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    ctx = make_ctx(tmp_path, model, tokenizer, [pc_file], strategies=["full", "flow"])
    task = ctx.tasks[0]
    ctx.task = task
    flow = build_strategy("flow", {})
    flow.before_task(task, ctx)
    examples = task.train_examples[:2]
    with torch.no_grad():  # L_i directly from the base model
        losses = []
        for e in examples:
            ce = next_token_cross_entropy(model(torch.tensor([e.input_ids])).logits, torch.tensor([e.input_ids]))[0]
            scored = torch.tensor(e.labels) != IGNORE_INDEX
            scored[0] = False
            losses.append(ce[scored].mean().item())
    all_losses = flow._losses[0]
    assert all_losses[:2].tolist() == pytest.approx(losses, rel=1e-5)
    stranger = Example([5, 6, 7], [5, 6, 7])
    batch = ctx.collate([*examples, stranger])
    out = flow.transform_batch(batch, ctx)
    weights, tau = flow_weights(all_losses)
    assert out[SAMPLE_WEIGHT][:, 0].tolist() == pytest.approx([*weights[:2].tolist(), 1.0])
    assert tau == pytest.approx(float(np.median(all_losses.numpy())), rel=1e-12)


def test_flow_comes_after_the_strategies_that_transform_batches(tiny_model_dir, text_file, tmp_path):
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full", "flow", {"name": "stm"}])
    with pytest.raises(ConfigError, match="list it after stm"):
        validate_run_config(config)
    ok = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full", {"name": "stm"}, "flow"])
    assert [s.name for s in validate_run_config(ok)] == ["full", "stm", "flow"]


def test_full_plus_flow_trains_and_logs_its_term(tiny_model_dir, pc_file, tmp_path):
    config = run_config(str(tiny_model_dir), pc_file, tmp_path / "run", ["full", "flow"], steps=3, log_every=1, grad_accum=2)
    finetune(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["flow/tau"] > 0 and 0 < rows[0]["flow/mean_weight"] < 1
    assert all(math.isfinite(r["loss/flow/reweight"]) and r["loss/flow/reweight"] < 0 for r in rows)  # weights < 1
