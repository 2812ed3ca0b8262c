"""The function-preservation math against hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from retain.losses.distill import (
    bhattacharyya_distance,
    bhattacharyya_per_token,
    kl_with_temperature,
    kl_with_temperature_topk,
    masked_mean,
    next_token_cross_entropy,
    stm_drop_mask,
    topk_teacher,
)


def logits_of(*probabilities: list[float]) -> torch.Tensor:
    """(1, positions, vocab) logits whose softmax is exactly the given distributions."""
    return torch.tensor([probabilities], dtype=torch.float64).log()


def test_masked_mean_counts_only_masked_positions():
    values = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_kl_at_temperature_one_is_the_textbook_value():
    teacher = logits_of([0.75, 0.25], [0.5, 0.5])
    student = logits_of([0.5, 0.5], [0.9, 0.1])
    mask = torch.tensor([[1, 0]])  # second position is padding
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_with_temperature(student, teacher, mask, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_with_temperature_softens_both_and_scales_by_t_squared():
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])  # p = (3/4, 1/4) at T = 1
    student = torch.tensor([[[0.0, 0.0]]])
    mask = torch.ones(1, 1)
    # at T = 2: teacher ∝ (sqrt 3, 1), student stays uniform
    a = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    expected = 4.0 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert kl_with_temperature(student, teacher, mask, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # mean over two counted positions
    both = kl_with_temperature(student.repeat(1, 2, 1), torch.cat([teacher, student], 1), torch.ones(1, 2), 2.0)
    assert both.item() == pytest.approx(expected / 2, rel=1e-5)


def test_kl_ignores_classes_the_teacher_gives_zero_probability():
    teacher = torch.tensor([[[0.0, float("-inf")]]])
    student = logits_of([0.5, 0.5]).float()
    value = kl_with_temperature(student, teacher, torch.ones(1, 1), 1.0)
    assert value.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_topk_teacher_with_full_vocabulary_gives_the_exact_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 3, 7), torch.randn(2, 3, 7, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    log_q, ids, log_rest = topk_teacher(teacher, k=7, temperature=2.0)
    assert torch.isinf(log_rest).all()
    cached = kl_with_temperature_topk(student, log_q, ids, log_rest, mask, 2.0)
    live = kl_with_temperature(student, teacher, mask, 2.0)
    assert cached.item() == pytest.approx(live.item(), rel=1e-6)
    cached.backward()
    assert torch.isfinite(student.grad).all()


def test_topk_teacher_keeps_the_rest_as_one_bucket():
    teacher = logits_of([0.5, 0.3, 0.2]).float()
    student = logits_of([0.2, 0.5, 0.3]).float()
    log_q, ids, log_rest = topk_teacher(teacher, k=1, temperature=1.0)
    assert ids.tolist() == [[[0]]]
    assert log_rest.exp().item() == pytest.approx(0.5, rel=1e-6)
    value = kl_with_temperature_topk(student, log_q, ids, log_rest, torch.ones(1, 1), 1.0)
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # no pull toward a sharper student: zero when the student equals the teacher
    same = kl_with_temperature_topk(teacher, log_q, ids, log_rest, torch.ones(1, 1), 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_bhattacharyya_distance_by_hand():
    p, q = [0.5, 0.5], [0.9, 0.1]
    expected = -math.log(math.sqrt(0.45) + math.sqrt(0.05))
    per_token = bhattacharyya_per_token(logits_of(p), logits_of(q))
    assert per_token.item() == pytest.approx(expected, rel=1e-6)
    eps = 1e-3
    with_eps = bhattacharyya_per_token(logits_of(p), logits_of(q), eps_add=eps)
    assert with_eps.item() == pytest.approx(-math.log(math.sqrt(0.45 + eps) + math.sqrt(0.05 + eps)), rel=1e-6)
    mask = torch.tensor([[1, 0]])
    two = bhattacharyya_distance(logits_of(p, p), logits_of(q, [0.0001, 0.9999]), mask)
    assert two.item() == pytest.approx(expected, rel=1e-6)
    assert bhattacharyya_per_token(logits_of(q), logits_of(q)).item() == pytest.approx(0.0, abs=1e-7)


def test_bhattacharyya_sum_over_sequences_by_hand():
    """sum_sequences: each sequence's mean over its counted tokens, summed over sequences."""
    torch.manual_seed(0)
    logits, anchor = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_token = bhattacharyya_per_token(logits, anchor)
    expected = per_token[0].mean() + per_token[1, 0]
    got = bhattacharyya_distance(logits, anchor, mask, reduction="sum_sequences")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert bhattacharyya_distance(logits, anchor, mask).item() == pytest.approx(per_token[mask.bool()].mean().item(), rel=1e-6)


