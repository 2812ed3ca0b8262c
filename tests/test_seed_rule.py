"""The one seed rule: every derived seed is ``derive_seed(root, Stream.X, *indices)``.

Pinned here so a stream cannot silently share draws with another (the old ad-hoc offsets could), and so
a run stays reproducible: the same purpose and indices give the same draws.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from retain.data.sampling import Stream, derive_seed, sample_indices, seeded_generator
from retain.train.loop import step_batches

PACKAGE = Path(__file__).resolve().parents[1] / "retain"


def test_purposes_give_different_streams():
    seeds = {purpose: derive_seed(7, purpose) for purpose in Stream}
    assert len(set(seeds.values())) == len(Stream)
    draws = {tuple(torch.randperm(50, generator=seeded_generator(7, p)).tolist()) for p in Stream}
    assert len(draws) == len(Stream)
    # a purpose's indexed copies differ from each other and from every other purpose's
    indexed = {derive_seed(7, p, i) for p, i in itertools.product(Stream, range(4))}
    assert len(indexed) == 4 * len(Stream)
    assert not indexed & set(seeds.values())


def test_same_purpose_and_indices_reproduce():
    assert derive_seed(7, Stream.DATA_ORDER, 1) == derive_seed(7, Stream.DATA_ORDER, 1)
    a = torch.rand(8, generator=seeded_generator(7, Stream.REPLAY_BUFFER))
    b = torch.rand(8, generator=seeded_generator(7, Stream.REPLAY_BUFFER))
    assert torch.equal(a, b)
    assert derive_seed(7, Stream.DATA_ORDER, 1) != derive_seed(8, Stream.DATA_ORDER, 1)  # the root moves it


def test_purpose_values_are_pinned():
    """Renumbering a purpose moves every run's draws for it: new purposes go at the end."""
    assert [int(p) for p in Stream] == list(range(1, len(Stream) + 1))
    assert Stream.DATA_ORDER == 1 and Stream.REPLAY_BUFFER == 4 and Stream.ESTIMATE_SAMPLE == 15


def _order(task_index: int, seed: int, steps: int = 3) -> list[int]:
    """The examples the training loop reads for a task over ``steps`` steps (identity collate/transform)."""
    train = SimpleNamespace(seed=seed, batch_size=4, grad_accum=2)
    ctx = SimpleNamespace(config=SimpleNamespace(train=train), accelerator=SimpleNamespace(num_processes=1),
                          collate=list, micro_batch=0)
    hybrid = SimpleNamespace(transform_batch=lambda batch, ctx: batch)
    task = SimpleNamespace(index=task_index, train_examples=list(range(40)))
    batches = (step_batches(ctx, hybrid, task, step) for step in range(steps))  # type: ignore[arg-type]
    return [e for step in batches for batch in step for e in batch]


def test_loop_data_order_follows_the_rule():
    first, second = _order(0, seed=7), _order(1, seed=7)
    assert first != second  # tasks of one run read their data in different orders
    assert _order(1, seed=7) == second  # ... reproducibly
    assert _order(0, seed=8) != first  # and train.seed moves them
    expected = sample_indices(40, derive_seed(7, Stream.DATA_ORDER, 1), 0, len(second))
    assert second == expected


def test_no_ad_hoc_seed_offsets():
    """No ``seed + 104729``-style offsets: derive a stream with ``derive_seed(root, Stream.X, ...)``."""
    offset = re.compile(r"seed(_for)?(\([^)]*\))?\s*[-+*]\s*\d")  # seed + 7, seed_for(self) + 104729
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if offset.search(line.split("#")[0])
    ]
    assert found == []
