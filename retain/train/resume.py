"""What ``--resume`` may change, and the run folder's rules (what an output.dir may already hold).

A resumed run must see the same data in the same order and the same model shapes, or its checkpoint
means nothing. Keys that change neither may differ from the config the run started with; each
change is printed. Everything else is refused with the list of differing keys.

Keys that may change on resume (``RESUMABLE_KEYS``; a key also matches everything under it):

- ``train.lr``, ``train.weight_decay``, ``train.betas``, ``train.scheduler``, ``train.warmup_steps``:
  optimizer hyperparameters, applied to the restored optimizer/scheduler state (the schedule keeps
  its position, the new peak learning rate and shape apply from the next step);
- ``train.max_grad_norm``, ``train.max_nonfinite_steps``, ``train.gradient_checkpointing`` (recomputes
  activations, same weights);
- ``train.log_every``, ``train.progress``, ``train.trackers``;
- ``checkpoint.every``, ``checkpoint.keep``; ``eval.*``; ``output.dir`` (a moved folder),
  ``output.merge``, ``output.save_per_task``.

Refused: the model, the tasks and their data settings, the strategies and their settings,
``general_data``, ``train.steps_per_task``/``batch_size``/``grad_accum``/``seed``/``mixed_precision``,
``budget.*`` (the checkpoint holds the strengths, trajectory and kept point a budget produced; other
bounds, check steps or controller settings would make the resumed run take other decisions than the
uninterrupted one), and any key not listed above.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from retain.config import RunConfig, load_config_dict
from retain.errors import ConfigError, OutputError, RetainError, StateError
from retain.io import empty_folder, ensure_dir, folder_entries, refuse_inputs

RESUMABLE_KEYS = (
    "train.lr",
    "train.weight_decay",
    "train.betas",
    "train.scheduler",
    "train.warmup_steps",
    "train.max_grad_norm",
    "train.max_nonfinite_steps",
    "train.gradient_checkpointing",
    "train.log_every",
    "train.progress",
    "train.trackers",
    "checkpoint.every",
    "checkpoint.keep",
    "eval",
    "output.dir",
    "output.merge",
    "output.save_per_task",
)

_MISSING = "(unset)"


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_shown(self.old)} -> {_shown(self.new)}"


def _shown(value: Any) -> str:
    return value if value == _MISSING else repr(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; list items as ``key[i]`` (an empty list stays a value)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(node, list) and node:
        out = {}
        for i, value in enumerate(node):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def resumable(key: str) -> bool:
    return any(key == k or key.startswith((k + ".", k + "[")) for k in RESUMABLE_KEYS)


def config_changes(recorded: RunConfig, current: RunConfig) -> list[Change]:
    """Every key whose value differs between the two configs, in key order."""
    old, new = flatten(recorded.model_dump(mode="json")), flatten(current.model_dump(mode="json"))
    keys = sorted(set(old) | set(new))
    return [Change(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in keys if old.get(k, _MISSING) != new.get(k, _MISSING)]


def recorded_config(run_dir: Path) -> RunConfig | None:
    """The config the run in ``run_dir`` was started with (``config.yaml``), or None if there is none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ConfigError("not a mapping")
        return load_config_dict(data, source=str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RetainError) as err:
        raise StateError(
            f"{path}: cannot read the config this run was started with ({err})",
            hint="resume with the retain version that started the run, or start a new output.dir",
        ) from None


def check_resume_changes(run_dir: Path, config: RunConfig) -> list[Change]:
    """The allowed changes since the run started; a StateError listing every key that may not change."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        return []
    changes = config_changes(recorded, config)
    refused = [c for c in changes if not resumable(c.key)]
    if refused:
        listed = "; ".join(str(c) for c in refused[:12]) + ("; ..." if len(refused) > 12 else "")
        raise StateError(
            f"{run_dir}: --resume cannot change keys that change the data order or the model "
            f"({len(refused)} differ from {run_dir / 'config.yaml'}: {listed})",
            hint="resume with those keys as they were, or start a new output.dir; only "
            + ", ".join(RESUMABLE_KEYS) + " may change on resume",
        )
    return changes


# ---------------------------------------------------------------------------------------------
# The run folder


def is_run_folder(folder: Path) -> bool:
    """A folder retain's ``train`` wrote (its ``config.yaml`` beside ``checkpoints/`` or nothing else of note)."""
    return (folder / "config.yaml").is_file() or (folder / "checkpoints").is_dir()


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, has_checkpoint: bool, inputs: list[str]) -> None:
    """The rules for ``output.dir``, checked before any model loads.

    * It must not be, contain or be inside an input of the run (model, data, suite, strategy files).
    * A folder with checkpoints needs ``--resume`` (continue) or ``--overwrite`` (start again; it is emptied).
    * Another non-empty folder that is not a retain run folder needs ``--overwrite``.
    * A retain run folder without checkpoints (a run stopped before its first one) is reused as is.
    """
    refuse_inputs(run_dir, inputs, "output.dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"cannot use {run_dir} as output.dir: it is a file, not a folder",
                          hint="choose another output.dir (e.g. --set output.dir=runs/new)")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite starts it again from scratch: pass one")
    entries = folder_entries(run_dir)
    if overwrite and entries:
        empty_folder(run_dir)
        entries = []
    if has_checkpoint and not resume:
        raise StateError(
            f"{run_dir} already holds checkpoints of a run. Pass --resume to continue it, --overwrite to start "
            "again from scratch (deleting it), or choose another output.dir (e.g. --set output.dir=runs/new)."
        )
    if entries and not is_run_folder(run_dir):
        shown = ", ".join(p.name for p in entries[:3])
        raise OutputError(
            f"output.dir {run_dir} is not empty and holds no retain run (it holds {shown}{', ...' if len(entries) > 3 else ''})",
            hint="choose a new or empty output.dir, or pass --overwrite to replace its contents",
        )
    ensure_dir(run_dir, "create output.dir")