def test_bhattacharyya_gradient_is_finite_where_probabilities_underflow():
    logits = torch.tensor([[[0.0, -1e4, 3.0]]], requires_grad=True)
    anchor = torch.tensor([[[-1e4, 0.0, 1.0]]])
    bhattacharyya_distance(logits, anchor, torch.ones(1, 1)).backward()
    assert torch.isfinite(logits.grad).all()


def test_next_token_cross_entropy_by_hand():
    ids = torch.tensor([[0, 1, 1]])
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [5.0, 5.0]]])  # predicts ids[1], ids[2], (nothing)
    ce = next_token_cross_entropy(logits, ids)
    assert ce.shape == ids.shape
    assert ce[0, 0].item() == 0.0
    assert ce[0, 1].item() == pytest.approx(-math.log(0.25), rel=1e-6)
    assert ce[0, 2].item() == pytest.approx(math.log(2.0), rel=1e-6)


CE = torch.tensor([5.0, 0.1, 2.0, 0.5, 1.5, 3.0, math.log(2.5)])
ELIGIBLE = torch.tensor([False, True, True, True, True, False, True])  # position 0 and a prompt token excluded


def test_stm_highest_drops_eligible_tokens_above_the_perplexity_threshold():
    drop = stm_drop_mask(CE, ELIGIBLE, threshold=2.5, mode="highest")
    # exp(2.0) and exp(1.5) exceed 2.5; position 6 sits exactly at the threshold and stays
    assert drop.nonzero().squeeze(1).tolist() == [2, 4]


def test_stm_lowest_matched_drops_as_many_of_the_least_surprising_tokens():
    drop = stm_drop_mask(CE, ELIGIBLE, threshold=2.5, mode="lowest_matched")
    assert drop.nonzero().squeeze(1).tolist() == [1, 3]


def test_stm_lowest_all_is_the_official_ablation_every_token_below_the_threshold():
    """The authors' code masks every token with perplexity below the threshold, not a matched count."""
    drop = stm_drop_mask(CE, ELIGIBLE, threshold=2.5, mode="lowest_all")
    assert drop.nonzero().squeeze(1).tolist() == [1, 3]  # 0.1, 0.5; position 6 (= threshold) stays
    wide = stm_drop_mask(CE, ELIGIBLE, threshold=10.0, mode="lowest_all")  # exp(2.0)=7.4, exp(1.5)=4.5 < 10
    assert wide.nonzero().squeeze(1).tolist() == [1, 2, 3, 4, 6]
    assert int(stm_drop_mask(CE, ELIGIBLE, threshold=10.0, mode="highest").sum()) == 0  # not a matched count


def test_stm_random_matched_drops_as_many_eligible_tokens_reproducibly():
    first = stm_drop_mask(CE, ELIGIBLE, 2.5, "random_matched", torch.Generator().manual_seed(3))
    again = stm_drop_mask(CE, ELIGIBLE, 2.5, "random_matched", torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert int(first.sum()) == 2
    assert not (first & ~ELIGIBLE).any()
    picks = {tuple(stm_drop_mask(CE, ELIGIBLE, 2.5, "random_matched", torch.Generator().manual_seed(s)).nonzero().squeeze(1).tolist()) for s in range(20)}
    assert len(picks) > 1


def test_stm_random_official_draws_with_replacement_over_the_whole_sequence():
    """As many draws as highest drops, uniformly over all positions (prompt included), with repeats:
    the same draws as torch.randint, restricted to what can leave the loss."""
    for seed in range(30):
        drop = stm_drop_mask(CE, ELIGIBLE, 2.5, "random_official", torch.Generator().manual_seed(seed))
        draws = torch.randint(len(CE), (2,), generator=torch.Generator().manual_seed(seed))
        expected = torch.zeros(len(CE), dtype=torch.bool)
        expected[draws] = True
        assert torch.equal(drop, expected & ELIGIBLE), seed
    counts = {int(stm_drop_mask(CE, ELIGIBLE, 2.5, "random_official", torch.Generator().manual_seed(s)).sum()) for s in range(30)}
    assert counts == {0, 1, 2}  # repeats and ineligible positions drop nothing: not a matched count


def test_stm_lowest_and_random_mean_the_official_ablations():
    from retain.strategies.stm import StmConfig

    assert StmConfig(mode="lowest").mode == "lowest_all"
    assert StmConfig(mode="random").mode == "random_official"


def test_stm_nothing_to_drop():
    low = torch.full((4,), 0.01)
    for mode in ("highest", "random_official", "random_matched", "lowest_matched"):
        assert not stm_drop_mask(low, torch.ones(4, dtype=torch.bool), 2.5, mode).any()
    assert stm_drop_mask(low, torch.ones(4, dtype=torch.bool), 2.5, "lowest_all").all()
