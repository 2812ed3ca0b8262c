"""Distillation teachers: where a frozen reference model's outputs on a batch come from.

Each teacher is one small object whose ``logits(batch)`` gives the reference's outputs on the
batch's input positions (``input_ids`` / ``attention_mask``), evaluated without gradients and in
evaluation mode. A strategy picks one and *replaces* it when the reference changes (lwf's
``teacher_at: task_start``), rather than one class juggling optional fields and a fallback chain.

- :class:`FrozenCopy`: a deep copy of the model (full fine-tuning, where nothing else keeps it); of a
  sharded model, a frozen copy sharded the same way (its forward runs on every process).
- :class:`AdaptersOff`: the training model itself with its PEFT adapters disabled: no copy.
- :class:`Snapshot`: the training model evaluated functionally with a saved copy of its trainable
  weights (with LoRA the adapters, a few MB; with full fine-tuning one copy of the weights).
- :class:`CachedTopK`: the teacher's top-k probabilities per anchor token, computed once and kept on
  disk, for when teacher and student do not both fit. Its output is a :class:`TopK`, not logits;
  :func:`distill_kl` takes either.

``state_dict()`` is what a teacher needs in a checkpoint beyond what the strategy rebuilds from the
original model on resume (lwf's keys: ``task_weights_index``/``task_weights``, ``table_fingerprint``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from retain.data.identity import batch_rows, example_key, examples_hash
from retain.losses.distill import kl_with_temperature, kl_with_temperature_topk, topk_teacher
from retain.models.runtime import align_to_inputs, frozen_copy, reference_forward, trainable_parameters
from retain.models.sharding import is_sharded, local, shard_like, sharded_frozen_copy, sharded_parameters
from retain.stats.token_tables import TokenTable, cache_file, cached_table, compute_table
from retain.strategies._shared.calibration import detached_copy
from retain.strategies.base import Batch, StrategyContext

if TYPE_CHECKING:
    from retain.data import Example

logger = logging.getLogger("retain")

#: The training model as it is at the call. Looked up each time, not held: the loop may re-wrap it.
ModelRef = Callable[[], nn.Module]


def live_model(ctx: StrategyContext) -> ModelRef:
    return lambda: ctx.unwrapped_model

#: Optional batch field: each row's index in the anchor set, for rows drawn by index (general anchors).
#: Without it a cached teacher finds rows by their token ids, and rows it does not know are not distilled.
ANCHOR_INDEX = "anchor_index"


@dataclass(frozen=True)
class TopK:
    """A cached teacher's output per position, ``(batch, seq, k)`` / ``(batch, seq)``: the log-probabilities
    of its top-k tokens at temperature T (``log_q``), their ids, the log of the rest's mass, and
    ``known`` (1 where a cached row exists; other positions hold finite fillers)."""

    log_q: Tensor
    indices: Tensor
    log_rest: Tensor
    known: Tensor

    def to(self, device: torch.device) -> "TopK":
        return TopK(*(getattr(self, f.name).to(device) for f in fields(self)))


class Teacher(Protocol):
    def logits(self, batch: Batch) -> Tensor | TopK:
        """The teacher's outputs on ``batch``'s input positions (never in the autograd graph)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint keys this teacher cannot rebuild from the original model on resume."""
        ...


def distill_kl(student: Tensor, teacher: Tensor | TopK, mask: Tensor, temperature: float) -> Tensor:
    """T^2 KL(teacher^T || student^T) over ``mask``: exact against logits, the k+1-bucket lower bound
    against a :class:`TopK` (its unknown positions left out)."""
    if isinstance(teacher, TopK):
        cached = teacher.to(student.device)
        return kl_with_temperature_topk(
            student, cached.log_q, cached.indices, cached.log_rest, mask * cached.known, temperature
        )
    return kl_with_temperature(student, teacher, mask, temperature)


def _reference_logits(
    model: nn.Module, batch: Batch, adapters_off: bool = False, weights: dict[str, Tensor] | None = None
) -> Tensor:
    """One reference forward (optionally with other weights, via ``functional_call``), input positions only."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with reference_forward(model, adapters_off=adapters_off):
        if weights is None:
            logits = model(**inputs).logits
        else:
            logits = functional_call(model, weights, args=(), kwargs=inputs, strict=False).logits
    return align_to_inputs(logits, batch["input_ids"].shape[1])


