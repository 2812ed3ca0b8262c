"""A bounded replay buffer and the pieces that mix its examples into training batches.

* :class:`ReplayBuffer`: one reservoir per source (an earlier task, or a general pool), so each source
  holds a uniform sample of everything it was ever offered (Vitter's algorithm R) while the whole buffer
  never exceeds ``capacity`` examples. The capacity is split evenly across sources, so a long first task
  cannot crowd out later ones, and rows are drawn round-robin across sources, so every source gets the
  same share of the replayed rows. All randomness comes from one seeded ``torch.Generator`` whose state
  is part of :meth:`ReplayBuffer.state_dict`, so a resumed run draws exactly what the uninterrupted run
  would have drawn.
* :class:`RatioSchedule`: how many replayed rows each batch gets so that, over the run, replayed rows
  are ``ratio`` of all rows trained on. A deterministic accumulator instead of coin flips: the realised
  share is within one row of the target at every step, even with batches of 4 and a 1% ratio.
* :func:`mix_rows`: puts replayed examples into a padded batch, either replacing its last rows (the batch
  size, memory and step time stay the same) or appending rows (every new-task row is kept; the step
  costs up to ``ratio / (1 - ratio)`` more). The mixed batch carries :data:`REPLAYED`, which marks the
  tokens of the rows that came from a buffer, so a strategy can treat them apart (lwf's ``anchor: replay``
  distils the teacher on exactly those rows, as Dark Experience Replay does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch

from retain.data import IGNORE_INDEX, Example

MixMode = Literal["replace", "append"]
BATCH_KEYS = ("input_ids", "attention_mask", "labels")
#: Batch field added by :func:`mix_rows`: ``(rows, seq)``, 1 on the real tokens of rows mixed in from a
#: buffer and 0 elsewhere (the task's own rows, padding). Per token, not per row, so it is sliced with the
#: batch's columns like ``attention_mask`` (the loop drops padding columns a process does not need).
REPLAYED = "replayed"


@dataclass
class Reservoir:
    """A uniform sample of at most ``capacity`` of the ``seen`` examples a source offered."""

    capacity: int
    seen: int = 0
    items: list[Example] = field(default_factory=list)


class ReplayBuffer:
    """Per-source reservoirs sharing ``capacity`` evenly; seeded, bounded, checkpointable."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.reservoirs: dict[str, Reservoir] = {}
        self.cursor = 0  # next source (in insertion order) to draw a row from

    # ---- filling ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(r.items) for r in self.reservoirs.values())

    @property
    def sources(self) -> list[str]:
        return list(self.reservoirs)

    def _randint(self, high: int) -> int:
        """Uniform integer in [0, high) from the buffer's own generator."""
        return int(torch.randint(high, (1,), generator=self.generator).item())

    def _quotas(self, n_sources: int) -> list[int]:
        base, extra = divmod(self.capacity, n_sources)
        return [base + (1 if i < extra else 0) for i in range(n_sources)]

    def _add_source(self, source: str) -> None:
        """Give a new source its share of the capacity; older sources shrink to a uniform subsample."""
        self.reservoirs[source] = Reservoir(capacity=0)
        for reservoir, quota in zip(self.reservoirs.values(), self._quotas(len(self.reservoirs))):
            if len(reservoir.items) > quota:
                keep = torch.randperm(len(reservoir.items), generator=self.generator)[:quota].sort().values
                reservoir.items = [reservoir.items[i] for i in keep.tolist()]
            reservoir.capacity = quota

    def add(self, source: str, example: Example) -> None:
        """Offer one example of ``source``'s stream (algorithm R: the i-th is kept with p = capacity / i)."""
        if source not in self.reservoirs:
            self._add_source(source)
        reservoir = self.reservoirs[source]
        reservoir.seen += 1
        if len(reservoir.items) < reservoir.capacity:
            reservoir.items.append(example)
            return
        slot = self._randint(reservoir.seen)
        if slot < reservoir.capacity:
            reservoir.items[slot] = example

    def extend(self, source: str, examples: Iterable[Example]) -> None:
        for example in examples:
            self.add(source, example)

    def replace_source(self, source: str, examples: list[Example]) -> None:
        """Swap a source's kept examples for ``examples`` (e.g. relabelled ones), same count or fewer."""
        reservoir = self.reservoirs[source]
        if len(examples) > reservoir.capacity:
            raise ValueError(f"{len(examples)} examples exceed source '{source}' capacity {reservoir.capacity}")
        reservoir.items = list(examples)

    # ---- drawing ------------------------------------------------------------------------------

    def sample(self, n: int) -> list[tuple[str, Example]]:
        """``n`` (source, example) pairs: sources in turn, an example uniformly at random within each."""
        filled = [name for name, r in self.reservoirs.items() if r.items]
        if not filled:
            raise ValueError("the replay buffer is empty")
        out = []
        for _ in range(n):
            source = filled[self.cursor % len(filled)]
            self.cursor += 1
            items = self.reservoirs[source].items
            out.append((source, items[self._randint(len(items))]))
        return out

    # ---- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors (token ids packed flat + lengths) and plain values; safetensors-friendly."""
        reservoirs = []
        for name, r in self.reservoirs.items():
            reservoirs.append(
                {
                    "name": name,
                    "capacity": r.capacity,
                    "seen": r.seen,
                    "lengths": torch.tensor([len(e.input_ids) for e in r.items], dtype=torch.long),
                    "input_ids": torch.tensor([t for e in r.items for t in e.input_ids], dtype=torch.long),
                    "labels": torch.tensor([t for e in r.items for t in e.labels], dtype=torch.long),
                }
            )
        return {
            "capacity": self.capacity,
            "cursor": self.cursor,
            "generator": self.generator.get_state(),
            "reservoirs": reservoirs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.cursor = int(state["cursor"])
        self.generator.set_state(state["generator"])
        self.reservoirs = {}
        for entry in state["reservoirs"]:
            lengths = entry["lengths"].tolist()
            ids = entry["input_ids"].split(lengths) if lengths else []
            labels = entry["labels"].split(lengths) if lengths else []
            items = [Example(a.tolist(), b.tolist()) for a, b in zip(ids, labels)]
            self.reservoirs[entry["name"]] = Reservoir(int(entry["capacity"]), int(entry["seen"]), items)


class RatioSchedule:
    """Replayed rows per batch so that replayed / all rows trained on tracks ``ratio`` exactly.

    ``replace``: a batch of B rows gets k of its rows replaced, k = floor(ratio * rows_so_far) - replayed.
    ``append``: k rows are added to the B task rows, k chosen the same way over the grown total.
    """

    def __init__(self, ratio: float, mode: MixMode) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"replay ratio must lie in (0, 1), got {ratio}")
        self.ratio = ratio
        self.mode = mode
        self.rows = 0  # rows trained on (task + replayed) while replay was possible
        self.replayed = 0

    def rows_for(self, batch_rows: int) -> int:
        """How many replayed rows the next batch of ``batch_rows`` task rows gets (and count them)."""
        eps = 1e-9  # keeps exact products such as 0.25 * 8 from rounding down
        if self.mode == "replace":
            k = math.floor(self.ratio * (self.rows + batch_rows) + eps) - self.replayed
            k = min(max(k, 0), batch_rows)
            self.rows += batch_rows
        else:
            k = math.floor((self.ratio * (self.rows + batch_rows) - self.replayed) / (1.0 - self.ratio) + eps)
            k = max(k, 0)
            self.rows += batch_rows + k
        self.replayed += k
        return k

    @property
    def realised(self) -> float:
        return self.replayed / self.rows if self.rows else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "replayed": self.replayed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = int(state["rows"])
        self.replayed = int(state["replayed"])


