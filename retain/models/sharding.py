"""FSDP2 facts every layer may ask about a model: is it sharded, which sharded parameter stands for a
name, and each process's part of a tensor (``train.parallel: fsdp``; the training side is
``retain.train.sharding``).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` split along its first
dimension; between a block's forward and backward the module holds a gathered plain copy instead.
Strategy state that belongs to a parameter (an anchor, a Fisher, an importance) is kept as a DTensor
with the parameter's placement, so each process holds its own rows and elementwise maths needs no
communication: :func:`local` gives the rows, :func:`shard_like` cuts a whole tensor the same way.

A penalty computed on the local rows has this process's rows' gradient and no other's; its value is
this process's part of the sum. :func:`summed_over_shards` makes its value the whole sum (one small
all-reduce) and keeps the local gradient, so logs and a single-process run agree.

Work done once per run (:func:`once`: synthetic replay's generation, lwf's general pool, the run
folder's rules, a budget's measurement) runs on the main process and its value or error reaches every
process. It lives here, below the strategies and the run, so that both use the one copy.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
from torch import Tensor, nn


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(tensor, kind)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every module ``fully_shard`` was applied to, the root first (model order)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards the model (also while :func:`gathered` holds its whole weights)."""
    return bool(fsdp_modules(model))


def holds_shards(model: nn.Module) -> bool:
    """Whether the model's parameters are its shards now (sharded and not gathered): a forward would be
    a collective every process must join."""
    return any(is_dtensor(p) for p in model.parameters())


def sharded_parameters(model: nn.Module, trainable_only: bool = True) -> dict[str, nn.Parameter]:
    """Parameters by name, each the sharded DTensor FSDP2 keeps (never the gathered copy a module holds
    between its forward and backward); the plain parameters of an unsharded model. Tied weights once."""
    to_sharded: dict[int, nn.Parameter] = {}
    for module in fsdp_modules(model):
        state = module._get_fsdp_state()  # noqa: SLF001 - FSDP2 keeps the sharded parameter there
        for group in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]:  # noqa: SLF001
            if group is None:
                continue
            for fsdp_param in group.fsdp_params:
                to_sharded[id(fsdp_param.sharded_param)] = fsdp_param.sharded_param
                gathered = getattr(fsdp_param, "_unsharded_param", None)
                if gathered is not None:
                    to_sharded[id(gathered)] = fsdp_param.sharded_param
    return {
        name: to_sharded.get(id(p), p)
        for name, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    }


