"""Identities of examples: how caches recognise an example (inside a batch, or a whole list of them).

Batches carry no example ids, so per-example caches are looked up by the example's own token ids
(:func:`example_key`); that also works after other strategies reorder or extend a batch.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from retain.data.tokenize import Example


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



def examples_hash(examples: Sequence[Example], with_labels: bool = False) -> str:
    """sha256 over every example's token ids, in order (and its labels with ``with_labels``).

    Model outputs depend on the ids only; statistics of a loss (a Fisher) also on the labels.
    """
    digest = hashlib.sha256(b"retain-examples-v2" if with_labels else b"retain-examples-v1")
    for example in examples:
        ids = np.asarray(example.input_ids, dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
        if with_labels:
            digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()
