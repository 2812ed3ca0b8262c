"""Log-likelihood of continuations given contexts, scored like lm-eval's HFLM, with shared work.

The choices of a multiple-choice question share their context, so it is run once: either its KV
cache is copied under every continuation, or (when the model cannot take a cache) a pair whose input
is a prefix of another's rides along on that pair's forward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from retain.eval.tasks.scoring import (
    encode,
    forward_logits,
    length_sorted_batches,
    right_pad,
    supports_logits_to_keep,
    unwrapped,
)
from retain.models.runtime import eval_mode, model_device


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, with lm-eval's causal-LM convention so scores match it.

    Trailing whitespace of the context moves to the front of the continuation; ``context +
    continuation`` is tokenized jointly and the continuation is whatever follows the length of the
    context's own tokenization. Tokenizing jointly keeps the continuation's tokens the ones the model
    would really see (e.g. " Yes" as one word-initial token rather than " " + "Yes"). An empty
    context is replaced by the BOS (else EOS) token.
    """
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    if not context:
        return _encode_without_context(tokenizer, continuation)
    context_ids = encode(tokenizer, context)
    continuation_ids = encode(tokenizer, context + continuation)[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} produced no tokens after context {context[-40:]!r}")
    return context_ids, continuation_ids


def _encode_without_context(tokenizer: Any, continuation: str) -> tuple[list[int], list[int]]:
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = encode(tokenizer, continuation, special=False)
    if prefix is None:
        raise ValueError("an empty prompt needs a BOS or EOS token to condition on")
    if ids and ids[0] == prefix:
        return ids[:1], ids[1:]
    return [prefix], ids


def _prefix_owners(inputs: Sequence[tuple[int, ...]]) -> list[int]:
    """For each input, the index of an input that extends it (itself if none).

    A causal LM's logits at position p depend only on tokens <= p, so one forward pass of the
    longer sequence scores every prefix of it: the choices of a question share most of their
    input, and single-token choices (" Yes"/" No") share all of it. In lexicographic order an
    input that is a prefix of another is directly followed by one of its extensions, so one
    backwards sweep finds the longest extension of each.
    """
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    owner = list(range(len(inputs)))
    for pos in range(len(order) - 2, -1, -1):
        here, after = inputs[order[pos]], inputs[order[pos + 1]]
        if after[: len(here)] == here:
            owner[order[pos]] = owner[order[pos + 1]]
    return owner


def continuation_logprobs(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    max_length: int | None = None,
    share_context: bool = True,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context_ids, continuation_ids) pair.

    Over-long pairs are cut from the left to ``max_length + 1`` tokens (the model sees
    ``max_length``), as lm-eval does. Two ways to avoid recomputing shared text:

    * ``share_context`` (when several pairs share a context and the model supports it): each
      distinct context is run once, its KV cache is copied to every continuation, and only the
      continuations are run on top: k choices cost one context pass instead of k.
    * otherwise, pairs whose input is a prefix of another pair's share that pair's forward pass.
    """
    inputs, starts, targets = _scoring_layout(pairs, max_length)
    totals = torch.zeros(len(pairs), dtype=torch.float64)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (inp, start) in enumerate(zip(inputs, starts)):
        groups.setdefault(inp[: start + 1], []).append(i)
    remaining = list(range(len(pairs)))
    with eval_mode(model):
        if share_context and len(groups) < len(pairs) and supports_context_cache(model):
            remaining = _score_shared_contexts(model, groups, targets, batch_size, totals)
        if remaining:
            _score_by_prefix_owner(model, inputs, starts, targets, remaining, batch_size, totals)
    return totals.tolist()


def _scoring_layout(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int | None
) -> tuple[list[tuple[int, ...]], list[int], list[list[int]]]:
    """Model inputs, the position in each input whose logits predict the first continuation token
    (the last context token), and the continuation tokens."""
    inputs, starts, targets = [], [], []
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("every pair needs at least one context and one continuation token")
        if max_length is not None and len(continuation) > max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={max_length}")
        full = list(context) + list(continuation)
        if max_length is not None:
            full = full[-(max_length + 1) :]
        inputs.append(tuple(full[:-1]))
        starts.append(len(full) - 1 - len(continuation))
        targets.append(list(continuation))
    return inputs, starts, targets


def _gather_into(
    totals: torch.Tensor, logprobs: torch.Tensor, rows: list[int], positions: list[int], tokens: list[int], pairs: list[int]
) -> None:
    """totals[pairs[j]] += logprobs[rows[j], positions[j], tokens[j]] for every j, in one gather."""
    if not rows:
        return
    on = logprobs.device
    picked = logprobs[torch.tensor(rows, device=on), torch.tensor(positions, device=on), torch.tensor(tokens, device=on)]
    totals.index_add_(0, torch.tensor(pairs), picked.double().cpu())


# --- path 1: one forward pass per longest input; prefixes ride along --------------------------


def _score_by_prefix_owner(
    model: nn.Module,
    inputs: Sequence[tuple[int, ...]],
    starts: Sequence[int],
    targets: Sequence[Sequence[int]],
    subset: Sequence[int],
    batch_size: int,
    totals: torch.Tensor,
) -> None:
    local = _prefix_owners([inputs[i] for i in subset])
    served: dict[int, list[int]] = {}
    for k, owner in enumerate(local):
        served.setdefault(subset[owner], []).append(subset[k])
    rows = sorted(served)
    device = model_device(model)
    for batch in length_sorted_batches([len(inputs[r]) for r in rows], batch_size):
        owners = [rows[b] for b in batch]
        ids, _ = right_pad([inputs[r] for r in owners], device)
        width = ids.shape[1]
        keep = width - min(starts[i] for r in owners for i in served[r])
        logprobs = forward_logits(model, ids, keep).float().log_softmax(dim=-1)
        layout: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
        for row, owner in enumerate(owners):
            for i in served[owner]:
                n, first = len(targets[i]), starts[i] - (width - keep)
                for part, values in zip(layout, ([row] * n, range(first, first + n), targets[i], [i] * n)):
                    part.extend(values)
        _gather_into(totals, logprobs, *layout)


# --- path 2: each distinct context once, continuations on its copied KV cache ---------------


def _cache_argument(model: nn.Module) -> str | None:
    """Name of the forward argument taking a KV cache: ``cache`` (transformers 5) or ``past_key_values``."""
    try:
        params = inspect.signature(unwrapped(model).forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def supports_context_cache(model: nn.Module) -> bool:
    """Whether continuations can run on a copied context cache: a decoder-only model taking a KV
    cache and ``position_ids``, and no PEFT prompt learning (it re-prepends virtual tokens on every
    call). Cache types that are not plain attention are rejected later, at run time."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    if getattr(getattr(unwrapped(model), "config", None), "is_encoder_decoder", False):
        return False
    return _cache_argument(model) is not None


