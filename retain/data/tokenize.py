"""Turning records into token ids and labels (``-100`` where no loss is taken).

* text: documents with the tokenizer's default special tokens (+ EOS), packed into full windows of
  ``data.max_length`` (``data.pack``) or one truncated example per document; every token is labelled.
* prompt_completion: loss only on the completion (+ EOS).
* chat: loss only on assistant turns (see ``retain.data.chat``).

An example longer than ``data.max_length`` is cut by ``data.truncation``: ``keep_completion`` (default)
removes tokens from the start of the unlabelled part (the prompt; for chats the oldest turns go first),
keeping BOS, so the part that is trained survives; ``right`` keeps the start; ``left`` keeps the end
(and BOS). One warning says how many examples were cut.

Masking a prefix is done on the tokenization of the whole text when the prefix's own token ids are a
prefix of it (the common case: the ids are then exactly what the model sees at inference).
Otherwise (a token merges across the boundary) each piece is tokenized separately and the ids are
concatenated, which keeps the boundary exact at the price of a slightly unusual tokenization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from retain.config import DataConfig
from retain.data.chat import drop_oldest_turn, normalize_messages, render_chat
from retain.data.records import DataError, detect_format, record_where

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

#: the label of a position that is not scored (padding, prompts, masked tokens): PyTorch's cross-entropy default
IGNORE_INDEX = -100

Records = list[dict[str, Any]]
Masked = tuple[list[int], list[bool]]  # token ids and, per token, whether it is labelled


def count_scored_tokens(labels: "torch.Tensor") -> "torch.Tensor":
    """Labelled positions a causal LM predicts (position 0 never is), as a 0-d tensor on ``labels``' device
    (no host sync): the unit the task loss averages over, in the loop and in the Trainer integration alike."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        """Labelled positions that are predicted: a causal LM never predicts position 0."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class TokenizeStats:
    """Counts reported after tokenization so a run log shows what the data turned into."""

    n_records: int = 0
    n_examples: int = 0
    n_tokens: int = 0
    n_loss_tokens: int = 0
    n_truncated: int = 0
    n_dropped: int = 0  # examples with no loss token (e.g. prompt filled the whole window)

    @classmethod
    def of(cls, examples: list[Example], n_records: int, n_truncated: int = 0, n_dropped: int = 0) -> "TokenizeStats":
        return cls(
            n_records=n_records,
            n_examples=len(examples),
            n_tokens=sum(len(e) for e in examples),
            n_loss_tokens=sum(e.n_loss_tokens for e in examples),
            n_truncated=n_truncated,
            n_dropped=n_dropped,
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# Token helpers


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    # verbose=False: long documents are expected here; they are packed or truncated afterwards
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _pieces(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """``text`` cut at span edges into (piece, labelled) pairs."""
    edges = sorted({0, len(text), *(b for span in spans for b in span)})
    return [
        (text[a:b], any(s <= a and b <= e for s, e in spans)) for a, b in zip(edges, edges[1:]) if b > a
    ]


def _prefix_cuts(tokenizer: Any, pieces: list[tuple[str, bool]], full: list[int], special: bool) -> list[int] | None:
    """Token index where each piece ends in ``full``, or None if some prefix does not tokenize as a prefix."""
    cuts: list[int] = []
    text = ""
    for piece, _ in pieces[:-1]:
        text += piece
        ids = encode(tokenizer, text, special)
        if full[: len(ids)] != ids or (cuts and len(ids) < cuts[-1]):
            return None
        cuts.append(len(ids))
    return cuts + [len(full)]


def _encode_pieces(tokenizer: Any, pieces: list[tuple[str, bool]], special: bool) -> Masked:
    """Fallback: each piece tokenized on its own (special tokens only on the first) and concatenated."""
    ids: list[int] = []
    mask: list[bool] = []
    for k, (piece, labelled) in enumerate(pieces):
        piece_ids = encode(tokenizer, piece, special and k == 0)
        ids += piece_ids
        mask += [labelled] * len(piece_ids)
    return ids, mask


def encode_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], special: bool) -> Masked:
    """Token ids of ``text`` and, per token, whether it lies in one of the character ``spans``."""
    pieces = _pieces(text, spans)
    full = encode(tokenizer, text, special)
    cuts = _prefix_cuts(tokenizer, pieces, full, special)
    if cuts is None:
        return _encode_pieces(tokenizer, pieces, special)
    mask: list[bool] = []
    for (_, labelled), start, end in zip(pieces, [0, *cuts], cuts):
        mask += [labelled] * (end - start)
    return full, mask


def _eos_id(tokenizer: Any, add_eos: bool) -> int | None:
    return getattr(tokenizer, "eos_token_id", None) if add_eos else None


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    """Append EOS unless the tokenizer already ended the sequence with it."""
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _example(ids: list[int], mask: list[bool]) -> Example:
    return Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])


# --------------------------------------------------------------------------------------------
# Field access with readable errors