class FrozenCopy:
    """The model as it was when the teacher was built, as a deep copy (adapters off if it has any):
    the only way to keep the base while every weight trains."""

    def __init__(self, model: nn.Module) -> None:
        # a sharded model (train.parallel: fsdp): a copy sharded the same way, never a whole copy per process
        self.module = sharded_frozen_copy(model) if is_sharded(model) else frozen_copy(model)

    def logits(self, batch: Batch) -> Tensor:
        return _reference_logits(self.module, batch, adapters_off=True)

    def state_dict(self) -> dict[str, Any]:
        return {}  # rebuilt from the original model on resume


class AdaptersOff:
    """The training model with its PEFT adapters disabled: the frozen base at no memory cost."""

    def __init__(self, model: ModelRef) -> None:
        self._model = model

    def logits(self, batch: Batch) -> Tensor:
        return _reference_logits(self._model(), batch, adapters_off=True)

    def state_dict(self) -> dict[str, Any]:
        return {}


class Snapshot:
    """The training model with its trainable weights as they were at the start of task ``task``:
    only the weights that move are copied, the rest is shared with the live model."""

    def __init__(self, model: ModelRef, weights: dict[str, Tensor], task: int) -> None:
        self._model = model
        self.weights = weights
        self.task = task
        self._module: nn.Module | None = None
        if is_sharded(model()):  # sharded: a sharded frozen copy holding these weights (functional_call cannot)
            self._module = sharded_frozen_copy(model())
            mine = sharded_parameters(self._module, trainable_only=False)
            with torch.no_grad():
                for name, value in weights.items():
                    local(mine[name]).copy_(local(shard_like(value, mine[name])))
            self.weights = {name: mine[name].detach() for name in weights}

    @classmethod
    def take(cls, model: ModelRef, task: int) -> "Snapshot":
        live = model()
        if is_sharded(live):  # the copy is made from the live weights; no whole snapshot on any process
            return cls(model, {name: p.detach() for name, p in sharded_parameters(live).items()}, task)
        return cls(model, detached_copy(trainable_parameters(live)), task)

    def logits(self, batch: Batch) -> Tensor:
        if self._module is not None:
            return _reference_logits(self._module, batch)
        return _reference_logits(self._model(), batch, weights=self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {"task_weights_index": self.task, "task_weights": self.weights}


def gather_topk(table: TokenTable, indices: list[int | None], seq_len: int, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's cached teacher, ``(batch, seq, k)`` / ``(batch, seq)``, and ``known``: positions that have one.

    ``indices[b]`` is row b's example in ``table`` (None: unknown, e.g. a replayed row, not distilled);
    ``rows[b]`` are the batch positions of its real tokens. Unknown positions hold finite fillers.
    """
    k = table.tensors["log_q"].shape[-1]
    out = {
        "log_q": torch.zeros(len(indices), seq_len, k),
        "indices": torch.zeros(len(indices), seq_len, k, dtype=torch.int64),
        "log_rest": torch.zeros(len(indices), seq_len),
        "known": torch.zeros(len(indices), seq_len),
    }
    for b, (index, positions) in enumerate(zip(indices, rows)):
        if index is None or int(table.lengths[index]) != len(positions):
            continue
        for name in ("log_q", "indices", "log_rest"):
            out[name][b, positions] = table.example(index, name).to(out[name].dtype)
        out["known"][b, positions] = 1.0
    return out


#: Cache folder and file kind of the top-k tables (named after lwf, their first user; existing caches are found by it).
_CACHE_KIND = "lwf"

AnchorSet = tuple[str, Sequence["Example"]]


class CachedTopK:
    """Top-k teacher tables, one per anchor set, kept on disk and read back one set at a time.

    ``fingerprint`` names the model the tables come from. ``base``: the loaded model, evaluated with
    adapters off; its fingerprint is recomputed on resume. Otherwise the model at a later task's start
    (adapters on), which no longer exists on resume, so its fingerprint goes into the checkpoint.
    ``anchor_set()`` names the set the current batches come from.
    """

    def __init__(
        self,
        ctx: StrategyContext,
        anchor_set: Callable[[], AnchorSet],
        *,
        top_k: int,
        temperature: float,
        batch_size: int,
        fingerprint: str,
        base: bool,
    ) -> None:
        self._ctx = ctx
        self._anchor_set = anchor_set
        self.top_k, self.temperature, self.batch_size = top_k, temperature, batch_size
        self.fingerprint = fingerprint
        self.base = base
        self._current: tuple[str, TokenTable, dict[bytes, int]] | None = None  # the set in use, its table, rows by key

    def _file(self, examples: Sequence["Example"]) -> tuple[Path, dict[str, str]]:
        data_hash = examples_hash(examples)
        suffix = f"-top{self.top_k}-T{self.temperature:g}"
        path = cache_file(self._ctx.cache_dir, _CACHE_KIND, self.fingerprint, data_hash, suffix)
        metadata = {"kind": f"{_CACHE_KIND}-topk", "fingerprint": self.fingerprint, "data_hash": data_hash,
                    "top_k": str(self.top_k), "temperature": repr(self.temperature)}
        return path, metadata

    def compute(self, sets: dict[str, Sequence["Example"]]) -> "CachedTopK":
        """Write each set's table unless the cache holds it already (from the model as it is now)."""
        for name, examples in sets.items():
            path, metadata = self._file(examples)
            _, hit = cached_table(path, metadata, partial(self._table_now, examples), self._ctx.accelerator)
            logger.info("lwf: teacher top-%d for %s %s (%s)", self.top_k, name, "reused" if hit else "cached", path)
        return self

    def _table_now(self, examples: Sequence["Example"]) -> TokenTable:
        """One reference pass of the model as it is now over ``examples``."""
        ctx, k, t = self._ctx, self.top_k, self.temperature

        def per_token(logits: Tensor, batch: Batch) -> dict[str, Tensor]:
            log_q, indices, log_rest = topk_teacher(logits, k, t)
            return {"log_q": log_q, "indices": indices.to(torch.int32), "log_rest": log_rest}

        return compute_table(ctx.unwrapped_model, examples, ctx.collate, per_token, batch_size=self.batch_size,
                             device=ctx.device, adapters_off=self.base, accelerator=ctx.accelerator)

    def _load(self, examples: Sequence["Example"]) -> TokenTable:
        path, metadata = self._file(examples)
        table = TokenTable.load(path, metadata)
        if table is None:
            raise RuntimeError(
                f"lwf: the cached teacher outputs {path} disappeared during the run; resume the run "
                "(they are recomputed from the original model) or start it again."
            )
        return table

    def logits(self, batch: Batch) -> TopK:
        name, examples = self._anchor_set()
        if self._current is None or self._current[0] != name:
            keys = {example_key(e.input_ids): i for i, e in enumerate(examples)}
            self._current = (name, self._load(examples), keys)
        _, table, keys = self._current
        rows = batch_rows(batch["input_ids"], batch["attention_mask"])
        if ANCHOR_INDEX in batch:
            indices: list[int | None] = batch[ANCHOR_INDEX].tolist()
        else:
            indices = [keys.get(key) for key, _ in rows]
        return TopK(**gather_topk(table, indices, batch["input_ids"].shape[1], [positions for _, positions in rows]))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.base else {"table_fingerprint": self.fingerprint}
