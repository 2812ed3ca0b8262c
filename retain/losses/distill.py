"""Pure tensor math for keeping a model's function: distillation, Bhattacharyya distance, token masks.

Shapes: logits are ``(batch, seq, vocab)``; ``mask`` is ``(batch, seq)`` with 1 where a position
counts (0 on padding). Reductions are means over counted positions, so a term's size does not
depend on batch size or sequence length, except where named otherwise (FIP's ``sum_sequences``). Everything is computed in float32 whatever the logits'
dtype, because log-softmax differences of bf16 logits lose the small probabilities KL depends on.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from retain.data.tokenize import IGNORE_INDEX as IGNORE_INDEX  # one definition; re-exported for older imports

StmMode = Literal["highest", "lowest_all", "lowest_matched", "random_official", "random_matched"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is non-zero (0 when nothing counts)."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_c p(c) (log p(c) - log q(c)) over the last dimension; classes with p = 0 contribute 0."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def kl_with_temperature(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), averaged over counted positions.

    p^T = softmax(logits / T). The T^2 factor (Hinton et al. 2015) keeps the gradient's size
    comparable across temperatures, since softening divides the logit gradients by T^2.
    """
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (t * t) * masked_mean(_kl_terms(log_teacher, log_student), mask)


def topk_teacher(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a cache keeps of a teacher at temperature T: its k most likely tokens and the rest's mass.

    Returns ``(log_q, indices, log_rest)``: the log-probabilities of softmax(logits / T) at its top-k
    tokens, their ids, and the log of the probability left outside them (-inf when k covers the
    vocabulary). Keeping the rest as one bucket keeps the cached KL exact at zero when the student
    equals the teacher; renormalising over the top-k alone would pull the student to be sharper.
    """
    log_probs = F.log_softmax(logits.float() / float(temperature), dim=-1)
    k = min(int(k), log_probs.shape[-1])
    log_q, indices = log_probs.topk(k, dim=-1)
    if k == log_probs.shape[-1]:
        log_rest = torch.full(log_q.shape[:-1], float("-inf"), device=log_q.device)
    else:
        log_rest = log_probs.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return log_q, indices, log_rest


def kl_with_temperature_topk(
    student_logits: torch.Tensor,
    teacher_log_q: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_log_rest: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T) from a cached teacher (:func:`topk_teacher` at the same T).

    Both distributions are collapsed to k + 1 outcomes: the teacher's top-k tokens and "any other
    token". This is a lower bound of the full KL that is exact when k = vocabulary size (the rest
    is then empty) and exactly zero whenever the student equals the teacher.
    """
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    indices = teacher_indices.long()
    kl = _kl_terms(teacher_log_q.float(), log_student.gather(-1, indices))
    if indices.shape[-1] < log_student.shape[-1]:
        student_rest = log_student.scatter(-1, indices, float("-inf")).logsumexp(-1)
        rest = teacher_log_rest.float()
        q_rest = rest.exp()
        kl = kl + torch.where(q_rest > 0, q_rest * (rest - student_rest), torch.zeros_like(q_rest))
    return (t * t) * masked_mean(kl, mask)


def bhattacharyya_per_token(logits: torch.Tensor, anchor_logits: torch.Tensor, eps_add: float = 0.0) -> torch.Tensor:
    """-log sum_c sqrt(p(c) p0(c) + eps_add) per position, p = softmax(logits), p0 = softmax(anchor).

    With ``eps_add = 0`` it is computed in log space, -logsumexp((log p + log p0) / 2), which is
    exact and has finite gradients even where probabilities underflow. The authors' code adds a small
    eps inside the square root for the same purpose; over a 32k vocabulary that eps sums to a
    noticeable offset, so it is opt-in here.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_p0 = F.log_softmax(anchor_logits.float(), dim=-1)
    if eps_add == 0.0:
        return -torch.logsumexp(0.5 * (log_p + log_p0), dim=-1)
    return -torch.log(torch.sqrt((log_p + log_p0).exp() + eps_add).sum(-1))


def bhattacharyya_distance(
    logits: torch.Tensor,
    anchor_logits: torch.Tensor,
    mask: torch.Tensor,
    eps_add: float = 0.0,
    reduction: Literal["mean_tokens", "sum_sequences"] = "mean_tokens",
) -> torch.Tensor:
    """Bhattacharyya distance between per-token output distributions: the mean over counted positions
    (``mean_tokens``), or the sum over sequences of each sequence's mean over its counted positions
    (``sum_sequences``: the authors' sum over a batch of examples, a sequence being one example)."""
    per_token = bhattacharyya_per_token(logits, anchor_logits, eps_add)
    if reduction == "mean_tokens":
        return masked_mean(per_token, mask)
    if reduction != "sum_sequences":
        raise ValueError(f"unknown reduction '{reduction}'; choose mean_tokens or sum_sequences")
    weights = mask.to(per_token.dtype)
    per_sequence = (per_token * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return per_sequence.sum()


def next_token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position CE of each token given its prefix: out[b, t] = -log p(input_ids[b, t] | < t).

    ``out[:, 0]`` is 0: a causal LM never predicts its first token. Same shape as ``input_ids``.
    """
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    if input_ids.shape[1] > 1:
        shifted = logits[:, :-1].float()
        out[:, 1:] = F.cross_entropy(shifted.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return out


def stm_drop_mask(
    token_ce: torch.Tensor,
    eligible: torch.Tensor,
    threshold: float,
    mode: StmMode = "highest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which tokens of one example Selective Token Masking drops from the loss (1-D bool).

    ``token_ce`` are the base model's per-token CEs, ``eligible`` marks the labelled tokens that a
    causal LM predicts (completion tokens; never position 0). Modes (Wu et al. 2025, and their code
    ``appier-research/robust-llm-finetunes``, ``collate_fn.py``):

    - ``highest`` (the method): every eligible token whose perplexity exp(CE) exceeds ``threshold``.
    - ``lowest_all`` (the official "lowest" ablation): every eligible token whose perplexity is
      *below* ``threshold``, however many that is.
    - ``random_official`` (the official "random" ablation): as many draws as ``highest`` would drop,
      positions drawn uniformly **with replacement over the whole sequence** (prompt included), so
      repeats and prompt positions mask nothing: fewer tokens leave the loss than ``highest`` drops.
    - ``lowest_matched`` / ``random_matched``: exactly as many eligible tokens as ``highest`` drops,
      the least surprising ones (ties: earliest first) / uniformly without replacement. A matched
      count isolates *which* tokens are dropped from *how many*.

    ``generator`` makes the random modes reproducible.
    """
    eligible = eligible.bool()
    cut = math.log(threshold)
    high = eligible & (token_ce > cut)
    if mode == "highest":
        return high
    if mode == "lowest_all":
        return eligible & (token_ce < cut)
    count = int(high.sum())
    drop = torch.zeros_like(eligible)
    if count == 0:
        return drop
    if mode == "random_official":
        positions = torch.randint(len(eligible), (count,), generator=generator)
        drop[positions] = True
        return drop & eligible
    candidates = eligible.nonzero().squeeze(1)
    if mode == "random_matched":
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    elif mode == "lowest_matched":
        order = torch.sort(token_ce[candidates], stable=True).indices
        chosen = candidates[order[:count]]
    else:
        raise ValueError(
            f"unknown STM mode '{mode}'; choose highest, lowest_all, lowest_matched, random_official or random_matched"
        )
    drop[chosen] = True
    return drop