def mix_rows(
    batch: dict[str, torch.Tensor],
    examples: list[Example],
    pad_token_id: int,
    mode: MixMode,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The batch with ``examples`` replacing its last rows (``replace``) or added after them (``append``).

    Replayed rows are cut to ``max_length`` tokens (default: the batch's own width, so replay never
    widens a step); the result is right-padded like ``retain.data.collate``. It carries
    :data:`REPLAYED`: 1 on the tokens of the rows mixed in here, or by an earlier mixer (rows it kept).
    """
    unknown = sorted(set(batch) - set(BATCH_KEYS) - {REPLAYED})
    if unknown:
        raise ValueError(
            f"cannot mix replayed rows into a batch carrying per-row keys {unknown} added by another strategy; "
            "list the replay strategy before it in `strategies`."
        )
    if not examples:
        return batch
    rows = batch["input_ids"].shape[0]
    if mode == "replace" and len(examples) > rows:
        raise ValueError(f"cannot replace {len(examples)} rows of a batch of {rows}")
    limit = max_length if max_length is not None else batch["input_ids"].shape[1]
    cut = [(e.input_ids[:limit], e.labels[:limit]) for e in examples]
    kept = rows - len(examples) if mode == "replace" else rows
    width = max([batch["input_ids"].shape[1]] + [len(ids) for ids, _ in cut])
    total = kept + len(examples)
    device = batch["input_ids"].device
    input_ids = torch.full((total, width), pad_token_id, dtype=batch["input_ids"].dtype, device=device)
    attention_mask = torch.zeros((total, width), dtype=batch["attention_mask"].dtype, device=device)
    labels = torch.full((total, width), IGNORE_INDEX, dtype=batch["labels"].dtype, device=device)
    replayed = torch.zeros((total, width), dtype=batch["attention_mask"].dtype, device=device)
    old = batch["input_ids"].shape[1]
    input_ids[:kept, :old] = batch["input_ids"][:kept]
    attention_mask[:kept, :old] = batch["attention_mask"][:kept]
    labels[:kept, :old] = batch["labels"][:kept]
    if REPLAYED in batch:
        replayed[:kept, :old] = batch[REPLAYED][:kept]
    for row, (ids, labs) in enumerate(cut, start=kept):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=input_ids.dtype)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(labs, dtype=labels.dtype)
        replayed[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, REPLAYED: replayed}


def mix_from_buffer(
    batch: dict[str, torch.Tensor],
    buffer: ReplayBuffer,
    schedule: RatioSchedule,
    pad_token_id: int,
    max_length: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The batch with its share of replayed rows, and how many rows were replayed (0 if the buffer is empty).

    Batches seen while the buffer is empty do not count towards the ratio, so replay does not "catch up"
    with a burst of replayed rows once it has something to replay.
    """
    if len(buffer) == 0:
        return batch, 0
    k = schedule.rows_for(batch["input_ids"].shape[0])
    if k == 0:
        return batch, 0
    examples = [example for _, example in buffer.sample(k)]
    return mix_rows(batch, examples, pad_token_id, schedule.mode, max_length), k
