"""Per-token tables: reference outputs computed once over a list of examples and cached on disk.

For when a teacher and a student do not both fit (LwF's cached top-k), or when a reference is only
needed once (STM's perplexities). Files are keyed by a fingerprint of the reference weights and a
hash of the token ids, so a changed model or changed data never reuses a stale file.

With several processes (pass ``accelerator``) the pass is split: process ``r`` runs every
``world``-th batch, the rows are gathered so every process holds the whole table, and only the main
process of each machine writes the cache file; the table is computed once per run, not once per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retain.io import atomic_file
from retain.models.runtime import align_to_inputs, reference_forward
from retain.models.sharding import is_sharded
from retain.stats.per_example import world_of

if TYPE_CHECKING:
    from retain.data import Example

_TABLE_VERSION = "1"


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

        payload = {f"field.{k}": v.contiguous() for k, v in self.tensors.items()}
        payload["lengths"] = self.lengths.contiguous()
        with atomic_file(path) as tmp:
            save_file(payload, str(tmp), metadata={**metadata, "table_version": _TABLE_VERSION})

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
    accelerator: Any | None = None,
) -> TokenTable:
    """One reference forward pass over ``examples``; ``per_token(logits, batch)`` gives per-position
    tensors ``(batch, seq, ...)`` whose real-token rows are kept (padding dropped). With several
    processes each runs every ``world``-th batch and all of them get the whole table; with a sharded
    model (FSDP2) every process runs every batch, since each forward needs all of them."""
    # a sharded model's forward is a collective: every process runs every batch (same table everywhere)
    world, rank = (1, 0) if is_sharded(model) else world_of(accelerator)
    rows: dict[int, dict[str, torch.Tensor]] = {}
    with reference_forward(model, adapters_off=adapters_off):
        for number, start in enumerate(range(0, len(examples), batch_size)):
            if number % world != rank:
                continue
            chunk = list(examples[start : start + batch_size])
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            values = per_token(align_to_inputs(logits, batch["input_ids"].shape[1]), batch)
            for row, example in enumerate(chunk):
                n = len(example.input_ids)
                rows[start + row] = {name: v[row, :n].to("cpu") for name, v in values.items()}
    if world > 1:
        rows = _gathered(rows)
    return TokenTable.from_examples([rows[i] for i in range(len(examples))])


def _gathered(rows: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Every process's rows, on every process (one all-gather of Python objects)."""
    from accelerate.utils import gather_object

    merged: dict[int, dict[str, torch.Tensor]] = {}
    for part in gather_object([rows]):
        merged.update(part)
    return merged


def cached_table(
    path: Path,
    metadata: dict[str, str],
    compute: Callable[[], TokenTable],
    accelerator: Any | None = None,
) -> tuple[TokenTable, bool]:
    """The cached table for ``metadata`` or a freshly computed (and stored) one; second value: cache hit.

    With several processes they agree first: unless every one finds the file, all of them compute
    (``compute`` must then split the pass, see :func:`compute_table`), the main process of each
    machine writes the file, and every process waits for it, so a later ``TokenTable.load`` finds it.
    """
    hit = TokenTable.load(path, metadata)
    world, _ = world_of(accelerator)
    if world > 1:
        found = torch.tensor([0.0 if hit is None else 1.0], device=accelerator.device)
        if accelerator.reduce(found, reduction="sum").item() < world:
            hit = None
    if hit is not None:
        return hit, True
    table = compute()
    if accelerator is None or accelerator.is_local_main_process:
        table.save(path, metadata)
    if world > 1:
        accelerator.wait_for_everyone()
    return table, False


def cache_file(cache_dir: Path, kind: str, fingerprint: str, data_hash: str, suffix: str = "") -> Path:
    return Path(cache_dir) / kind / f"{fingerprint[:16]}-{data_hash[:16]}{suffix}.safetensors"

