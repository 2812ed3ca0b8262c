"""Per-task choices in a final model folder: each task's prompt stack or adapter, and a manifest to pick one.

Prompt and adapter methods keep the base model pristine, so the state at the end of each task is a small
peft folder. ``retain train`` writes those under ``run_dir/tasks/<NN>-<name>/``; :func:`export_task_choices`
copies them into ``final/tasks/`` and writes ``final/retain_tasks.json``, so a final folder carries every
task's choice with it. What each choice holds depends on the method:

- ``progressive-prompts``: the prompt stack at that task's end (its prompt and every earlier one);
- ``o-lora``: the LoRA stack at that task's end (the sum of its adapter and every earlier one);
- ``lora`` / ``prompt-tuning`` over a sequence: the adapter (or prompt) as it was at that task's end.

Full-weight runs have no small per-task artifact (each would be a full copy of the model); their per-task
model folders stay under ``run_dir/tasks/`` and no manifest is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from retain.errors import ConfigError, ModelError
from retain.io import atomic_dir, atomic_write_text, inside

MANIFEST = "retain_tasks.json"
MANIFEST_VERSION = 1

#: strategy name -> (kind, what the choice of task i holds)
_KINDS: dict[str, tuple[str, str]] = {
    "progressive-prompts": ("prompt_stack", "soft prompts of tasks 0..{i}, newest first, as at the end of task {i}"),
    "o-lora": ("adapter_stack", "one LoRA adapter holding the adapters of tasks 0..{i} (their sum), as at the end of task {i}"),
    "prompt-tuning": ("prompt", "the soft prompt as it was at the end of task {i}"),
    "lora": ("adapter", "the LoRA adapter as it was at the end of task {i}"),
}


def task_folder_name(index: int, name: str) -> str:
    """``00-contracts``: the folder name ``retain train`` uses for a task's outputs."""
    return f"{index:02d}-{name}"


def choice_kind(strategy_names: Sequence[str]) -> tuple[str, str] | None:
    """(kind, description template) of a hybrid's per-task choices; None when there are none (full weights)."""
    for name in ("progressive-prompts", "o-lora", "prompt-tuning", "lora"):
        if name in strategy_names:
            return _KINDS[name]
    return None


def export_task_choices(
    run_dir: Path,
    final_dir: Path,
    tasks: Sequence[tuple[int, str]],
    strategy_names: Sequence[str],
    *,
    full_model: bool,
) -> Path | None:
    """Copy each task's folder from ``run_dir/tasks`` into ``final_dir/tasks`` and write the manifest.

    Returns the manifest path, or None when the run has no per-task choice to offer (full-weight runs, or
    ``output.save_per_task: false`` so the per-task folders were never written).
    """
    kind = None if full_model else choice_kind(strategy_names)
    if kind is None:
        return None
    sources = [(index, name, inside(run_dir, "tasks", task_folder_name(index, name))) for index, name in tasks]
    if not all(source.is_dir() for _, _, source in sources):
        return None
    entries = []
    for index, name, source in sources:
        folder = Path("tasks") / task_folder_name(index, name)
        with atomic_dir(inside(final_dir, *folder.parts)) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        entries.append({
            "name": name,
            "index": index,
            "folder": folder.as_posix(),
            "kind": kind[0],
            "contains": kind[1].format(i=index),
        })
    manifest = {
        "version": MANIFEST_VERSION,
        "kind": kind[0],
        "strategies": list(strategy_names),
        "default": "this folder itself: the model after the last task",
        "tasks": entries,
    }
    return atomic_write_text(Path(final_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    """The per-task manifest of a final folder, or None if it has none."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), list):
        raise ModelError(f"{path}: no 'tasks' list; was it written by retain train?")
    return manifest


def task_dir(model_dir: str | Path, task: str) -> Path:
    """The folder of ``task``'s choice inside a final folder (by task name, or by index as a string)."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ConfigError(
            f"--task {task}: {model_dir} has no {MANIFEST}, so it holds no per-task choice",
            hint="per-task choices are written for prompt and adapter methods (progressive-prompts, o-lora, "
            "lora, prompt-tuning) into final/; full-weight runs keep one model folder per task under "
            "run_dir/tasks/, load one of those directly",
        )
    names = [str(entry["name"]) for entry in manifest["tasks"]]
    for entry in manifest["tasks"]:
        if str(entry["name"]) == task or str(entry["index"]) == task:
            folder = Path(model_dir) / entry["folder"]
            if not folder.is_dir():
                raise ModelError(f"{model_dir}/{MANIFEST} names {entry['folder']} for task '{task}', which is missing")
            return folder
    raise ConfigError(f"--task {task}: no such task in {model_dir}; its tasks are: {', '.join(names)}")


def load_task_model(
    model_dir: str | Path, task: str | None = None, *, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """Model + tokenizer of a folder, or of one task's choice in a final folder (``task`` by name or index)."""
    from retain.models.loading import load_any

    path = Path(model_dir) if task is None else task_dir(model_dir, task)
    return load_any(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
