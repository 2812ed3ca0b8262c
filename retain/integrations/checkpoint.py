"""retain's part of a Trainer checkpoint: ``checkpoint-N/retain/`` beside the Trainer's own files.

The Trainer saves weights, optimizer, scheduler, RNG and data position; retain adds what its strategies
need to resume exactly (their ``state_dict``: Fisher, anchors, buffers, cursors, prompt stacks) and, for
adapter models, the trainable weights under retain's own names. Those are loaded instead of the Trainer's
adapter reload because strategies such as o-lora keep several adapters with different roles, which
``PeftModel.load_adapter`` would mark trainable together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from retain.errors import StateError
from retain.io import atomic_dir
from retain.train.checkpoint import load_nested, save_nested, save_tensors, weights_to_save

FOLDER = "retain"
VERSION = 1


@dataclass
class RetainState:
    """What ``checkpoint-N/retain/`` holds."""

    task_index: int
    task_name: str
    task_start_step: int  # the Trainer's global_step when this task's train() began
    global_offset: int  # retain's global step (all tasks) at that moment
    strategies: dict[str, Any]
    weights: dict[str, torch.Tensor] | None  # trainable (or, with merges, all) weights of an adapter model


def save_state(checkpoint: Path, state: RetainState) -> Path:
    """Write ``checkpoint/retain/`` atomically (the Trainer's folder already exists)."""
    with atomic_dir(Path(checkpoint) / FOLDER) as tmp:
        save_nested(state.strategies, tmp, "strategies")
        if state.weights is not None:
            save_tensors(state.weights, tmp / "weights.safetensors")
        meta = {
            "version": VERSION,
            "task_index": state.task_index,
            "task_name": state.task_name,
            "task_start_step": state.task_start_step,
            "global_offset": state.global_offset,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return Path(checkpoint) / FOLDER


def read_state(checkpoint: Path) -> RetainState:
    folder = Path(checkpoint) / FOLDER
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise StateError(
            f"{checkpoint} has no retain state ({FOLDER}/meta.json): it was not saved by a retain Trainer, "
            "so the strategies' state (Fisher, anchors, buffers) cannot be restored",
            hint="resume from a checkpoint written by retain_trainer(...), or start the task again",
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != VERSION:
        raise StateError(f"{meta_path}: retain state version {meta.get('version')} is not {VERSION}")
    weights_file = folder / "weights.safetensors"
    return RetainState(
        task_index=int(meta["task_index"]),
        task_name=str(meta["task_name"]),
        task_start_step=int(meta["task_start_step"]),
        global_offset=int(meta["global_offset"]),
        strategies=load_nested(folder, "strategies"),
        weights=load_file(str(weights_file)) if weights_file.is_file() else None,
    )


def state_weights(model: torch.nn.Module, *, adapters: bool, full: bool) -> dict[str, torch.Tensor] | None:
    """The weights retain keeps in a checkpoint: none for plain models (the Trainer's own file is exact)."""
    return weights_to_save(model, full) if adapters else None


def find_checkpoint(trainer: Any, resume_from_checkpoint: str | bool | None) -> Path | None:
    """``resume_from_checkpoint`` as the Trainer reads it: a folder, or True for the newest in output_dir."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(trainer.args.output_dir)
        if found is None:
            raise StateError(f"no checkpoint to resume from in {trainer.args.output_dir}")
        return Path(found)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise StateError(f"resume_from_checkpoint: {path} is not a folder")
    return path
