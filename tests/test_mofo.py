"""MoFO (Chen et al. 2024): Adam that moves only the top fraction of each tensor by |first moment|."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import run_config

from retain.config import TrainConfig
from retain.train import finetune
from retain.train.loop import build_optimizer
from retain.train.optim import MoFO, top_fraction_mask

LR, B1, B2, EPS = 0.1, 0.9, 0.999, 1e-8


def adam_step(m: float, v: float, t: int) -> float:
    """The Adam update of one entry with moments m, v at step t (bias-corrected), by hand."""
    return -LR * (m / (1 - B1**t)) / (math.sqrt(v / (1 - B2**t)) + EPS)


def hand_step(m: list[float], v: list[float], expected: list[float], g: torch.Tensor, chosen: set[int], t: int) -> None:
    """One MoFO step by hand on 6 entries: every moment updates, only the ``chosen`` entries move."""
    for i in range(len(m)):
        m[i] = B1 * m[i] + (1 - B1) * g[i].item()
        v[i] = B2 * v[i] + (1 - B2) * g[i].item() ** 2
        if i in chosen:
            expected[i] += adam_step(m[i], v[i], t)


def test_only_the_top_fraction_by_momentum_moves_by_hand():
    """6 entries, fraction 0.5: k = 3 entries move per step, chosen by |m|, not by |g|.

    step 1: g = (6, 5, 4, 3, 2, 1)   m = 0.1 g = (.6, .5, .4, .3, .2, .1)          -> entries 0, 1, 2 move
    step 2: g = (0, 0, 0, 0, 0, 10)  m = 0.9 m + 0.1 g = (.54, .45, .36, .27, .18, 1.09) -> entries 5, 0, 1 move
    (by |g| alone step 2 would pick entry 5 and two zero-gradient entries). The moments of every entry
    are updated either way.
    """
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = MoFO([w], lr=LR, betas=(B1, B2), eps=EPS, fraction=0.5)
    g1 = torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64)
    g2 = torch.tensor([0.0, 0, 0, 0, 0, 10], dtype=torch.float64)
    expected = [0.0] * 6
    m = [0.0] * 6
    v = [0.0] * 6
    for t, (g, chosen) in enumerate([(g1, {0, 1, 2}), (g2, {5, 0, 1})], start=1):
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        hand_step(m, v, expected, g, chosen, t)
        moved = {i for i in range(6) if w[i].item() != before[i].item()}
        assert moved == chosen, t
        assert w.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert opt.state[w]["exp_avg"].tolist() == pytest.approx(m, rel=1e-12)  # every entry's moment moves
        assert opt.state[w]["exp_avg_sq"].tolist() == pytest.approx(v, rel=1e-12)


def test_selection_is_per_tensor_with_at_least_one_entry():
    """Each tensor keeps its own top share: a tensor of small momenta still moves its own largest entries."""
    big = torch.zeros(10, requires_grad=True)
    small = torch.zeros(2, 5, requires_grad=True)
    opt = MoFO([big, small], lr=LR, fraction=0.2)
    big.grad = torch.arange(10.0) + 100.0
    small.grad = (torch.arange(10.0) * 1e-3).reshape(2, 5)
    opt.step()
    assert (big != 0).nonzero().flatten().tolist() == [8, 9]
    assert (small.flatten() != 0).nonzero().flatten().tolist() == [8, 9]
    assert top_fraction_mask(torch.tensor([1.0, -3.0, 2.0]), 0.1).tolist() == [False, True, False]  # floor(0.3) -> 1
    assert top_fraction_mask(torch.tensor([1.0, 2.0]), 1.0) is None


def _adamw_and_mofo_trajectories(weight_decay: float, steps: int = 5):
    torch.manual_seed(0)
    init = [torch.randn(4, 7), torch.randn(7)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(steps)]
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=weight_decay, foreach=False),
                 lambda ps: MoFO(ps, lr=1e-2, weight_decay=weight_decay, fraction=1.0)):
        params = [t.clone().requires_grad_(True) for t in init]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append((params, opt))
    return results


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fraction_one_is_torch_adamw_bit_for_bit(weight_decay):
    (adamw_params, adamw), (mofo_params, mofo) = _adamw_and_mofo_trajectories(weight_decay)
    for a, b in zip(adamw_params, mofo_params):
        assert torch.equal(a, b)
    for pa, pb in zip(adamw_params, mofo_params):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(adamw.state[pa][key], mofo.state[pb][key]), key


def test_state_round_trips_through_a_checkpoint_and_resumes_exactly():
    torch.manual_seed(1)
    init = torch.randn(5, 6)
    grads = [torch.randn(5, 6) for _ in range(6)]

    def run(steps, opt_state=None, start=None):
        w = (start if start is not None else init).clone().requires_grad_(True)
        opt = MoFO([w], lr=1e-2, fraction=0.2)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for g in steps:
            w.grad = g.clone()
            opt.step()
        return w, opt

    whole, _ = run(grads)
    half, opt = run(grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as retain.train.checkpoint does, read back with weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["param_groups"][0]["fraction"] == 0.2
    resumed, _ = run(grads[3:], state, half.detach())
    assert torch.equal(whole, resumed)


def test_build_optimizer_filters_matrices_and_leaves_norms_and_biases_whole(llama):
    optimizer = build_optimizer(llama, TrainConfig(optimizer="mofo", mofo_fraction=0.05))
    assert isinstance(optimizer, MoFO)
    by_fraction = {g["fraction"]: g["params"] for g in optimizer.param_groups}
    assert set(by_fraction) == {0.05, 1.0}
    assert all(p.ndim >= 2 for p in by_fraction[0.05]) and all(p.ndim < 2 for p in by_fraction[1.0])
    assert type(build_optimizer(llama, TrainConfig())) is torch.optim.AdamW


def test_full_fine_tuning_under_mofo_moves_at_most_the_fraction_per_step(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    steps, fraction = 3, 0.05
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full"], steps=steps,
                        optimizer="mofo", mofo_fraction=fraction)
    tuned = finetune(config).model.state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, weight in base.items():
        if weight.ndim < 2:
            continue
        changed = int((tuned[name] != weight).sum())
        assert 0 < changed <= steps * max(1, int(weight.numel() * fraction)), (name, changed)
