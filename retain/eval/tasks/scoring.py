"""Shared scoring helpers: tokenizing, batching, padding and one forward pass to logits.

Conventions every eval type follows, so numbers are comparable across runs and with lm-eval:

* The model is put in ``eval()`` mode and every module's previous train/eval flag is restored
  afterwards (``retain.models.runtime.eval_mode``). Gradients are off via ``torch.no_grad()`` rather
  than ``inference_mode``: tensors a model caches during an inference-mode forward (rotary tables,
  ...) would break a later training step.
* Batches are formed after sorting by length (longest first, ties by input order), so padding is
  minimal and results do not depend on the data order. Scoring passes right-pad and pass no attention
  mask: in a causal LM, padding after the last real token cannot change the logits of real tokens.
* ``batch_size`` is the number of sequences per forward pass, which bounds memory.
* Logits are taken from the *end* of the model's output, so PEFT prompt tuning (which prepends
  virtual tokens) works unchanged. Inputs go to the device of the input embeddings.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def model_max_length(model: nn.Module) -> int | None:
    """The model's context size from its config (``max_position_embeddings``), if it states one."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def unwrapped(model: nn.Module) -> nn.Module:
    """The base model under a PEFT wrapper (its ``forward`` signature is the informative one)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Recent HF causal LMs can skip the LM head on positions we do not score."""
    try:
        return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters
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


def safe_exp(x: float) -> float:
    """``exp`` that saturates to inf instead of raising OverflowError (perplexity of a broken model)."""
    return math.exp(x) if x < 709.0 else float("inf")
