"""A run: load the model and data, set up strategies, train each task in order, checkpoint, resume,
evaluate after every task, and write standard model directories.

This is the recipe: one explicit function, no inheritance. ``finetune(config)`` is the public entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from rich.console import Console
from torch import nn

from retain.config import RunConfig, load_config
from retain.errors import StateError
from retain.io import atomic_write_text, default_cache_dir
from retain.models.adapters import is_peft_model
from retain.models.export import save_model_dir
from retain.strategies import Hybrid, StrategyContext, TaskInfo
from retain.strategies.registry import validate_run_config
from retain.train import checkpoint as ckpt
from retain.train.loop import TaskStats, build_optimizer, build_scheduler, seed_everything, train_task
from retain.train.progress import TaskProgress

log = logging.getLogger("retain")


class RunObserver(Protocol):
    """Evaluation hooks of a run (see ``retain.eval.runner``)."""

    def on_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        """The base model, before strategies wrap it; called on resume too (records persist)."""

    def on_step(self, model: nn.Module, ctx: StrategyContext, task: TaskInfo) -> None: ...

    def on_task_end(self, model: nn.Module, ctx: StrategyContext, task: TaskInfo, stats: TaskStats) -> None: ...


@dataclass
class RunOutcome:
    run_dir: Path
    final_dir: Path
    model: nn.Module
    tokenizer: Any
    task_stats: list[TaskStats] = field(default_factory=list)
    observer: Any = None


def config_fingerprint(config: RunConfig) -> str:
    """Hash of everything that changes the trained weights (not logging or progress options)."""
    data = config.model_dump(mode="json")
    data["train"].pop("progress", None)
    data["train"].pop("log_every", None)
    data["train"].pop("trackers", None)
    data.pop("eval", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run YAML validated completely: keys and values, then every strategy's parameters and needs."""
    config = load_config(path, overrides)
    validate_run_config(config, str(path))
    return config


def _load_tasks(config: RunConfig, tokenizer: Any) -> list[TaskInfo]:
    from retain.data import build_task_data

    tasks = []
    for index, task in enumerate(config.tasks):
        data = build_task_data(task.data, tokenizer, seed=config.train.seed)
        tasks.append(TaskInfo(index=index, name=task.name, steps=config.steps_for(task), data=data))
    return tasks


