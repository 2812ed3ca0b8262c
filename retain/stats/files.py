"""Importance files: weight statistics (EWC Fisher or element-wise importance) computed once and reused.

A file is a ``.safetensors`` of float tensors keyed by the base model's parameter names, with
metadata: format version, base-model fingerprint, method, estimator, samples, number of examples
and a hash of the token ids used. It holds no text: only per-weight numbers and hashes.

The fingerprint covers the model's configuration and the names, dtypes, shapes and bytes of its
*base* weights, under canonical names (peft's ``base_model.model.`` prefix and ``.base_layer``
removed, adapter weights skipped), so it is the same for a plain model and for that model wrapped
with fresh LoRA adapters. That is ``retain.models.fingerprint.base_fingerprint``, not ``model_fingerprint``, which
(correctly, for evaluation caching) also hashes adapters and their configuration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from retain.data.identity import examples_hash
from retain.errors import ConfigError
from retain.io import atomic_file
from retain.models.adapters import canonical_name, is_adapter_parameter
from retain.models.fingerprint import base_fingerprint

FORMAT = "retain-importance"
FORMAT_VERSION = "3"  # 2: base_fingerprint; 3: Fisher per scored token, SI along an AdamW path
METHODS = ("ewc", "importance")


class ImportanceFileError(ConfigError):
    """An importance file that cannot be used here (another model, another method, unreadable)."""


@dataclass
class ImportanceFile:
    tensors: dict[str, Tensor]
    method: str
    estimator: str
    samples: int
    examples: int
    data_hash: str
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"{self.method} statistics ({self.estimator}, {self.examples} examples, {self.samples} samples) "
            f"of model {self.fingerprint[:12]}"
        )


def save_importance(
    path: str | Path,
    tensors: Mapping[str, Tensor],
    *,
    model: nn.Module,
    method: str,
    estimator: str,
    samples: int,
    examples: Sequence[Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write statistics keyed by canonical base-parameter names, with the metadata that guards reuse."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got '{method}'")
    path = Path(path)
    data = {canonical_name(n): t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_fingerprint": base_fingerprint(model),
        "method": method,
        "estimator": estimator,
        "samples": str(samples),
        "examples": str(len(examples)),
        "data_hash": examples_hash(examples, with_labels=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    with atomic_file(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)
    return path


def load_importance(path: str | Path, *, model: nn.Module | None = None, methods: Sequence[str] = METHODS) -> ImportanceFile:
    """Read a file; refuse it (``ImportanceFileError``) for another model or a method not in ``methods``."""
    path = Path(path)
    if not path.is_file():
        raise ImportanceFileError(
            f"importance file not found: {path}. Create it with "
            "`retain importance compute --model M --data general.jsonl --method ewc --out F.safetensors`."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises several error types for damaged files
        raise ImportanceFileError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise ImportanceFileError(f"{path}: not a retain importance file (no '{FORMAT}' metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ImportanceFileError(
            f"{path}: importance file version {metadata.get('format_version')} is not {FORMAT_VERSION} (version 3 "
            "normalizes the Fisher per scored token and records importance along an AdamW path); recompute it "
            "with `retain importance compute`"
        )
    loaded = ImportanceFile(
        tensors=tensors,
        method=metadata["method"],
        estimator=metadata.get("estimator", ""),
        samples=int(metadata.get("samples", "0")),
        examples=int(metadata.get("examples", "0")),
        data_hash=metadata.get("data_hash", ""),
        fingerprint=metadata["model_fingerprint"],
        extra=json.loads(metadata.get("extra", "{}")),
    )
    if loaded.method not in methods:
        raise ImportanceFileError(
            f"{path} holds '{loaded.method}' statistics; this strategy needs {' or '.join(repr(m) for m in methods)}. "
            f"Recompute with --method {methods[0]}."
        )
    if model is not None:
        current = base_fingerprint(model)
        if current != loaded.fingerprint:
            raise ImportanceFileError(
                f"{path} was computed for another model (fingerprint {loaded.fingerprint[:12]}, this model is "
                f"{current[:12]}): its statistics describe other weights. Recompute it for this model with "
                "`retain importance compute --model <this model> ...`."
            )
    return loaded


def statistics_for(loaded: ImportanceFile, names: Sequence[str], path: str | Path) -> dict[str, Tensor]:
    """The file's tensors for the given (live) parameter names, by canonical name; a clear error if any is missing."""
    out, missing = {}, []
    for name in names:
        key = canonical_name(name)
        if key in loaded.tensors:
            out[name] = loaded.tensors[key]
        else:
            missing.append(name)
    if missing:
        adapters = [n for n in missing if is_adapter_parameter(n)]
        hint = (
            " An importance file holds statistics of the base weights, not of adapters: with LoRA use "
            "'ewc-lora' (it penalizes Delta W with the base weights' Fisher), or drop 'file' to compute "
            "the statistics in the run."
            if adapters
            else ""
        )
        raise ImportanceFileError(f"{path} has no statistics for {len(missing)} trainable weights (e.g. {missing[:3]}).{hint}")
    return out