def local(tensor: Tensor) -> Tensor:
    """This process's rows of a DTensor (differentiable); any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: local(t) for name, t in tensors.items()}


def shard_like(whole: Tensor, parameter: Tensor) -> Tensor:
    """``whole`` (a full tensor of the parameter's shape) cut as ``parameter`` is: each process keeps its
    rows, no communication. A plain parameter takes the tensor as it is."""
    if not is_dtensor(parameter):
        return whole.to(parameter.device)
    if is_dtensor(whole):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        whole.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None
    )


def summed_over_shards(partial: Tensor, sharded: bool) -> Tensor:
    """A scalar computed on this process's rows, with the value of the sum over every process's rows and
    the gradient of this process's rows alone (every process must call it: one all-reduce)."""
    if not sharded or not torch.distributed.is_initialized():
        return partial
    total = partial.detach().clone()
    torch.distributed.all_reduce(total)
    return partial + (total - partial.detach())


def sum_over_processes(value: Tensor, sharded: bool) -> Tensor:
    """A statistic summed over every process's rows (e.g. the sum or count behind a mean over all weights),
    outside autograd; ``value`` itself when not sharded. Every process must call it (one all-reduce)."""
    if not sharded or not torch.distributed.is_initialized():
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Every process holds the whole weights for the block (a collective: every process enters it), and
    forwards need no communication, so the main process alone may evaluate; sharded again at the end.

    Peak memory inside is one unsharded copy of the weights per process (no gradients or optimizer)."""
    modules = fsdp_modules(model)
    if not modules:
        yield model
        return
    # FSDP2 settles the root's reshard rule at its first forward; settled here on every process, so a
    # first forward by the main process alone (a measurement before any training) cannot change it there only
    modules[0]._get_fsdp_state()._lazy_init()  # noqa: SLF001
    groups = [g for m in modules for g in _groups(m)]
    kept = [g.post_forward_mesh_info for g in groups]
    for group in groups:
        group.post_forward_mesh_info = None  # do not reshard after each forward
    try:
        for module in modules:
            module.unshard()
        yield model
    finally:
        for module in modules:
            module.reshard()
        for group, info in zip(groups, kept):
            group.post_forward_mesh_info = info


def _groups(module: nn.Module) -> list:
    state = module._get_fsdp_state()  # noqa: SLF001
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        single = getattr(state, "_fsdp_param_group", None)
        groups = [single] if single is not None else []
    return list(groups)


def block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The model's transformer block classes: those its ``_no_split_modules`` names (Hugging Face models
    declare them), else the type of the longest ``ModuleList``'s items."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if found:
        return sorted(found, key=lambda c: c.__name__)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    longest = max(lists, key=len)
    return [type(longest[0])]


def shard_model(model: nn.Module, reshard_root: bool = False) -> nn.Module:
    """FSDP2: ``fully_shard`` on every transformer block, then on the root (embeddings, final norm and
    a tied head stay together in the root's group). The model is changed in place and returned.

    ``reshard_root``: free the root's gathered weights after each forward too (a frozen copy, whose
    forwards are never followed by a backward that would free them, and whose rows are rewritten)."""
    from torch.distributed.fsdp import fully_shard

    classes = tuple(block_classes(model))
    blocks = [m for m in model.modules() if classes and isinstance(m, classes)]
    for block in blocks:
        fully_shard(block)
    fully_shard(model, reshard_after_forward=True if reshard_root else None)
    return model


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (FSDP2 makes a subclass named ``FSDP<class>``)."""
    for cls in type(model).__mro__:
        if issubclass(cls, nn.Module) and not cls.__name__.startswith("FSDP"):
            return cls
    return type(model)


def sharded_frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of a sharded model, sharded the same way: built on the meta device (no full copy on
    any process), sharded, then filled with each process's rows of the weights and the buffers.

    Its forward is a collective like the model's: every process must run the same forwards."""
    cls = unsharded_class(model)
    with torch.device("meta"):
        copy = cls(model.config)
    shard_model(copy, reshard_root=True)
    device = next(iter(sharded_parameters(model, trainable_only=False).values())).device
    copy.to_empty(device=device)
    copy_weights_(copy, model)
    for parameter in copy.parameters():
        parameter.requires_grad_(False)
    return copy.eval()


@torch.no_grad()
def copy_weights_(target: nn.Module, source: nn.Module) -> None:
    """Every weight and buffer of ``source`` into ``target`` (same architecture, same sharding): each
    process copies its rows; no communication."""
    for module in fsdp_modules(target):  # a gathered copy would hide the new rows from the next forward
        module.reshard()
    theirs = sharded_parameters(source, trainable_only=False)
    for name, parameter in sharded_parameters(target, trainable_only=False).items():
        local(parameter).copy_(local(theirs[name]))
    buffers = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        buffer.copy_(buffers[name])


T = TypeVar("T")


def processes(accelerator: Any) -> int:
    return 1 if accelerator is None else int(accelerator.num_processes)


def once(accelerator: Any, work: Callable[[], T], *, together: bool = False) -> T:
    """``work()``'s value on the main process, given to every process; its error raised on every one
    (so none waits for a main process that has stopped).

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
    box = [value, None if own is None else sendable(own)] if accelerator.is_main_process else [None, None]
    broadcast_object_list(box, from_process=0)
    if own is not None:
        raise own
    if box[1] is not None:
        raise box[1]
    return box[0]


def sendable(err: Exception) -> Exception:
    """The error itself if it pickles (the other processes raise the same type and hint), else its text."""
    import pickle

    try:
        pickle.dumps(err)
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(err).__name__} on the main process: {err}")
    return err
