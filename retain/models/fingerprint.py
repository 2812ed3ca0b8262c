"""Fingerprints: a sha256 of what a model computes, so caches and statistics are reused only when valid.

Two views of one model:

- :func:`model_fingerprint`: the model as it is now, adapters and their configuration included (and
  the tokenizer when given). Keys the evaluation cache: any change of any weight changes it.
- :func:`base_fingerprint`: the *base* weights only, under canonical names (peft's wrapper prefix and
  ``base_layer`` hop removed, adapter tensors skipped), so a plain model and the same model wrapped
  with fresh LoRA adapters hash the same. Keys what describes the base model: cached reference
  outputs (STM, LwF top-k) and importance files.

Cost: one pass over the weights (sha256 runs at roughly 1-2 GB/s).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import torch
from torch import nn

from retain.models.adapters import base_parameters, is_peft_model
from retain.models.sharding import is_dtensor

_MODEL_VERSION = b"retain-fingerprint-v1"
_BASE_VERSION = b"retain-base-fingerprint-v2"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes in its own dtype (exact, also for bfloat16), copied to the CPU if needed. A
    sharded weight (FSDP2 DTensor) is gathered first: every process hashes the whole weight (a collective)."""
    if is_dtensor(tensor):
        tensor = tensor.full_tensor()
    flat = tensor.detach().contiguous().reshape(-1).to("cpu")
    return memoryview(flat.view(torch.uint8).numpy())


def config_json(model: nn.Module, with_peft: bool) -> str:
    """Model (and, with ``with_peft``, PEFT) configuration without bookkeeping keys, as canonical JSON."""
    base = model.get_base_model() if (not with_peft and is_peft_model(model)) else model
    config = getattr(base, "config", None)
    parts: dict[str, Any] = {"class": type(base).__name__}
    if config is not None and hasattr(config, "to_dict"):
        parts["config"] = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    peft_config = getattr(model, "peft_config", None) if with_peft else None
    if isinstance(peft_config, dict):
        dumped = {name: c.to_dict() if hasattr(c, "to_dict") else str(c) for name, c in peft_config.items()}
        parts["peft"] = {n: {k: v for k, v in d.items() if k != "base_model_name_or_path"} for n, d in dumped.items()}
    return json.dumps(parts, sort_keys=True, default=str)


def tokenizer_json(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    sample = tokenizer("Hello world, 123!")["input_ids"]  # catches normalizer/post-processor changes
    return json.dumps({"class": type(tokenizer).__name__, "vocab": vocab, "special": special, "sample": sample})


def _digest(version: bytes, header: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256(version)
    digest.update(header.encode())
    for name, tensor in tensors:
        digest.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def model_fingerprint(model: nn.Module, tokenizer: Any = None) -> str:
    """sha256 over the model (and PEFT) config, every ``state_dict`` entry, and the tokenizer if given.

    Sound: any change of a weight, dtype, adapter weight or adapter hyper-parameter changes it. Not
    complete: an adapter merged into the weights hashes differently from the same adapter unmerged.
    """
    header = config_json(model, with_peft=True) + (tokenizer_json(tokenizer) if tokenizer is not None else "")
    return _digest(_MODEL_VERSION, header, model.state_dict().items())


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base configuration and every base parameter under canonical names."""
    return _digest(_BASE_VERSION, config_json(model, with_peft=False), sorted(base_parameters(model).items()))
