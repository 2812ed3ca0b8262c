"""Batching examples into padded tensors."""

from __future__ import annotations

from typing import Any

import torch

from retain.data.tokenize import IGNORE_INDEX, Example


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token if it lacks one (many causal LMs ship without).

    Batching needs some id to fill the short rows with. Reusing EOS (or UNK, or BOS) is safe and
    avoids growing the vocabulary: padded positions are hidden by ``attention_mask`` and carry
    ``-100`` labels, so the model never attends to or learns from them.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return tokenizer
    raise ValueError("the tokenizer has no pad, eos, unk or bos token; set tokenizer.pad_token before training")


def collate(examples: list[Example], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; call retain.data.ensure_pad_token(tokenizer) first")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
