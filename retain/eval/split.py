"""Two disjoint parts of every eval: ``select`` (what chooses) and ``report`` (what is reported).

A figure chosen on a sample and reported on the same sample is biased upwards (the winner's curse): the
budget's kept point, ``retain tune``'s winner, a sweep's default and ``merge --alpha sweep`` all choose.
So every eval's pool of items (token windows, records), after its own ``max_examples`` subsample, is
split once into a ``select`` part, which everything that chooses reads, and a ``report`` part, which
every reported figure (summary, tables, report, gate) reads.

The split depends only on the pool size and the suite's ``split`` settings, never on the training seed:
every strategy and every seed is scored on the same report items, so comparisons can be paired.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from retain.config import StrictModel

#: ``select``/``report``: one part; ``all``: every item of the pool (a model scored outside a run);
#: ``both``: one pass over the pool, reported as ``report`` with the ``select`` value beside it.
Part = Literal["select", "report", "all", "both"]


class SplitConfig(StrictModel):
    """How each eval's items are split (suite key ``split``)."""

    select_share: float = Field(1 / 3, gt=0.0, lt=1.0, description="Share of each eval's items that choose.")
    seed: int = Field(0, description="Seed of the split; the same for every run, strategy and training seed.")
    min_items: int = Field(
        6, ge=2, description="Pools smaller than this are not split: both parts are every item (and say so)."
    )


def split_indices(n: int, split: SplitConfig) -> tuple[list[int], list[int]]:
    """(select, report) indices into a pool of ``n`` items, disjoint and together ``range(n)``, each in
    ascending order; a pool under ``split.min_items`` is not split (both are ``range(n)``)."""
    if n < split.min_items:
        return list(range(n)), list(range(n))
    order = random.Random(f"retain-split:{split.seed}:{n}").sample(range(n), n)
    chosen = max(1, min(n - 1, round(n * split.select_share)))
    return sorted(order[:chosen]), sorted(order[chosen:])


def is_shared(n: int, split: SplitConfig) -> bool:
    """Whether a pool of ``n`` items is too small to split (select and report are the same items)."""
    return n < split.min_items


def part_indices(n: int, part: Part, split: SplitConfig) -> list[int]:
    """The items of ``part`` in a pool of ``n``: ``all`` and ``both`` score every item."""
    if part in ("all", "both"):
        return list(range(n))
    select, report = split_indices(n, split)
    return select if part == "select" else report


def prompts_of(prompts: list[str], part: Part, split: SplitConfig) -> list[str]:
    """The probe prompts (KL drift) of ``part``: the budget's KL bound reads select, the report's drift report."""
    return [prompts[i] for i in part_indices(len(prompts), part, split)]
