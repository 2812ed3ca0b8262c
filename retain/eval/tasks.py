"""Evaluation primitives: pure functions of (model, tokenizer, data) -> a score.

Shared conventions, so numbers are comparable across runs and with lm-eval:

* The model is put in ``eval()`` mode and every module's previous train/eval flag is restored
  afterwards (a frozen submodule kept in eval mode by a strategy stays so). Gradients are off via
  ``torch.no_grad()`` rather than ``inference_mode``: tensors a model caches during an inference-mode
  forward (rotary tables, ...) would break a later training step.
* Batches are formed after sorting by length (longest first, ties by input order), so padding is
  minimal and results do not depend on the data order. Scoring passes right-pad and pass no attention
  mask: in a causal LM, padding after the last real token cannot change the logits of real tokens.
  (Continuations scored on a shared context's KV cache mask that cache's padding slots explicitly.)
* ``batch_size`` is the number of sequences per forward pass, which bounds memory.
* Logits are taken from the *end* of the model's output, so PEFT prompt tuning (which prepends
  virtual tokens) works unchanged. Inputs go to the device of the input embeddings.
* Results are :class:`TaskResult` values whose fields match ``retain.results.schema.Score`` minus the
  suite-level ``role``/``train_task``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from retain.data.sampling import seeded_subset
from retain.models.runtime import eval_mode, model_device

T = TypeVar("T")
Normalize = Literal["none", "token", "char"]
MatchMode = Literal["exact", "contains"]

# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TaskResult:
    """One measured value; the Score fields that do not depend on the suite."""

    value: float
    metric: str
    higher_is_better: bool
    bounded: bool
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Small shared helpers


def model_max_length(model: nn.Module) -> int | None:
    """The model's context size from its config (``max_position_embeddings``), if it states one."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _unwrapped(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Recent HF causal LMs can skip the LM head on positions we do not score."""
    try:
        return "logits_to_keep" in inspect.signature(_unwrapped(model).forward).parameters
    except (TypeError, ValueError):
        return False


def forward_logits(model: nn.Module, input_ids: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all when None), shape [batch, positions, vocab]."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if keep is not None and keep < input_ids.shape[1] and supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, **kwargs).logits
    positions = input_ids.shape[1] if keep is None else keep
    return logits[:, -positions:]


def right_pad(rows: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [B, max_len] padded on the right, lengths [B])."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    return ids.to(device), lengths.to(device)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first (ties in input order) to minimise padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode(tokenizer: Any, text: str, special: bool | None = None) -> list[int]:
    """Token ids; ``special=None`` uses the tokenizer's default (e.g. adds BOS) unless the text already
    starts with the BOS string, as lm-eval does."""
    kwargs: dict[str, Any] = {"verbose": False}
    bos = getattr(tokenizer, "bos_token", None)
    if special is None and bos and text.startswith(bos):
        special = False
    if special is not None:
        kwargs["add_special_tokens"] = special
    return list(tokenizer(text, **kwargs)["input_ids"])


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else float("inf")


# --------------------------------------------------------------------------------------------
# Language modelling: loss / perplexity / next-token accuracy over packed windows


def text_windows(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Tokenize each text (default special tokens), concatenate, cut into ``max_length`` windows.

    Windows do not overlap, so the first token of each window is context only; a final window
    shorter than 2 tokens (nothing to predict) is dropped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(tokenizer, text))
    windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [w for w in windows if len(w) >= 2]


@dataclass(frozen=True)
class WindowStats:
    """Token-weighted sums over all predicted positions of a set of windows."""

    nll_sum: float
    correct: int
    n_tokens: int


def window_stats(model: nn.Module, windows: Sequence[Sequence[int]], batch_size: int = 16) -> WindowStats:
    """Summed next-token NLL and top-1 hits over every predicted position of every window."""
    if not windows:
        raise ValueError("no token windows to evaluate (empty texts?)")
    device = model_device(model)
    nll, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for batch in length_sorted_batches([len(w) for w in windows], batch_size):
            ids, lengths = right_pad([windows[i] for i in batch], device)
            logits = forward_logits(model, ids)[:, :-1]
            positions = torch.arange(ids.shape[1] - 1, device=device)
            mask = positions[None, :] < (lengths - 1)[:, None]
            scored, targets = logits[mask].float(), ids[:, 1:][mask]
            nll += float(F.cross_entropy(scored, targets, reduction="none").double().sum())
            correct += int((scored.argmax(dim=-1) == targets).sum())
            count += int(targets.numel())
    return WindowStats(nll, correct, count)


def loss(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
    max_windows: int | None = None,
    seed: int = 0,
) -> tuple[TaskResult, TaskResult]:
    """(mean token NLL, perplexity = exp(NLL)) over packed windows of ``texts``; both lower-is-better.

    ``max_windows`` keeps a seeded subsample of the windows (cheap evals of long corpora).
    """
    windows = seeded_subset(text_windows(tokenizer, texts, max_length), max_windows, seed)
    stats = window_stats(model, windows, batch_size)
    mean_nll = stats.nll_sum / stats.n_tokens
    return (
        TaskResult(mean_nll, "loss", higher_is_better=False, bounded=False, n=stats.n_tokens),
        TaskResult(_safe_exp(mean_nll), "perplexity", higher_is_better=False, bounded=False, n=stats.n_tokens),
    )