def _plain_attention_cache(cache: Any) -> bool:
    """Right-padded contexts leave junk slots in the cache that an attention mask hides; that is only
    sound for full-attention layers (not sliding windows, which drop old slots, or recurrent state)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _score_shared_contexts(
    model: nn.Module,
    groups: Mapping[tuple[int, ...], list[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int,
    totals: torch.Tensor,
) -> list[int]:
    """Score every pair via its context's cache; returns the pairs left for the plain path (all of
    them if the model's cache is not plain attention)."""
    device = model_device(model)
    for n_batch, keys in enumerate(_context_batches(groups, batch_size)):
        ids, lengths = right_pad(keys, device)
        cache = _score_first_tokens(model, ids, lengths, [groups[k] for k in keys], targets, totals)
        if n_batch == 0 and not _plain_attention_cache(cache):
            totals.zero_()
            return [i for members in groups.values() for i in members]
        _score_rest_on_cache(model, cache, lengths, [groups[k] for k in keys], targets, totals)
    return []


def _context_batches(groups: Mapping[tuple[int, ...], list[int]], batch_size: int) -> list[list[tuple[int, ...]]]:
    """Contexts, longest first, grouped so that a batch's continuations number at most
    ``batch_size`` (one context per batch if it alone has more): each continuation row holds a
    copy of its context's cache, so this bounds memory like ``batch_size`` sequences."""
    ordered = sorted(groups, key=lambda c: (-len(c), groups[c][0]))
    batches: list[list[tuple[int, ...]]] = []
    rows = 0
    for context in ordered:
        if batches and rows + len(groups[context]) <= batch_size:
            batches[-1].append(context)
            rows += len(groups[context])
        else:
            batches.append([context])
            rows = len(groups[context])
    return batches


def _score_first_tokens(
    model: nn.Module,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    members: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    totals: torch.Tensor,
) -> Any:
    """Run the contexts once; add log p(first continuation token); return the KV cache."""
    last = lengths - 1
    kwargs: dict[str, Any] = {"use_cache": True}
    column = last
    if supports_logits_to_keep(model):  # LM head only at each row's last context position
        keep = torch.unique(last)
        kwargs["logits_to_keep"] = keep
        column = torch.searchsorted(keep, last)
    out = model(input_ids=ids, **kwargs)
    logprobs = out.logits[torch.arange(len(members), device=ids.device), column].float().log_softmax(dim=-1)
    rows = [g for g, group in enumerate(members) for _ in group]
    pairs = [i for group in members for i in group]
    _gather_into(totals, logprobs[:, None, :], rows, [0] * len(rows), [targets[i][0] for i in pairs], pairs)
    return out.cache if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)


def _score_rest_on_cache(
    model: nn.Module,
    cache: Any,
    lengths: torch.Tensor,
    members: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    totals: torch.Tensor,
) -> None:
    """Feed continuation[:-1] of every multi-token pair on a copy of its context's cache."""
    rows = [(g, i) for g, group in enumerate(members) for i in group if len(targets[i]) > 1]
    if not rows:
        return
    device = lengths.device
    source = torch.tensor([g for g, _ in rows], device=device)
    cache.reorder_cache(source)  # one cache row per continuation (index_select, repeats allowed)
    ids, _ = right_pad([targets[i][:-1] for _, i in rows], device)
    width, cached = ids.shape[1], cache.get_seq_length()
    ctx_len = lengths[source]
    seen = torch.arange(cached, device=device)[None, :] < ctx_len[:, None]  # hide right-padding slots
    mask = torch.cat([seen, torch.ones(len(rows), width, dtype=torch.bool, device=device)], dim=1).long()
    positions = ctx_len[:, None] + torch.arange(width, device=device)[None, :]
    cache_kwarg = {_cache_argument(model) or "past_key_values": cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwarg)
    logprobs = out.logits.float().log_softmax(dim=-1)
    layout: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for row, (_, i) in enumerate(rows):
        rest = targets[i][1:]
        for part, values in zip(layout, ([row] * len(rest), range(len(rest)), rest, [i] * len(rest))):
            part.extend(values)
    _gather_into(totals, logprobs, *layout)