_FIELD_KEY = {
    "text_field": "text",
    "prompt_field": "prompt",
    "completion_field": "completion",
    "messages_field": "conversation",
}


def get_field(record: dict[str, Any], cfg: DataConfig, key: str, where: str, require_str: bool = True) -> Any:
    name = getattr(cfg, key)
    if name not in record:
        have = ", ".join(map(str, record)) or "(none)"
        raise DataError(
            f"{where}: missing field '{name}' (the record has fields: {have}). "
            f"Set data.{key} to the field that holds the {_FIELD_KEY[key]}, or fix the record."
        )
    value = record[name]
    if require_str and not isinstance(value, str):
        raise DataError(
            f"{where}: field '{name}' must be a string, got {type(value).__name__} ({repr(value)[:60]}). "
            f"Fix the record or set data.{key} to a text field."
        )
    return value


# --------------------------------------------------------------------------------------------
# Per format


def _text_documents(records: Records, tokenizer: Any, cfg: DataConfig, source: str) -> list[list[int]]:
    texts = [get_field(r, cfg, "text_field", record_where(r, i, source)) for i, r in enumerate(records)]
    eos = _eos_id(tokenizer, cfg.add_eos)
    batch = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else []
    return [_with_eos(list(ids), eos) for ids in batch]


def pack_windows(documents: list[list[int]], length: int) -> list[list[int]]:
    """Concatenate documents and cut windows of exactly ``length``; a short tail is kept only if alone."""
    stream = [t for doc in documents for t in doc]
    windows = [stream[i : i + length] for i in range(0, len(stream), length)]
    if len(windows) > 1 and len(windows[-1]) < length:
        windows.pop()
    return windows


def text_examples(records: Records, tokenizer: Any, cfg: DataConfig, source: str) -> tuple[list[Example], int]:
    """Examples from plain text and how many documents were truncated (never any when packing)."""
    documents = _text_documents(records, tokenizer, cfg, source)
    if cfg.pack:
        return [Example(w, list(w)) for w in pack_windows(documents, cfg.max_length)], 0
    truncated = sum(len(d) > cfg.max_length for d in documents)
    examples = []
    for document in documents:
        ids, _ = fit_length(document, [True] * len(document), cfg.max_length, cfg.truncation, _bos_head(document, tokenizer))
        examples.append(Example(ids, list(ids)))
    return examples, truncated


def prompt_completion_ids(record: dict[str, Any], tokenizer: Any, cfg: DataConfig, where: str) -> Masked:
    prompt = get_field(record, cfg, "prompt_field", where)
    completion = get_field(record, cfg, "completion_field", where)
    text = prompt + completion
    ids, mask = encode_spans(tokenizer, text, [(len(prompt), len(text))], special=True)
    full = _with_eos(ids, _eos_id(tokenizer, cfg.add_eos))
    return full, mask + [True] * (len(full) - len(ids))


def chat_ids(record: dict[str, Any], tokenizer: Any, cfg: DataConfig, where: str) -> Masked:
    ids, mask, _ = chat_ids_fitted(record, tokenizer, cfg, where)
    return ids, mask


def chat_ids_fitted(record: dict[str, Any], tokenizer: Any, cfg: DataConfig, where: str) -> tuple[list[int], list[bool], bool]:
    """Ids, mask and whether turns were dropped: with ``keep_completion`` an over-long conversation loses
    its oldest turns first (a leading system message stays, the last assistant turn is never dropped)."""
    raw = get_field(record, cfg, "messages_field", where, require_str=False)
    messages = normalize_messages(raw, where, cfg.messages_field)
    dropped = False
    while True:
        rendered = render_chat(messages, tokenizer, cfg.add_eos, where)
        ids, mask = encode_spans(tokenizer, rendered.text, rendered.spans, rendered.add_special_tokens)
        shorter = drop_oldest_turn(messages) if cfg.truncation == "keep_completion" and len(ids) > cfg.max_length else None
        if shorter is None:
            return ids, mask, dropped
        messages, dropped = shorter, True


def _prompt_completion_fitted(record: dict[str, Any], tokenizer: Any, cfg: DataConfig, where: str) -> tuple[list[int], list[bool], bool]:
    ids, mask = prompt_completion_ids(record, tokenizer, cfg, where)
    return ids, mask, False


_MASKED_BUILDERS = {"prompt_completion": _prompt_completion_fitted, "chat": chat_ids_fitted}


def masked_examples(
    records: Records, tokenizer: Any, cfg: DataConfig, fmt: str, source: str
) -> tuple[list[Example], int]:
    build = _MASKED_BUILDERS[fmt]
    examples, truncated = [], 0
    for i, record in enumerate(records):
        ids, mask, shortened = build(record, tokenizer, cfg, record_where(record, i, source))
        truncated += shortened or len(ids) > cfg.max_length
        examples.append(_example(*fit_length(ids, mask, cfg.max_length, cfg.truncation, _bos_head(ids, tokenizer))))
    return examples, truncated


