"""Several processes, seen from a strategy or a run participant: work done once and given to every
process, and parameters sharded across processes (FSDP2's DTensors).

Data building that depends only on the seed and the base model (synthetic replay's generated sets,
lwf's general pool) runs on the main process alone and is broadcast, so the other processes neither
repeat the work nor risk a different result. With sharded weights a forward is a collective every
process must join, so such work runs on every process together and the main process's value wins.
This lives in ``models`` so that both the strategies and the run (``retain.train.budgeted``) use it.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are sharded across processes (FSDP2)."""
    return any(is_dtensor(p) for p in model.parameters())


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def processes(accelerator: Any) -> int:
    return 1 if accelerator is None else int(accelerator.num_processes)


def once(accelerator: Any, work: Callable[[], T], *, together: bool = False) -> T:
    """``work()``'s value on the main process, given to every process; its error raised on every one.

    ``together=False``: the main process alone runs it (the others wait in the broadcast).
    ``together=True``: every process runs it (sharded weights: each forward is a collective all must
    join) and the main process's value wins, so float differences cannot split the processes."""
    if processes(accelerator) == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    value: Any = None
    own: Exception | None = None
    if together or accelerator.is_main_process:
        try:
            value = work()
        except Exception as err:  # noqa: BLE001 - the main process's error must reach the others
            own = err
    box = [value, None if own is None else _sendable(own)] if accelerator.is_main_process else [None, None]
    broadcast_object_list(box, from_process=0)
    if own is not None:
        raise own
    if box[1] is not None:
        raise box[1]
    return box[0]


def _sendable(err: Exception) -> Exception:
    """The error itself if it pickles (the other processes raise the same type and hint), else its text."""
    import pickle

    try:
        pickle.dumps(err)
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(err).__name__} on the main process: {err}")
    return err
