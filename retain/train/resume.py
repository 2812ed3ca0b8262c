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
  ``output.merge``, ``output.save_per_task``;
- ``train.batch_size`` when the number of processes changes with it so that the global batch
  (``batch_size x processes``) stays the same (e.g. 2 processes at 2 resumed on 1 at 4).

Refused: the model, the tasks and their data settings, the strategies and their settings,
``general_data``, ``train.steps_per_task``/``batch_size``/``grad_accum``/``seed``/``mixed_precision``,
``budget.*`` (the checkpoint holds the strengths, trajectory and kept point a budget produced; other
bounds, check steps or controller settings would make the resumed run take other decisions than the
uninterrupted one), and any key not listed above.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


from retain.config import RunConfig, load_config_dict, read_yaml
from retain.errors import ConfigError, OutputError, RetainError, StateError
from retain.io import atomic_write_json, content_hash, empty_folder, ensure_dir, folder_entries, refuse_inputs

log = logging.getLogger("retain")

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
        data = read_yaml(path, "recorded config")
        if not isinstance(data, dict):
            raise ConfigError("not a mapping")
        return load_config_dict(data, source=str(path))
    except RetainError as err:
        raise StateError(
            f"{path}: cannot read the config this run was started with ({err})",
            hint="resume with the retain version that started the run, or start a new output.dir",
        ) from None


def check_resume_changes(run_dir: Path, config: RunConfig, processes: tuple[int | None, int] | None = None) -> list[Change]:
    """The allowed changes since the run started; a StateError listing every key that may not change.

    ``processes``: (the checkpoint's process count, this run's). ``train.batch_size`` (per process) may
    change when the global batch ``batch_size x processes`` stays the same: resuming on another number
    of processes then continues the same run."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        return []
    changes = config_changes(recorded, config)
    refused = [c for c in changes if not resumable(c.key) and not same_global_batch(c, processes)]
    if refused:
        listed = "; ".join(str(c) for c in refused[:12]) + ("; ..." if len(refused) > 12 else "")
        raise StateError(
            f"{run_dir}: --resume cannot change keys that change the data order or the model "
            f"({len(refused)} differ from {run_dir / 'config.yaml'}: {listed})",
            hint="resume with those keys as they were, or start a new output.dir; only "
            + ", ".join(RESUMABLE_KEYS) + " may change on resume",
        )
    return changes


def same_global_batch(change: Change, processes: tuple[int | None, int] | None) -> bool:
    """A per-process ``train.batch_size`` change that keeps ``batch_size x processes``."""
    if change.key != "train.batch_size" or processes is None or processes[0] is None:
        return False
    before, now = processes
    return isinstance(change.old, int) and isinstance(change.new, int) and change.old * before == change.new * now


# ---------------------------------------------------------------------------------------------
# What the run reads: a content fingerprint of every input file, checked on --resume

#: The run folder's record of its inputs: ``{"files": {path: sha256}, "allowed_changes": [...]}``.
INPUTS_FILE = "inputs.json"


def input_fingerprints(config: RunConfig, inputs: Iterable[str]) -> dict[str, str]:
    """sha256 of every local input but the model (task data, general_data, strategy files, the suite and
    its data); hub names have none. The model's weights are left out: hashing gigabytes on every start
    costs more than it protects (a changed base shows in the scores)."""
    skipped = {config.model.name_or_path, config.model.tokenizer}
    hashes = {}
    for path in dict.fromkeys(str(p) for p in inputs if p and str(p) not in skipped):
        digest = content_hash(path)
        if digest is not None:
            hashes[path] = digest
    return hashes


def check_input_fingerprints(
    run_dir: Path, config: RunConfig, inputs: Iterable[str], *, resuming: bool, allow_changed: bool = False
) -> None:
    """Record what the run reads; on resume, refuse an input whose content changed since the run started.

    A resumed run must see the same data (README: data changes are refused), and a path can keep its
    name while its content changes. ``allow_changed`` (``--allow-changed-data``) continues on the new
    content: one warning line, and the change is recorded in ``inputs.json``.
    """
    path = run_dir / INPUTS_FILE
    current = input_fingerprints(config, inputs)
    record: dict[str, Any] = {}
    if resuming and path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise StateError(f"{path}: cannot read the inputs this run was started with ({err})",
                             hint="restore the file, or start a new output.dir") from None
    recorded = record.get("files") if isinstance(record.get("files"), dict) else {}
    changed = [p for p, digest in current.items() if p in recorded and recorded[p] != digest]
    if changed and not allow_changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise StateError(
            f"--resume refused: {changed[0]}{more} changed since the run in {run_dir} started (its content differs "
            f"from the fingerprint in {path}); a resumed run must read the data it started with",
            hint="restore the file as it was, start a new output.dir, or pass --allow-changed-data to continue on "
            "the changed data (recorded in inputs.json)",
        )
    history = list(record.get("allowed_changes") or [])
    if changed:
        log.warning("resuming on changed input data (--allow-changed-data): %s; recorded in %s", ", ".join(changed), path)
        history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": changed})
    atomic_write_json(path, {"files": {**recorded, **current}, "allowed_changes": history})


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
        entries, has_checkpoint = [], False  # its checkpoints went with it
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