# --------------------------------------------------------------------------------------------
# Truncation


def fit_length(ids: list[int], mask: list[bool], max_length: int, truncation: str, head: int = 0) -> Masked:
    """``ids``/``mask`` cut to ``max_length`` tokens as ``truncation`` says; the first ``head`` tokens
    (BOS) are kept by ``left`` and ``keep_completion``.

    ``keep_completion`` removes tokens from the start of the unlabelled run that follows ``head`` (the
    prompt), as many as needed and available; if the labelled part alone is still too long, its end is cut.
    """
    if len(ids) <= max_length:
        return ids, mask
    head = min(head, max_length - 1)
    if truncation == "right":
        return ids[:max_length], mask[:max_length]
    if truncation == "left":
        keep = max_length - head
        return ids[:head] + ids[len(ids) - keep :], mask[:head] + mask[len(mask) - keep :]
    first_labelled = next((i for i, m in enumerate(mask) if m and i >= head), len(mask))
    cut = min(len(ids) - max_length, max(0, first_labelled - head))
    ids, mask = ids[:head] + ids[head + cut :], mask[:head] + mask[head + cut :]
    return ids[:max_length], mask[:max_length]


def _bos_head(ids: list[int], tokenizer: Any) -> int:
    """1 when the sequence starts with the tokenizer's BOS (kept by every truncation), else 0."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return 1 if bos is not None and ids and ids[0] == bos else 0


# --------------------------------------------------------------------------------------------
# Entry point


_HOW_CUT = {
    "keep_completion": "the start of each prompt (for chats, the oldest turns) was removed so what is trained survives",
    "right": "their ends were cut off",
    "left": "their starts were cut off",
}


def _warn_truncated(n_truncated: int, n_total: int, cfg: DataConfig, source: str) -> None:
    """One warning per tokenized set (a log record, printed once; never also a Python warning)."""
    logger.warning(
        "%s: %d of %d examples are longer than data.max_length and were truncated to %d tokens "
        "(data.truncation: %s: %s); raise data.max_length to keep them whole.",
        source, n_truncated, n_total, cfg.max_length, cfg.truncation, _HOW_CUT[cfg.truncation],
    )


_MASKED_CAUSE = {
    "prompt_completion": "prompts at least data.max_length ({n}) tokens long, so the completion is cut off "
    "(data.truncation: right); raise data.max_length, shorten the prompts or use data.truncation: keep_completion",
    "chat": "conversations without assistant turns (role 'assistant'), or user turns filling data.max_length "
    "({n}) tokens; check the roles or raise data.max_length",
    "text": "empty documents; check data.text_field",
}


def _drop_unlabelled(examples: list[Example], fmt: str, cfg: DataConfig, source: str) -> tuple[list[Example], int]:
    kept = [e for e in examples if e.n_loss_tokens > 0]
    if not kept:
        cause = _MASKED_CAUSE[fmt].format(n=cfg.max_length)
        raise DataError(f"{source}: every label is masked, so there is nothing to train on. Likely cause: {cause}.")
    dropped = len(examples) - len(kept)
    if dropped:
        logger.warning("%s: dropped %d of %d examples with no token to learn from", source, dropped, len(examples))
    return kept, dropped


def _warn_empty_completions(records: Records, cfg: DataConfig, source: str) -> None:
    """A record with ``completion: ""`` teaches the model to stop right after the prompt (or, without EOS,
    nothing): almost always a data mistake, so say how many there are."""
    empty = sum(1 for record in records if not str(record.get(cfg.completion_field) or "").strip())
    if empty:
        learnt = "only the EOS token is learnt from them" if cfg.add_eos else "nothing is learnt from them"
        logger.warning("%s: %d of %d records have an empty '%s': %s; check the data or data.completion_field",
                       source, empty, len(records), cfg.completion_field, learnt)


def tokenize_records(
    records: Records, tokenizer: Any, cfg: DataConfig, source: str
) -> tuple[list[Example], TokenizeStats]:
    """Examples (ids + labels) for ``records`` in ``cfg``'s format, and counts describing them."""
    if not records:
        raise DataError(f"{source}: no records to tokenize.")
    fmt = detect_format(records, cfg)
    if cfg.add_eos and getattr(tokenizer, "eos_token_id", None) is None:
        logger.warning("%s: the tokenizer has no EOS token, so data.add_eos has no effect", source)
    if fmt == "prompt_completion":
        _warn_empty_completions(records, cfg, source)
    if fmt == "text":
        examples, truncated = text_examples(records, tokenizer, cfg, source)
    else:
        examples, truncated = masked_examples(records, tokenizer, cfg, fmt, source)
    if truncated:
        _warn_truncated(truncated, len(examples), cfg, source)
    examples, dropped = _drop_unlabelled(examples, fmt, cfg, source)
    return examples, TokenizeStats.of(examples, len(records), truncated, dropped)