def next_token_accuracy(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
    max_windows: int | None = None,
    seed: int = 0,
) -> TaskResult:
    """Share of positions whose argmax prediction is the actual next token (same windows as ``loss``)."""
    windows = seeded_subset(text_windows(tokenizer, texts, max_length), max_windows, seed)
    stats = window_stats(model, windows, batch_size)
    return TaskResult(stats.correct / stats.n_tokens, "next_token_accuracy", True, True, stats.n_tokens)


# --------------------------------------------------------------------------------------------
# Log-likelihood of continuations (multiple choice)


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
        params = inspect.signature(_unwrapped(model).forward).parameters
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
    if getattr(getattr(_unwrapped(model), "config", None), "is_encoder_decoder", False):
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


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice question: ``label`` indexes ``choices``."""

    prompt: str
    choices: list[str]
    label: int


def resolve_label(label: Any, choices: Sequence[str]) -> int:
    """An index, or the choice string itself (exact, then whitespace-insensitive), as an index."""
    if isinstance(label, bool):
        label = str(label)
    if isinstance(label, int):
        if not 0 <= label < len(choices):
            raise ValueError(f"label index {label} out of range for {len(choices)} choices")
        return label
    text = str(label)
    for candidates in (list(choices), [c.strip() for c in choices]):
        if text in candidates or text.strip() in candidates:
            return candidates.index(text if text in candidates else text.strip())
    if text.strip().isdigit():
        return resolve_label(int(text.strip()), choices)
    raise ValueError(f"label {label!r} is neither a choice {list(choices)} nor an index")


def _as_example(item: ChoiceExample | Mapping[str, Any]) -> ChoiceExample:
    if isinstance(item, ChoiceExample):
        return item
    choices = [str(c) for c in item["choices"]]
    return ChoiceExample(str(item["prompt"]), choices, resolve_label(item["label"], choices))


def choice_predictions(
    lls: Sequence[float], example: ChoiceExample, n_tokens: Sequence[int], normalize: Normalize
) -> int:
    """Index of the best choice (first on ties) under the chosen length normalisation."""
    if normalize == "token":
        scores = [ll / n for ll, n in zip(lls, n_tokens)]
    elif normalize == "char":
        scores = [ll / max(len(choice), 1) for ll, choice in zip(lls, example.choices)]
    else:
        scores = list(lls)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


_NORM_METRIC = {"none": "accuracy", "token": "accuracy_norm_token", "char": "accuracy_norm_char"}


def multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[ChoiceExample | Mapping[str, Any]],
    normalize: Normalize = "none",
    target_delimiter: str = " ",
    batch_size: int = 16,
    max_length: int | None = None,
) -> TaskResult:
    """Accuracy of picking the choice with the highest log p(delimiter + choice | prompt).

    Inputs longer than ``max_length`` (default: the model's context size) lose their oldest tokens.

    ``normalize``: "none" sums log-probs (metric "accuracy"); "token" divides by the choice's token
    count ("accuracy_norm_token"); "char" divides by the choice's length in characters, as lm-eval's
    ``acc_norm`` ("accuracy_norm_char"). All (prompt, choice) pairs go into one length-sorted pool.
    """
    items = [_as_example(e) for e in examples]
    if not items:
        raise ValueError("no multiple-choice examples to evaluate")
    max_length = max_length or model_max_length(model)
    pairs = [encode_pair(tokenizer, ex.prompt, target_delimiter + choice) for ex in items for choice in ex.choices]
    lls = continuation_logprobs(model, pairs, batch_size, max_length)
    correct, offset = 0, 0
    for ex in items:
        span = slice(offset, offset + len(ex.choices))
        n_tokens = [len(cont) for _, cont in pairs[span]]
        correct += int(choice_predictions(lls[span], ex, n_tokens, normalize) == ex.label)
        offset += len(ex.choices)
    return TaskResult(correct / len(items), _NORM_METRIC[normalize], True, True, len(items))


# --------------------------------------------------------------------------------------------
# Greedy generation


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(model.config, "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def greedy_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy continuations (decoded new tokens, special tokens skipped), in prompt order.

    Prompts are left-padded with an attention mask so every row's last prompt token sits at the
    same position; a fixed GenerationConfig makes decoding independent of the model's own defaults.
    """
    from transformers import GenerationConfig

    encoded = [encode(tokenizer, p) for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("an empty prompt with a tokenizer that adds no BOS cannot be generated from")
    pad_id = _pad_id(tokenizer, model)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # may list several
    eos = tokenizer.eos_token_id if eos is None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos)
    device = model_device(model)
    outputs: list[str] = [""] * len(prompts)
    with eval_mode(model):
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
            ids, mask = _left_pad([encoded[i] for i in batch], pad_id, device)
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new_tokens = generated[:, ids.shape[1] :]
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(new_tokens[row].tolist(), skip_special_tokens=True)
    return outputs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def is_match(prediction: str, target: str, match: MatchMode) -> bool:
    """exact: equal after stripping whitespace; contains: the stripped target occurs in the prediction."""
    if match == "exact":
        return prediction.strip() == target.strip()
    return target.strip() in prediction


def generation(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    match: MatchMode = "exact",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: Sequence[str] = ("\n",),
) -> TaskResult:
    """Share of prompts whose greedy completion (cut at the first ``stop`` string) matches its target."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("no generation examples to evaluate")
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = sum(is_match(cut_at_stop(c, stop), t, match) for c, t in zip(completions, targets))
    metric = "exact_match" if match == "exact" else "contains"
    return TaskResult(hits / len(prompts), metric, True, True, len(prompts))


def generate_samples(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 16
) -> dict[str, str]:
    """Prompt -> greedy continuation, for the report's before/after samples."""
    if not prompts:
        return {}
    return dict(zip(prompts, greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)))
