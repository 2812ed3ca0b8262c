"""Seeded choices of examples: subsets, per-epoch orders and derived seeds, in one place.

Everything random about *which* examples are used derives from a seed through these functions, so a
run, a resumed run and a run on several processes pick the same examples, and ``train.seed`` changes
every choice at once.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")

_STRIDE = 1_000_003  # a prime larger than any index we derive from, so (seed, index) pairs never collide


def derive_seed(seed: int, *indices: int) -> int:
    """A seed for the ``indices``-th stream of ``seed`` (a task, an epoch, an example, ...)."""
    out = int(seed)
    for index in indices:
        out = out * _STRIDE + int(index)
    return out


def seeded_generator(seed: int, *indices: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for ``derive_seed(seed, *indices)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *indices) % (2**63))


def subset_indices(n: int, size: int | None, seed: int) -> list[int]:
    """``size`` of ``range(n)`` chosen by ``seed``, ascending; all of them when ``size`` is None or >= n."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), size))


def seeded_subset(items: Sequence[T], size: int | None, seed: int) -> list[T]:
    """At most ``size`` items chosen by ``seed``, kept in their original order."""
    return [items[i] for i in subset_indices(len(items), size, seed)]


@lru_cache(maxsize=8)
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=seeded_generator(seed, epoch)).tolist())


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Example indices at global sample positions ``start .. start+count``: a fresh seeded permutation
    per epoch, computed from the position alone, so a resumed run sees exactly the same data order."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        out.append(_epoch_permutation(n, seed, epoch)[offset])
    return out
