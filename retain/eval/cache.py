"""Cache of evaluation scores keyed by (model fingerprint, suite hash).

The base model is evaluated once per suite and reused by every strategy run and every later
invocation; a fingerprint over the actual weights (not a path or name) makes reuse safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retain.report.schema import Score, atomic_write_text

_FINGERPRINT_VERSION = b"retain-fingerprint-v1"


def default_cache_dir() -> Path:
    """``$RETAIN_CACHE_DIR`` or ``~/.cache/retain``."""
    return Path(os.environ.get("RETAIN_CACHE_DIR") or Path.home() / ".cache" / "retain").expanduser()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes in its own dtype (exact, also for bfloat16), copied to CPU if needed."""
    flat = tensor.detach().contiguous().reshape(-1).to("cpu")
    return memoryview(flat.view(torch.uint8).numpy())


def _config_json(model: nn.Module) -> str:
    """Model (and PEFT) configuration without path-like bookkeeping keys, as canonical JSON."""
    config = getattr(model, "config", None)
    parts: dict[str, Any] = {"class": type(model).__name__}
    if config is not None and hasattr(config, "to_dict"):
        parts["config"] = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        parts["peft"] = {name: c.to_dict() if hasattr(c, "to_dict") else str(c) for name, c in peft_config.items()}
        parts["peft"] = {n: {k: v for k, v in d.items() if k != "base_model_name_or_path"} for n, d in parts["peft"].items()}
    return json.dumps(parts, sort_keys=True, default=str)


def _tokenizer_json(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    sample = tokenizer("Hello world, 123!")["input_ids"]  # catches normalizer/post-processor changes
    return json.dumps({"class": type(tokenizer).__name__, "vocab": vocab, "special": special, "sample": sample})


def model_fingerprint(model: nn.Module, tokenizer: Any = None) -> str:
    """sha256 over the model config, every state_dict entry's name/dtype/shape and raw bytes.

    Sound: any change of a weight, dtype, adapter weight or adapter hyper-parameter (LoRA alpha
    lives in the PEFT config) changes it. Not complete: an adapter merged into the weights hashes
    differently from the same adapter unmerged. Cost: one pass over all weights (plus a GPU->CPU
    copy per tensor); sha256 runs at roughly 1-2 GB/s, so about a second per 1B float16 params.
    With ``tokenizer``, its vocabulary and special tokens are included, since scores depend on it.
    """
    digest = hashlib.sha256(_FINGERPRINT_VERSION)
    digest.update(_config_json(model).encode())
    if tokenizer is not None:
        digest.update(_tokenizer_json(tokenizer).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def cache_path(cache_dir: str | os.PathLike[str] | None, fingerprint: str, suite_hash: str) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "eval" / f"{fingerprint[:16]}-{suite_hash[:16]}.json"


def _read_cached(path: Path, fingerprint: str, suite_hash: str) -> dict[str, Score] | None:
    """Scores from a cache file, or None if it is missing, unreadable or for other keys."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("fingerprint") != fingerprint or data.get("suite_hash") != suite_hash:
            return None  # 16-hex-digit prefix collision: treat as a miss
        return {name: Score.model_validate(score) for name, score in data["scores"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def cached_scores(
    cache_dir: str | os.PathLike[str] | None,
    fingerprint: str,
    suite_hash: str,
    compute: Callable[[], dict[str, Score]],
) -> dict[str, Score]:
    """Return cached scores for (model, suite) or call ``compute`` once and store its result.

    Stored as JSON under ``cache_dir/eval/<fingerprint[:16]>-<suite_hash[:16]>.json``, written to a
    temp file then ``os.replace``d, so concurrent runs never read a half-written file.
    ``cache_dir=None`` uses :func:`default_cache_dir`.
    """
    path = cache_path(cache_dir, fingerprint, suite_hash)
    hit = _read_cached(path, fingerprint, suite_hash)
    if hit is not None:
        return hit
    scores = compute()
    payload = {
        "fingerprint": fingerprint,
        "suite_hash": suite_hash,
        "scores": {name: json.loads(score.model_dump_json()) for name, score in scores.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2))
    return scores
