"""Reference models for function-preserving strategies: where "what the model used to do" comes from.

Three sources, cheapest first:

- the training model itself with its PEFT adapters disabled (``with model.disable_adapter():``): the
  frozen base weights *are* the original model, so no copy exists in memory;
- a frozen deep copy, when every weight trains (full fine-tuning);
- per-token outputs computed ahead of training and cached on disk (:class:`TokenTable`), for when a
  teacher and a student do not both fit, or when the reference is only needed once (STM's
  perplexities). Cache files are keyed by a fingerprint of the reference weights and a hash of the
  token ids, so a changed model or changed data never reuses a stale file.

Batches carry no example ids, so per-example caches are looked up by the example's own token ids
(:func:`example_key`); that also works after other strategies reorder or extend a batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from retain.data import Example

_FINGERPRINT_VERSION = b"retain-base-function-v1"
_TABLE_VERSION = "1"


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_prompt_learning(model: nn.Module) -> bool:
    """PEFT soft prompts (prompt tuning, p-tuning, prefix tuning): the base weights are never wrapped."""
    if not is_peft_model(model):
        return False
    return bool(model.peft_config[model.active_adapter].is_prompt_learning)


@contextmanager
def reference_forward(model: nn.Module, adapters_off: bool = False) -> Iterator[nn.Module]:
    """Evaluation mode, no gradients and (optionally) adapters disabled, restored afterwards.

    Reference outputs must be deterministic (no dropout) and must not enter the autograd graph.
    """
    was_training = model.training
    model.eval()
    disable = model.disable_adapter() if adapters_off and is_peft_model(model) else nullcontext()
    try:
        with torch.no_grad(), disable:
            yield model
    finally:
        model.train(was_training)


def align_to_inputs(logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Logits of the input positions only: PEFT prompt tuning prepends virtual-token positions."""
    return logits[:, -seq_len:] if logits.shape[1] > seq_len else logits


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy that never trains: no gradients, evaluation mode."""
    teacher = copy.deepcopy(model)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


# --------------------------------------------------------------------------------------------
# Identities: examples, data, reference weights


def example_key(token_ids: Sequence[int] | torch.Tensor) -> bytes:
    """A short digest of an example's token ids: how caches find an example inside a batch."""
    if isinstance(token_ids, torch.Tensor):
        array = token_ids.detach().to("cpu", torch.int64).numpy()
    else:
        array = np.asarray(token_ids, dtype=np.int64)
    return hashlib.blake2b(array.tobytes(), digest_size=16).digest()


def batch_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[bytes, torch.Tensor]]:
    """(example key, positions of its real tokens) for each row of a padded batch."""
    rows = []
    for ids, mask in zip(input_ids.to("cpu"), attention_mask.to("cpu")):
        positions = mask.nonzero().squeeze(1)
        rows.append((example_key(ids[positions]), positions))
    return rows


