"""Checkpoints of a sharded run (``train.parallel: fsdp``): written with ``torch.distributed.checkpoint``
(DCP), each process writing its rows, and read back on any number of processes.

Layout of ``checkpoints/step-…/`` (the same folder names and rules as ``retain.train.checkpoint``):

- ``sharded/``: DCP files holding the weights, the optimizer state (keyed by parameter names, so it
  reshards) and every strategy tensor kept sharded like a weight (EWC anchors and Fisher, l2's anchor).
- ``rng``, ``strategies`` (the rest of the strategy state and the skeleton), ``scheduler.pt``, the
  participants' state and ``meta.json`` (``"format": "sharded"``), written by the main process. A
  participant's sharded tensors (a budget's kept point) go into the DCP files like the strategies'.

Atomic as the DDP checkpoints: the main process makes a temporary folder beside the final name, every
process writes into it, and the main process renames it once all have finished. A process count other
than the one that wrote it reads it the same way (DCP reshards the weights and optimizer state; strategy
tensors are read into tensors sharded on the current processes, or whole on one process).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retain.errors import DivergenceError
from retain.io import fsync_dir, give_plain_modes, output_errors, plain_mode
from retain.models.sharding import is_dtensor, sharded_parameters
from retain.train import checkpoint as ckpt

FORMAT = "sharded"
DCP_FOLDER = "sharded"


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _broadcast(value: Any) -> Any:
    """The main process's ``value`` on every process."""
    world, _ = _world()
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _world()[0] > 1:
        torch.distributed.barrier()