def _prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> ckpt.LoadedCheckpoint | None:
    fingerprint = config_fingerprint(config)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise StateError(
            f"{run_dir} already holds checkpoints of a run. Pass --resume to continue it, or choose another "
            "output.dir (e.g. --set output.dir=runs/new)."
        )
    recorded = run_dir / "fingerprint.txt"
    if latest is not None and recorded.exists() and recorded.read_text().strip() != fingerprint:
        raise StateError(
            f"{run_dir}: the config differs from the one this run was started with (see {run_dir}/config.yaml); "
            "resume with the same config, or start a new output.dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    atomic_write_text(recorded, fingerprint)
    return ckpt.load_checkpoint(latest) if latest is not None else None


def finetune(
    config: RunConfig,
    *,
    resume: bool = False,
    observer: RunObserver | None = None,
    console: Console | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> RunOutcome:
    """Train ``config.tasks`` in order with ``config.strategies``; resume exactly from the last checkpoint.

    ``model``/``tokenizer`` may be passed in memory (tests, benchmarks); otherwise they are loaded from
    ``config.model``.
    """
    from accelerate import Accelerator

    from retain.data import ensure_pad_token
    from retain.models.loading import load_model

    hybrid = Hybrid(validate_run_config(config))  # every config mistake, before any work
    run_dir = Path(config.output.dir)
    loaded = _prepare_run_dir(config, run_dir, resume)
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with=list(config.train.trackers) or None,
        project_dir=str(run_dir),
    )
    if config.train.trackers:
        accelerator.init_trackers("retain", config=_flat_hparams(config))
    seed_everything(config.train.seed)
    if model is None:
        model, tokenizer = load_model(config.model)
    tokenizer = ensure_pad_token(tokenizer)
    tasks = _load_tasks(config, tokenizer)

    from retain.data import collate

    pad_id = tokenizer.pad_token_id
    ctx = StrategyContext(
        config=config,
        accelerator=accelerator,
        tokenizer=tokenizer,
        model=model,
        tasks=tasks,
        run_dir=run_dir,
        cache_dir=default_cache_dir(),
        collate=lambda examples: collate(examples, pad_id),
    )
    if observer is not None:
        observer.on_start(model, ctx)  # the untouched base model, before any strategy wraps it
    model = hybrid.setup(model, ctx)
    model = accelerator.prepare(model)
    ctx.model = model

    start_task, start_step, task_started = 0, 0, False
    if loaded is not None:
        ctx.resuming = True
        hybrid.load_state_dict(loaded.strategies, ctx)
        ckpt.load_weights(accelerator.unwrap_model(model), loaded.weights)
        start_task = loaded.position.task_index
        start_step = loaded.position.step_in_task
        task_started = loaded.position.task_started
        ctx.global_step = loaded.position.global_step
        ckpt.set_rng_state(loaded.rng)
        console_print(console, f"resuming from {loaded.path} (task {start_task}, step {start_step})")

    full_weights = hybrid.modifies_frozen_weights or not is_peft_model(accelerator.unwrap_model(model))
    all_stats: list[TaskStats] = []
    for task in tasks[start_task:]:
        ctx.task = task
        resumed_here = loaded is not None and task.index == start_task
        if not (resumed_here and task_started):
            hybrid.before_task(task, ctx)
        first_step = start_step if resumed_here else 0
        optimizer = accelerator.prepare_optimizer(build_optimizer(model, config.train), device_placement=False)
        scheduler = build_scheduler(optimizer, config.train, task.steps)
        if resumed_here and task_started and loaded.optimizer is not None:
            optimizer.load_state_dict(loaded.optimizer)
            scheduler.load_state_dict(loaded.scheduler)

        def save(step_in_task: int, *, started: bool = True, index: int = task.index) -> None:
            position = ckpt.Position(index, step_in_task, ctx.global_step, started)
            if accelerator.is_main_process:
                ckpt.save_checkpoint(
                    run_dir,
                    position=position,
                    model=accelerator.unwrap_model(model),
                    full_weights=full_weights,
                    optimizer=optimizer if started else None,
                    scheduler=scheduler if started else None,
                    strategy_state=hybrid.state_dict(),
                    keep=config.checkpoint.keep,
                )
            accelerator.wait_for_everyone()

        def on_step_end(step_in_task: int) -> None:
            every = config.checkpoint.every
            if every and step_in_task % every == 0 and step_in_task < task.steps:
                save(step_in_task)
            if observer is not None and config.eval.every_n_steps and step_in_task % config.eval.every_n_steps == 0:
                observer.on_step(model, ctx, task)

        enabled = config.train.progress and accelerator.is_main_process
        with TaskProgress(f"{hybrid.name} · {task.name}", task.steps, first_step, enabled, console) as progress:
            stats = train_task(
                model=model,
                hybrid=hybrid,
                ctx=ctx,
                task=task,
                optimizer=optimizer,
                scheduler=scheduler,
                start_step=first_step,
                on_step_end=on_step_end,
                progress=progress,
            )
        hybrid.after_task(task, ctx)
        stats.peak_memory = peak_memory_bytes(accelerator.device)  # type: ignore[attr-defined]
        all_stats.append(stats)
        unwrapped = accelerator.unwrap_model(model)
        if config.output.save_per_task and accelerator.is_main_process:
            save_model_dir(
                unwrapped, tokenizer, run_dir / "tasks" / f"{task.index:02d}-{task.name}",
                as_full_model=hybrid.modifies_frozen_weights,
            )
        if observer is not None:
            observer.on_task_end(model, ctx, task, stats)
        # The task is complete: the next position is the start of the next task, before its setup.
        save(0, started=False, index=task.index + 1)

    unwrapped = accelerator.unwrap_model(model)
    final_dir = run_dir / "final"
    if accelerator.is_main_process:
        save_model_dir(
            unwrapped, tokenizer, final_dir, merge=config.output.merge, as_full_model=hybrid.modifies_frozen_weights
        )
    accelerator.end_training()
    return RunOutcome(run_dir, final_dir, unwrapped, tokenizer, all_stats, observer)


def _flat_hparams(config: RunConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix] = node
        else:
            flat[prefix] = str(node)

    walk(config.model_dump(mode="json"), "")
    return flat


def console_print(console: Console | None, message: str) -> None:
    (console or Console(stderr=True)).print(message)
