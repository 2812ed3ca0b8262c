"""DFT: each label token's loss times its detached model probability, through the loop's token mean."""

from __future__ import annotations

import math

import pytest
import torch

from retain.data import IGNORE_INDEX
from retain.strategies.dft import dft_token_terms


def test_term_and_gradient_by_hand():
    # one row, two positions: the label of position 1 is token 1, which the logits [0, ln 3] give p = 3/4
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    ce = -math.log(0.75)
    term = dft_token_terms(logits, labels, 1.0)
    assert term.item() == pytest.approx((0.75 - 1.0) * ce)  # (p - 1) * CE
    half = dft_token_terms(logits, labels, 0.5)
    assert half.item() == pytest.approx((0.5 + 0.5 * 0.75 - 1.0) * ce)
    # plain CE + the term has DFT's gradient: p (detached) times CE's gradient
    (ce_plain,) = torch.nn.functional.cross_entropy(logits[0, :1], labels[0, 1:]).reshape(1)
    grad_ce = torch.autograd.grad(ce_plain, logits, retain_graph=True)[0]
    grad_dft = torch.autograd.grad(ce_plain + term, logits)[0]
    assert torch.allclose(grad_dft, 0.75 * grad_ce)


def test_ignored_labels_add_nothing():
    logits = torch.randn(2, 4, 5)
    labels = torch.full((2, 4), IGNORE_INDEX)
    assert dft_token_terms(logits, labels).item() == 0.0


def test_dft_with_flow_is_refused(tmp_path):
    from retain.config import load_config_dict
    from retain.errors import ConfigError
    from retain.strategies.registry import validate_run_config

    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a b c"}\n')
    config = {"model": {"name_or_path": "x"}, "tasks": [{"name": "t", "data": {"path": str(data)}}],
              "output": {"dir": str(tmp_path / "o")}}
    with pytest.raises(ConfigError, match="Keep one of them"):
        validate_run_config(load_config_dict({**config, "strategies": ["full", "flow", "dft"]}))
    with pytest.raises(ConfigError, match="list it after replay"):
        validate_run_config(load_config_dict({**config, "strategies": ["full", "dft", "replay"]}))


def test_each_micro_batch_is_its_share_of_the_step_mean():
    """Two micro-batches of one step: one scored token each (p = 3/4, and p = 1/2 for logits [0, 0]).
    The loop averages the terms over 2 parts: ((3/4 - 1) ln(4/3) + (1/2 - 1) ln 2) / 2 scored tokens."""
    from types import SimpleNamespace

    from retain.strategies.registry import build_strategy

    dft = build_strategy("dft", {})
    logits = [torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])]
    batch = {"input_ids": torch.tensor([[1, 1]]), "attention_mask": torch.ones(1, 2), "labels": torch.tensor([[IGNORE_INDEX, 1]])}
    ctx = SimpleNamespace(task=None, micro_batch=0, step_tokens=None, step_parts=2)
    for m in range(2):
        ctx.micro_batch = m
        dft.transform_batch(batch, ctx)
    ctx.step_tokens = torch.tensor(4.0)
    terms = []
    for m in range(2):
        ctx.micro_batch = m
        terms.append(dft.extra_losses(SimpleNamespace(logits=logits[m]), batch, ctx)["reweight"])
    expected = ((0.75 - 1) * math.log(4 / 3) + (0.5 - 1) * math.log(2)) / 2
    assert (sum(terms) / 2).item() == pytest.approx(expected)


def test_full_plus_dft_trains_under_accumulation(tiny_model_dir, pc_file, tmp_path):
    import json

    from conftest import run_config

    from retain.train import finetune

    finetune(run_config(str(tiny_model_dir), pc_file, tmp_path / "run", ["full", "dft"], steps=3, log_every=1, grad_accum=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/dft/reweight"]) and r["loss/dft/reweight"] < 0 for r in rows)  # every p < 1