def _optimizer_of(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer


def _split(strategy_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """(sharded tensors, whole tensors, JSON skeleton) of the strategy state."""
    sharded: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}
    skeleton = ckpt.skeleton_of(strategy_state, lambda path, t: (sharded if is_dtensor(t) else whole).__setitem__(path, t))
    whole = {k: v.to("cpu").contiguous().clone() for k, v in whole.items()}
    return sharded, whole, skeleton


SHARDED_MARK = "__sharded__"


def pull_sharded(node: Any, path: str, out: dict[str, torch.Tensor]) -> Any:
    """``node`` with every DTensor replaced by a mark naming it; the DTensors into ``out`` by that name."""
    if is_dtensor(node):
        out[path] = node.detach()
        return {SHARDED_MARK: path}
    if isinstance(node, dict):
        return {k: pull_sharded(v, f"{path}/{k}", out) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(pull_sharded(v, f"{path}/{i}", out) for i, v in enumerate(node))
    return node


def put_sharded(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """:func:`pull_sharded` undone: every mark replaced by its tensor."""
    if isinstance(node, dict):
        if set(node) == {SHARDED_MARK}:
            return tensors[node[SHARDED_MARK]]
        return {k: put_sharded(v, tensors) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(put_sharded(v, tensors) for v in node)
    return node


def _meta_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}


def save_sharded_checkpoint(
    run_dir: Path,
    *,
    position: ckpt.Position,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    strategy_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 1,
    participant_state: dict[str, dict[str, Any] | None] | None = None,
) -> Path:
    """Every process calls it; see the module. Non-finite weights are never written (``DivergenceError``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = ckpt.checkpoint_dir(run_dir, position.global_step, position.task_index)
    bad = ckpt.nonfinite_rows(model)
    if bad:
        raise DivergenceError(
            f"{bad} weight tensors are not finite at global step {position.global_step} ({final.name}); nothing was "
            "written, so the last checkpoint stays the last good one",
            hint="lower train.lr (and keep train.max_grad_norm set), then continue with --resume",
        )
    sharded, whole, skeleton = _split(strategy_state)
    in_participants: dict[str, torch.Tensor] = {}
    participant_state = {name: pull_sharded(s, name, in_participants) for name, s in (participant_state or {}).items()}
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if in_participants:
        state["participants"] = in_participants
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, _optimizer_of(optimizer))
    if sharded:
        state["strategies"] = sharded
    _, rank = _world()
    with ExitStack() as main_only:
        made: tuple[str | None, str | None] = (None, None)  # (the temporary folder, or why it could not be made)
        failure: Exception | None = None
        if rank == 0:
            try:
                with output_errors(final):
                    final.parent.mkdir(parents=True, exist_ok=True)
                    made = (tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent), None)
                main_only.callback(shutil.rmtree, made[0], ignore_errors=True)  # a no-op once renamed
            except Exception as err:  # noqa: BLE001 - every process must hear of it
                failure, made = err, (None, f"{type(err).__name__}: {err}")
        tmp_name, why = _broadcast(made)
        if failure is not None:
            raise failure
        if why is not None:
            raise RuntimeError(f"the main process could not make the checkpoint folder {final}: {why}")
        tmp = Path(tmp_name)
        dcp.save(state, checkpoint_id=str(tmp / DCP_FOLDER))
        _barrier()
        error = None
        if rank == 0:
            try:
                _write_main_part(tmp, final, position, scheduler, skeleton, whole, sharded, extra, participant_state,
                                 in_participants)
                ckpt._prune(Path(run_dir) / "checkpoints", keep)  # noqa: SLF001 - the same rule as DDP checkpoints
            except Exception as err:  # noqa: BLE001 - every process must hear of it
                error = err
        sent = _broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if sent is not None:
            raise RuntimeError(f"the main process could not write the checkpoint {final}: {sent}")
    return final


def _write_main_part(
    tmp: Path, final: Path, position: ckpt.Position, scheduler: Any, skeleton: Any, whole: dict[str, torch.Tensor],
    sharded: dict[str, torch.Tensor], extra: dict[str, Any] | None, participant_state: dict[str, Any] | None,
    in_participants: dict[str, torch.Tensor],
) -> None:
    with output_errors(final):
        if scheduler is not None:
            ckpt.torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        ckpt.save_nested(ckpt.rng_state(), tmp, "rng")
        ckpt.save_tensors(whole, tmp / "strategies.safetensors")
        (tmp / "strategies.json").write_text(json.dumps(_plain_json(skeleton)))
        stateful = {name: s for name, s in (participant_state or {}).items() if s is not None}
        for name, s in stateful.items():
            ckpt.save_nested(s, tmp, name)
        meta = {
            "version": ckpt.CHECKPOINT_VERSION, "format": FORMAT, "position": asdict(position), "full_weights": True,
            "participants": sorted(stateful), "extra": extra or {}, "processes": _world()[0],
            "sharded_tensors": _meta_of(sharded), "sharded_participant_tensors": _meta_of(in_participants),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        give_plain_modes(tmp)
        os.chmod(tmp, plain_mode(final, folder=True))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)


def _plain_json(node: Any) -> Any:
    """numpy scalars in the skeleton as Python numbers (what ``flatten_state`` does for DDP checkpoints)."""
    import numpy as np

    if isinstance(node, dict):
        return {k: _plain_json(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain_json(v) for v in node]
    if isinstance(node, (np.integer, np.floating)):
        return node.item()
    return node


def is_sharded_checkpoint(path: Path) -> bool:
    meta = json.loads((Path(path) / "meta.json").read_text())
    return meta.get("format") == FORMAT


def load_any_checkpoint(path: Path) -> ckpt.LoadedCheckpoint:
    """A checkpoint of either layout: a DDP one read whole, a sharded one's parts readable before the model."""
    return load_sharded_meta(path) if is_sharded_checkpoint(path) else ckpt.load_checkpoint(path)


def load_sharded_meta(path: Path) -> ckpt.LoadedCheckpoint:
    """What every process reads of a sharded checkpoint before the model exists: everything but the DCP
    part (weights, optimizer, sharded strategy tensors), which :func:`restore_sharded` reads."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    scheduler = torch.load(path / "scheduler.pt", weights_only=True) if (path / "scheduler.pt").exists() else None
    loaded = ckpt.LoadedCheckpoint(
        path=path, position=ckpt.Position(**meta["position"]), weights={}, optimizer=None, scheduler=scheduler,
        rng=ckpt.load_nested(path, "rng"), strategies={}, extra=meta.get("extra", {}),
        participants={name: ckpt.load_nested(path, name) for name in meta.get("participants", [])},
    )
    loaded.sharded = {
        "skeleton": json.loads((path / "strategies.json").read_text()),
        "whole": load_file(str(path / "strategies.safetensors")),
        "tensors": meta.get("sharded_tensors", {}),
        "participant_tensors": meta.get("sharded_participant_tensors", {}),
        "has_optimizer": (path / DCP_FOLDER).is_dir() and _dcp_has(path / DCP_FOLDER, "optimizer"),
    }
    return loaded


def _dcp_has(folder: Path, prefix: str) -> bool:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    return any(key.startswith(prefix + ".") or key == prefix for key in metadata.state_dict_metadata)


def _template(shape: list[int], dtype: str, model: nn.Module) -> torch.Tensor:
    """An empty tensor to read a sharded strategy tensor into: sharded as the weights when they are."""
    kind = getattr(torch, dtype)
    mesh = next((p.device_mesh for p in sharded_parameters(model, False).values() if is_dtensor(p)), None)
    if mesh is None:
        device = next(model.parameters()).device
        return torch.zeros(shape, dtype=kind, device=device)
    from torch.distributed.tensor import Shard, zeros

    return zeros(shape, dtype=kind, device_mesh=mesh, placements=[Shard(0)])


def restore_sharded(loaded: ckpt.LoadedCheckpoint, model: nn.Module) -> None:
    """Read the weights into ``model``, the strategy tensors into ``loaded.strategies`` and the participants'
    sharded tensors into ``loaded.participants`` (every process), resharded to this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    info = loaded.sharded
    assert info is not None
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if info["tensors"]:
        state["strategies"] = {k: _template(v["shape"], v["dtype"], model) for k, v in info["tensors"].items()}
    if info.get("participant_tensors"):
        state["participants"] = {k: _template(v["shape"], v["dtype"], model) for k, v in info["participant_tensors"].items()}
    dcp.load(state, checkpoint_id=str(loaded.path / DCP_FOLDER))
    if "participants" in state:
        loaded.participants = {name: put_sharded(s, state["participants"]) for name, s in loaded.participants.items()}
    set_model_state_dict(model, state["model"])
    loaded.strategies = ckpt.unflatten_state(info["skeleton"], {**info["whole"], **state.get("strategies", {})})


def restore_sharded_optimizer(loaded: ckpt.LoadedCheckpoint, model: nn.Module, optimizer: Any) -> bool:
    """Read the optimizer state (resharded to this run's processes) into ``optimizer``; False when the
    checkpoint has none (a task's end)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if loaded.sharded is None or not loaded.sharded["has_optimizer"]:
        return False
    inner = _optimizer_of(optimizer)
    state = {"optimizer": get_optimizer_state_dict(model, inner)}
    dcp.load(state, checkpoint_id=str(loaded.path / DCP_FOLDER))
    set_optimizer_state_dict(model, inner, state["optimizer"])
    return True


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole weights on the main process's CPU (None elsewhere), for a ``from_pretrained`` folder;
    every process calls it (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _world()[1] != 0:
        return None
    seen: set[int] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):  # a tied head once, as unsharded
        if id(parameter) in seen:
            full.pop(name, None)
        seen.add(id(parameter))
    return full