def examples_hash(examples: Sequence["Example"]) -> str:
    """sha256 over every example's token ids, in order (labels excluded: outputs depend on ids only)."""
    digest = hashlib.sha256(b"retain-examples-v1")
    for example in examples:
        ids = np.asarray(example.input_ids, dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
    return digest.hexdigest()


def _adapter_attribute_names(model: nn.Module) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names.update(module.adapter_layer_names)
    return names


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the base model's function: its config and every non-adapter weight.

    PEFT adapter tensors are skipped and ``base_layer`` is dropped from names, so the same base
    weights hash identically with or without LoRA wrapped around them (one cache serves ``full+stm``
    and ``lora+stm`` runs). Any change of a base weight, dtype or shape changes the fingerprint.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    skip = _adapter_attribute_names(base)
    digest = hashlib.sha256(_FINGERPRINT_VERSION)
    config = getattr(base, "config", None)
    parts: dict[str, Any] = {"class": type(base).__name__}
    if config is not None and hasattr(config, "to_dict"):
        parts["config"] = {
            k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
        }
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    for name, tensor in base.state_dict().items():
        pieces = name.split(".")
        if skip.intersection(pieces):
            continue
        clean = ".".join(p for p in pieces if p != "base_layer")
        digest.update(f"\n{clean}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().contiguous().reshape(-1).to("cpu")
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def current_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the model as it is now, adapters included (the evaluation cache's)."""
    from retain.eval.cache import model_fingerprint

    return model_fingerprint(model)


# --------------------------------------------------------------------------------------------
# Per-token tables: computed once over a list of examples, cached on disk


@dataclass
class TokenTable:
    """Per-token tensors for a list of examples, stored flat.

    ``tensors[name]`` has one row per token of all examples concatenated; example ``i`` owns rows
    ``offsets[i]:offsets[i+1]``. Flat storage keeps the file one safetensors tensor per field.
    """

    tensors: dict[str, torch.Tensor]
    lengths: torch.Tensor

    def __post_init__(self) -> None:
        self.offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.lengths.to(torch.int64), 0)

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, index: int, name: str) -> torch.Tensor:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tensors[name][start:end]

    @classmethod
    def from_examples(cls, rows: list[dict[str, torch.Tensor]]) -> "TokenTable":
        names = list(rows[0]) if rows else []
        lengths = torch.tensor([len(next(iter(r.values()))) for r in rows], dtype=torch.int64)
        tensors = {n: torch.cat([r[n] for r in rows]) if rows else torch.empty(0) for n in names}
        return cls(tensors, lengths)

    def matches(self, examples: Sequence["Example"]) -> bool:
        return len(examples) == len(self) and all(len(e.input_ids) == int(n) for e, n in zip(examples, self.lengths))

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """Write atomically (temp file + rename), so concurrent runs never read half a file."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        payload = {f"field.{k}": v.contiguous() for k, v in self.tensors.items()}
        payload["lengths"] = self.lengths.contiguous()
        save_file(payload, str(tmp), metadata={**metadata, "table_version": _TABLE_VERSION})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, metadata: dict[str, str]) -> "TokenTable | None":
        """The table at ``path`` if it exists and was written for exactly ``metadata``; else None."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = handle.metadata() or {}
                wanted = {**metadata, "table_version": _TABLE_VERSION}
                if any(stored.get(k) != v for k, v in wanted.items()):
                    return None
                tensors = {k[len("field.") :]: handle.get_tensor(k) for k in handle.keys() if k.startswith("field.")}
                lengths = handle.get_tensor("lengths")
        except (OSError, ValueError, RuntimeError):
            return None
        return cls(tensors, lengths)


def compute_table(
    model: nn.Module,
    examples: Sequence["Example"],
    collate: Callable[[list["Example"]], dict[str, torch.Tensor]],
    per_token: Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    device: torch.device,
    adapters_off: bool,
) -> TokenTable:
    """One reference forward pass over ``examples``; ``per_token(logits, batch)`` gives per-position
    tensors ``(batch, seq, ...)`` whose real-token rows are kept (padding dropped)."""
    rows: list[dict[str, torch.Tensor]] = []
    with reference_forward(model, adapters_off=adapters_off):
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start : start + batch_size])
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            values = per_token(align_to_inputs(logits, batch["input_ids"].shape[1]), batch)
            for row, example in enumerate(chunk):
                n = len(example.input_ids)
                rows.append({name: v[row, :n].to("cpu") for name, v in values.items()})
    return TokenTable.from_examples(rows)


def cached_table(
    path: Path,
    metadata: dict[str, str],
    compute: Callable[[], TokenTable],
) -> tuple[TokenTable, bool]:
    """The cached table for ``metadata`` or a freshly computed (and stored) one; second value: cache hit."""
    hit = TokenTable.load(path, metadata)
    if hit is not None:
        return hit, True
    table = compute()
    table.save(path, metadata)
    return table, False


def cache_file(cache_dir: Path, kind: str, fingerprint: str, data_hash: str, suffix: str = "") -> Path:
    return Path(cache_dir) / kind / f"{fingerprint[:16]}-{data_hash[:16]}{suffix}.safetensors"
