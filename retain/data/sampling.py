"""Seeded choices of examples: subsets, per-epoch orders and derived seeds, in one place.

Everything random about *which* examples are used derives from a seed through these functions, so a
run, a resumed run and a run on several processes pick the same examples, and ``train.seed`` changes
every choice at once.

The one seed rule: a stream's seed is ``derive_seed(root, Stream.X, *indices)``, where ``root`` is
``train.seed`` (or a strategy's own ``seed`` key, see ``StrategyContext.seed_for``), ``Stream.X`` names
what the stream is for (:class:`Stream`, the table of every stream) and ``indices`` pick one of its
copies (a task, an epoch, an example). Two purposes never share draws, and no code adds ad-hoc offsets
to a seed.
"""

from __future__ import annotations

import random
from enum import IntEnum, unique
from functools import lru_cache
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")

_STRIDE = 1_000_003  # a prime larger than any index we derive from, so (seed, index) pairs never collide


@unique
class Stream(IntEnum):
    """What a derived seed is for: the first index after the root in ``derive_seed(root, purpose, ...)``.

    The values are part of every run's data order: renumbering one moves that stream's draws. Add new
    purposes at the end; never reuse a value. (0 is left out, so ``derive_seed(0, purpose, i)`` never
    equals ``derive_seed(i)``.)

    ====================  ========================================  ============================
    purpose               the draws                                 indices after it
    ====================  ========================================  ============================
    DATA_ORDER            the order the loop reads a task's data    task index, then epoch
    DATA_LIMIT            ``data.limit``'s subset of a file         -
    VALIDATION_SPLIT      ``data.validation_fraction``'s held-out   -
    REPLAY_BUFFER         replay's reservoir and draws              -
    SYNTHETIC_BUFFER      synthetic-replay's reservoir and draws    -
    SYNTHETIC_DEMOS       a task's demonstrations taken from data   task index
    SYNTHETIC_OPENINGS    general_data openings used as prompts     -
    SYNTHETIC_GENERATION  sampling of one source's synthetic text   source position
    STM_MASK              STM's random-ablation drop masks          task index
    FIP_POOL              FIP's anchor pool for a task              task index
    FIP_ORDER             the order FIP reads its pool              epoch
    TASK_FISHER           EWC / EWC-LoRA estimate after a task      task index (then ESTIMATE_*)
    LORA_RESET            EWC-LoRA's fresh adapters after a merge   task index
    ESTIMATE_SUBSET       the examples an importance estimate uses  -
    ESTIMATE_SAMPLE       a sampled-Fisher example's label draws    example index
    LWF_POOL              lwf's general anchor pool                 -
    LWF_ORDER             the order lwf reads its anchor pool       epoch
    BUDGET_PROBE          a budget's fallback task-loss subset      -
    TUNE_CONFIRM          ``retain tune``'s fresh confirmation seed  rank of the confirmed trial
    LORA_CALIBRATION      CorDA's general-text calibration subset   -
    ====================  ========================================  ============================

    ``ESTIMATE_*`` derive from an estimate's own seed (``retain importance compute --seed``, a strategy's
    base seed, or a ``TASK_FISHER`` seed), so a file and an inline estimate with one seed agree.
    """

    DATA_ORDER = 1
    DATA_LIMIT = 2
    VALIDATION_SPLIT = 3
    REPLAY_BUFFER = 4
    SYNTHETIC_BUFFER = 5
    SYNTHETIC_DEMOS = 6
    SYNTHETIC_OPENINGS = 7
    SYNTHETIC_GENERATION = 8
    STM_MASK = 9
    FIP_POOL = 10
    FIP_ORDER = 11
    TASK_FISHER = 12
    LORA_RESET = 13
    ESTIMATE_SUBSET = 14
    ESTIMATE_SAMPLE = 15
    LWF_POOL = 16
    LWF_ORDER = 17
    BUDGET_PROBE = 18
    TUNE_CONFIRM = 19
    LORA_CALIBRATION = 20


def derive_seed(seed: int, *indices: int) -> int:
    """A seed for the ``indices``-th stream of ``seed``: by the seed rule ``indices`` start with a
    :class:`Stream` (what the draws are for), then a task, an epoch, an example, ... Injective for
    index tuples of one length with entries below ``_STRIDE``, so two streams of one root never share
    a seed."""
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


def estimate_subset(items: Sequence[T], size: int | None, seed: int) -> list[T]:
    """The examples an importance estimate with ``seed`` uses (its ``ESTIMATE_SUBSET`` stream), so
    ``retain importance compute --seed`` and a strategy's inline estimate with that seed agree."""
    return seeded_subset(items, size, derive_seed(seed, Stream.ESTIMATE_SUBSET))


@lru_cache(maxsize=8)
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=seeded_generator(seed, epoch)).tolist())


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Example indices at global sample positions ``start .. start+count``: a fresh seeded permutation
    per epoch, computed from the position alone, so a resumed run sees exactly the same data order.
    ``seed`` is a stream's seed (``derive_seed(root, Stream.X, ...)``); the epoch is its last index."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        out.append(_epoch_permutation(n, seed, epoch)[offset])
    return out
