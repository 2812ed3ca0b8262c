"""Atomic checkpoints for exact resume.

A checkpoint is a directory written under a temporary name and renamed into place, so a run killed at
any moment leaves either the previous checkpoint or the new one, never half of one. Weights and
strategy tensors are safetensors (no pickle for weights); optimizer/scheduler states use
``torch.save`` and are read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from retain.errors import DivergenceError, StateError
from retain.io import atomic_dir, output_errors, remove_stale_temporaries
from retain.models.sharding import is_sharded, local, sharded_parameters

CHECKPOINT_VERSION = 1
_PREFIX = "step-"


@dataclass
class Position:
    """Where the run stands: the next optimizer step to take is ``step_in_task`` of task ``task_index``."""

    task_index: int
    step_in_task: int
    global_step: int
    task_started: bool  # before_task already ran for task_index (its effects live in strategy state)


# ---------------------------------------------------------------------------------------------
# Nested state <-> (tensors, json)


def skeleton_of(state: Any, store: Callable[[str, torch.Tensor], None], prefix: str = "") -> Any:
    """The JSON skeleton of a nested structure, each tensor replaced by its path and handed to ``store``."""

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            store(path, node.detach())
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[str(k), walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        if isinstance(node, (np.integer, np.floating)):
            return node.item()
        return node

    return walk(state, prefix)


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into a flat tensor dict (CPU copies, for safetensors) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = skeleton_of(state, lambda path, t: tensors.__setitem__(path, t.to("cpu").contiguous().clone()), prefix)
    return tensors, skeleton


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_nested(state: Any, directory: Path, stem: str) -> None:
    tensors, skeleton = flatten_state(state)
    save_tensors(tensors, directory / f"{stem}.safetensors")
    (directory / f"{stem}.json").write_text(json.dumps(skeleton))


def load_nested(directory: Path, stem: str) -> Any:
    tensors = load_file(str(directory / f"{stem}.safetensors"))
    return unflatten_state(json.loads((directory / f"{stem}.json").read_text()), tensors)


# ---------------------------------------------------------------------------------------------
# Writers that fail with OSError (disk full, quota, permission), whatever library writes the bytes


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``; its I/O failures (a ``SafetensorError`` carrying "os error N") become OSError."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from err


class _RecordingWriter:
    """A file handle that remembers the OSError of a failed write (torch.save reports only RuntimeError)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def torch_save(value: Any, path: Path) -> None:
    """``torch.save``, but a failed write raises its OSError instead of torch's bare RuntimeError."""
    with open(path, "wb") as handle:
        writer = _RecordingWriter(handle)
        try:
            torch.save(value, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


# ---------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": _listify(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *[_plain(x) for x in np_state[2:]]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    random.setstate(_tupleify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupleify(value: Any) -> Any:
    return tuple(_tupleify(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------
# Model weights


def weights_to_save(model: nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """Trainable parameters (or every parameter and persistent buffer), tied weights once."""
    out = {n: p for n, p in model.named_parameters() if full or p.requires_grad}
    if full:
        persistent = {n: b for n, b in model.named_buffers() if n in model.state_dict()}
        out.update(persistent)
    return {n: t.detach().to("cpu").contiguous().clone() for n, t in out.items()}


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity (one host sync for all of them)."""
    floats = [(n, t) for n, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in floats]).tolist()
    return [n for (n, _), ok in zip(floats, flags) if not ok]


def _refuse_nonfinite(bad: list[str], total: int, where: str) -> None:
    if bad:
        raise DivergenceError(
            f"{len(bad)} of {total} weight tensors are not finite at {where} (e.g. {', '.join(bad[:3])}); nothing was "
            "written, so the last checkpoint stays the last good one",
            hint="lower train.lr (and keep train.max_grad_norm set), then continue with --resume",
        )


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Refuse to go on (and write model folders) from a model with a non-finite weight (a sharded model:
    every process's rows, agreed on by every process)."""
    if is_sharded(model):
        bad = nonfinite_rows(model)
        _refuse_nonfinite(["(rows of a sharded weight)"] * bad, len(list(model.parameters())), where)
        return
    params = dict(model.named_parameters())
    _refuse_nonfinite(nonfinite_tensors(params), len(params), where)


def nonfinite_rows(model: nn.Module) -> int:
    """How many weight tensors of a sharded model hold a NaN or an infinity in any process's rows (one
    all-reduce every process joins)."""
    params = sharded_parameters(model, trainable_only=False)
    bad = torch.tensor(float(len(nonfinite_tensors({n: local(p).detach() for n, p in params.items()}))))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    return int(bad.item())


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise StateError(
            f"checkpoint has weights this model lacks (e.g. {unknown[:3]}); was it written by another config?"
        )
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value.to(own[name].device, own[name].dtype))


# ---------------------------------------------------------------------------------------------
# Save / find / load


def checkpoint_dir(run_dir: Path, global_step: int, task_index: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{global_step:08d}-task{task_index:02d}"


def save_checkpoint(
    run_dir: Path,
    *,
    position: Position,
    model: nn.Module,
    full_weights: bool,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    strategy_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 1,
    participant_state: dict[str, dict[str, Any] | None] | None = None,
    processes: int = 1,
) -> Path:
    """Write everything needed to resume exactly; older step checkpoints beyond ``keep`` are removed.

    A failed write (disk full, permission) raises ``OutputError`` and leaves only the previous
    checkpoints: the half-written folder has a temporary name and is deleted. Weights holding a NaN or
    an infinity are never written (``DivergenceError``): a checkpoint is always a good resume point.
    """
    final = checkpoint_dir(run_dir, position.global_step, position.task_index)
    weights = weights_to_save(model, full_weights)
    _refuse_nonfinite(nonfinite_tensors(weights), len(weights), f"global step {position.global_step} ({final.name})")
    with atomic_dir(final) as tmp, output_errors(final):
        save_tensors(weights, tmp / "weights.safetensors")
        if optimizer is not None:
            torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_nested(rng_state(), tmp, "rng")
        save_nested(strategy_state, tmp, "strategies")
        stateful = {name: state for name, state in (participant_state or {}).items() if state is not None}
        for name, state in stateful.items():  # e.g. a forgetting budget's controller, trajectory and kept point
            save_nested(state, tmp, name)
        meta = {"version": CHECKPOINT_VERSION, "position": asdict(position), "full_weights": full_weights,
                "participants": sorted(stateful), "processes": processes}
        meta["extra"] = extra or {}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _prune(Path(run_dir) / "checkpoints", keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    for stale in sorted(directory.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temporaries(directory)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; temporary directories of a killed save are ignored."""
    directory = Path(run_dir) / "checkpoints"
    candidates = sorted(p for p in directory.glob(f"{_PREFIX}*") if (p / "meta.json").is_file())
    return candidates[-1] if candidates else None


@dataclass
class LoadedCheckpoint:
    path: Path
    position: Position
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: dict[str, Any]
    strategies: dict[str, Any]
    extra: dict[str, Any]
    participants: dict[str, dict[str, Any]] = field(default_factory=dict)  # by participant name
    # a sharded (FSDP2) checkpoint's parts read once the model exists (retain.train.sharded_checkpoint)
    sharded: dict[str, Any] | None = None


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise StateError(f"{path}: checkpoint version {meta.get('version')} is not {CHECKPOINT_VERSION}")
    if meta.get("format") == "sharded":
        raise StateError(f"{path} was written by a sharded run (train.parallel: fsdp)",
                         hint="read it with retain.train.sharded_checkpoint.load_any_checkpoint")
    optimizer = torch.load(path / "optimizer.pt", weights_only=True) if (path / "optimizer.pt").exists() else None
    scheduler = torch.load(path / "scheduler.pt", weights_only=True) if (path / "scheduler.pt").exists() else None
    return LoadedCheckpoint(
        path=path,
        position=Position(**meta["position"]),
        weights=load_file(str(path / "weights.safetensors")),
        optimizer=optimizer,
        scheduler=scheduler,
        rng=load_nested(path, "rng"),
        strategies=load_nested(path, "strategies"),
        extra=meta.get("extra", {}),
        participants={name: load_nested(path, name) for name in _participant_names(path, meta)},
    )


def _participant_names(path: Path, meta: dict[str, Any]) -> list[str]:
    """The participants with state in a checkpoint; one written before they were listed holds at most a budget."""
    if "participants" in meta:
        return list(meta["participants"])
    return ["budget"] if (path / "budget.json").is_file() else []


def checkpoint_processes(path: Path) -> int | None:
    """How many processes wrote a checkpoint (None for one written before this was recorded)."""
    value = json.loads((Path(path) / "meta.json").read_text()).get("processes")
    return int(value) if value is not None else None
