"""A run: load the model and data, set up strategies, train each task in order, checkpoint, resume,
evaluate after every task, and write standard model directories.

This is the recipe, in named steps as torchtune's recipes have them: ``setup`` (config, run folder,
accelerator, model, data, strategies), ``restore`` (the checkpoint to resume from), ``train_tasks``
(per task: before_task, optimizer, the loop, after_task, outputs, checkpoint) and ``export`` (the
final model folder). No inheritance; ``finetune(config)`` runs the steps in order and is the public entry.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from rich.console import Console
from torch import nn

from retain.config import RunConfig, load_config
from retain.errors import ConfigError
from retain.io import atomic_write_text, default_cache_dir, inside
from retain.io_lock import writing_to
from retain.models.adapters import is_peft_model
from retain.models.export import save_model_dir
from retain.models.sharding import gathered, shard_model
from retain.models.tasks import export_task_choices, task_folder_name
from retain.strategies import Hybrid, StrategyContext, TaskInfo
from retain.strategies.registry import validate_run_config
from retain.train import checkpoint as ckpt
from retain.eval.overlap import overlap_guard
from retain.eval.participant import GO_ON, Decision, Participant, first_stop
from retain.results.schema import BudgetResult
from retain.train.budgeted import budget_config_problems, budget_participant
from retain.train.interrupt import StopRequest, TrainingInterrupted
from retain.train.loop import (
    TaskStats,
    build_optimizer,
    build_scheduler,
    keep_hyperparameters,
    seed_everything,
    train_task,
)
from retain.train.processes import (
    check_data_parallel,
    check_process_count,
    end_training,
    launched_without_devices,
    on_main_process,
    parameter_layout,
    process_group_kwargs,
)
from retain.train.progress import TaskProgress, console_print
from retain.train.sharded_checkpoint import (
    consolidated_state_dict,
    load_any_checkpoint,
    restore_sharded,
    restore_sharded_optimizer,
    save_sharded_checkpoint,
)
from retain.train.sharding import check_sharding_support, resolve_parallel
from retain.train.resume import check_input_fingerprints, check_resume_changes, check_run_dir

log = logging.getLogger("retain")


class RunObserver(Participant, Protocol):
    """The participant that evaluates (``retain.eval.runner.SuiteObserver``): its suite is an input of the
    run, and a budget measures on it and reports into its results."""

    suite: Any

    def set_budget(self, budget: BudgetResult | None) -> None: ...

    def record_warnings(self, warnings: list[str]) -> None:
        """What the run was allowed to do against a rule (``--allow-overlap``), for results.json."""


@dataclass
class RunOutcome:
    run_dir: Path
    final_dir: Path
    model: nn.Module
    tokenizer: Any
    task_stats: list[TaskStats] = field(default_factory=list)
    observer: Any = None  # None on every process but the main one (which alone evaluates and writes)
    is_main_process: bool = True


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run YAML validated completely: keys and values, then every strategy's parameters and needs."""
    config = load_config(path, overrides)
    validate_run_config(config, str(path))
    problems = budget_config_problems(config)
    if problems:
        raise ConfigError(f"invalid config in {path}:\n  " + "\n  ".join(problems))
    return config


def load_tasks(config: RunConfig, tokenizer: Any) -> list[TaskInfo]:
    """Every task of the run, tokenized, with a warning for a task smaller than one batch."""
    from retain.data import build_task_data

    tasks = []
    for index, task in enumerate(config.tasks):
        data = build_task_data(task.data, tokenizer, seed=config.train.seed)
        tasks.append(TaskInfo(index=index, name=task.name, steps=config.steps_for(task), data=data))
        if len(data.train) < config.train.batch_size:
            log.warning(
                "task '%s' has %d training examples, fewer than train.batch_size (%d): every batch repeats examples; "
                "lower train.batch_size or add data",
                task.name, len(data.train), config.train.batch_size,
            )
    return tasks


def run_inputs(config: RunConfig, observer: RunObserver | None = None) -> list[str]:
    """Every local path the run reads, the eval suite's data files included: output.dir must not touch them."""
    suite_files = [p for task in observer.suite.tasks for p in task.input_files().values()] if observer is not None else []
    return [*config.input_paths(), *suite_files]


def _prepare_run_dir(
    config: RunConfig, run_dir: Path, resume: bool, *, overwrite: bool = False, inputs: list[str] | None = None,
    console: Console | None = None, allow_changed_data: bool = False, processes: int = 1,
) -> ckpt.LoadedCheckpoint | None:
    """Apply the run folder's rules (``retain.train.resume``), check what --resume changes, record the
    config, and read the checkpoint to resume from."""
    latest = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    inputs = inputs if inputs is not None else config.input_paths()
    check_run_dir(run_dir, resume=resume, overwrite=overwrite, has_checkpoint=latest is not None, inputs=inputs)
    latest = None if overwrite else latest
    if resume and latest is None:
        console_print(console, f"nothing to resume in {run_dir} (no checkpoint yet): starting from the beginning")
    written_by = ckpt.checkpoint_processes(latest) if latest is not None else None
    for change in check_resume_changes(run_dir, config, (written_by, processes)) if latest is not None else []:
        console_print(console, f"resume with a changed key: {change}")
    check_input_fingerprints(run_dir, config, inputs, resuming=latest is not None, allow_changed=allow_changed_data)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return load_any_checkpoint(latest) if latest is not None else None


def _prepare_run_dir_once(
    accelerator: Any, config: RunConfig, run_dir: Path, resume: bool, *, overwrite: bool, inputs: list[str],
    console: Console | None, held: ExitStack | None = None, allow_changed_data: bool = False,
) -> ckpt.LoadedCheckpoint | None:
    """The run folder's rules applied by the main process; every process then reads the same checkpoint.
    The main process takes the folder's lock into ``held`` first (one writer per run folder)."""
    loaded: ckpt.LoadedCheckpoint | None = None

    def prepare() -> str | None:
        nonlocal loaded
        if held is not None:
            held.enter_context(writing_to(run_dir, "retain train", inputs=inputs, what="output.dir"))
        loaded = _prepare_run_dir(config, run_dir, resume, overwrite=overwrite, inputs=inputs, console=console,
                                  allow_changed_data=allow_changed_data, processes=accelerator.num_processes)
        return None if loaded is None else str(loaded.path)

    path = on_main_process(accelerator, prepare)
    if loaded is not None or path is None:
        return loaded
    return load_any_checkpoint(Path(path))


class FineTune:
    """The recipe, in named steps: ``setup`` -> ``restore`` -> ``train_tasks`` -> ``export``.

    The object only carries what ``setup`` built to the later steps; each step reads top to bottom.
    Evaluation and a forgetting budget take part through ``participants`` (``retain.eval.participant``),
    called at the same points in list order; a participant that wants the run to stop returns a
    :class:`Decision`, and the recipe stops at the next boundary it owns.
    """

    config: RunConfig
    hybrid: Hybrid
    run_dir: Path
    loaded: ckpt.LoadedCheckpoint | None
    accelerator: Any
    model: nn.Module
    tokenizer: Any
    tasks: list[TaskInfo]
    ctx: StrategyContext
    full_weights: bool
    participants: list[Participant]

    def __init__(self, config: RunConfig, *, observer: RunObserver | None = None, console: Console | None = None) -> None:
        self.config = config
        self.observer = observer
        self.console = console
        self.stop = StopRequest()
        self.decision: Decision = GO_ON
        self.held = ExitStack()  # the run folder's lock, released when the run ends however it ends

    # -- setup --------------------------------------------------------------------------------

    def setup(self, *, resume: bool, overwrite: bool = False, model: nn.Module | None = None, tokenizer: Any = None,
              allow_changed_data: bool = False) -> None:
        """Validate, prepare the run folder, load model and data, and let strategies wrap the model."""
        from accelerate import Accelerator

        from retain.data import ensure_pad_token
        from retain.data.task import fit_to_model
        from retain.models.loading import check_quantized_training, load_model, prepare_for_training

        config = self.config
        self.hybrid = Hybrid(validate_run_config(config))  # every config mistake, before any work
        check_quantized_training(config.model, trains_adapters=any(s.peft_wrapper for s in self.hybrid.strategies))
        self.run_dir = Path(config.output.dir)
        self.accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            log_with=list(config.train.trackers) or None,
            project_dir=str(self.run_dir),
            cpu=launched_without_devices(os.environ),
            kwargs_handlers=process_group_kwargs(),
        )
        check_process_count(self.accelerator.num_processes, os.environ)
        self.parallel = resolve_parallel(config.train.parallel, self.accelerator)  # refuses DeepSpeed, FSDP1, Megatron
        if self.parallel == "fsdp":
            check_sharding_support(self.hybrid.strategies, config)  # before any model loads
        else:
            check_data_parallel(self.accelerator.distributed_type)
        self.sharded = self.parallel == "fsdp" and self.accelerator.num_processes > 1
        if self.parallel == "fsdp" and not self.sharded and self.accelerator.is_main_process:
            console_print(self.console, "train.parallel: fsdp with one process: training unsharded "
                          "(checkpoints are written sharded, so the run resumes on several processes)")
        observer = self.observer if self.accelerator.is_main_process else None  # evaluation is the main process's
        budget = budget_participant(
            config, self.hybrid.strategies, self.observer.suite if self.observer is not None else None, processes=self.accelerator.num_processes,
            report=observer.set_budget if observer is not None else None, run_dir=self.run_dir, console=self.console,
        )
        self.participants = [p for p in (observer, budget) if p is not None]
        # whether any process measures the model (the same answer on every process: the observer is the
        # main process's, the budget every process's); a sharded model is gathered for it only then
        self.measuring = self.observer is not None or budget is not None
        warnings = overlap_guard(config, self.observer.suite if self.observer is not None else None,
                                 allow=config.eval.allow_overlap)  # before any model loads
        if observer is not None and warnings:
            observer.record_warnings(warnings)
            for warning in warnings:
                console_print(self.console, f"warning: {warning}")
        self.loaded = _prepare_run_dir_once(
            self.accelerator, config, self.run_dir, resume, overwrite=overwrite,
            inputs=run_inputs(config, self.observer), console=self.console, held=self.held,
            allow_changed_data=allow_changed_data,
        )
        if config.train.trackers:
            self.accelerator.init_trackers("retain", config=_flat_hparams(config))
        seed_everything(config.train.seed)
        if model is None:
            model, tokenizer = load_model(config.model)
        config = self.config = fit_to_model(config, model)  # no window longer than the model's context
        self.tokenizer = ensure_pad_token(tokenizer)
        self.tasks = load_tasks(config, self.tokenizer)
        self.ctx = StrategyContext.for_run(config, self.accelerator, self.tokenizer, model, self.tasks, self.run_dir,
                                           default_cache_dir())
        self.ctx.suite = self.observer.suite if self.observer is not None else None  # what wise chooses on (select)
        for participant in self.participants:
            participant.on_start(model, self.ctx)  # the untouched base model, before any strategy wraps it
        self.accelerator.wait_for_everyone()  # the other processes waited for the main one's evaluation
        model = prepare_for_training(model, config.model, gradient_checkpointing=config.train.gradient_checkpointing)
        if self.sharded:  # FSDP2 per transformer block, by retain (also under accelerate's FSDP2 flags), before the
            # strategies' setup, so a teacher copied there is sharded too (no whole copy per process)
            model = self.ctx.model = shard_model(model.to(self.accelerator.device))
            self.model = self.ctx.model = self.hybrid.setup(model, self.ctx)
        else:
            model = self.hybrid.setup(model, self.ctx)
            self.model = self.ctx.model = self.accelerator.prepare(model)
        self.layout = parameter_layout(model)

    # -- restore ------------------------------------------------------------------------------

    def restore(self) -> ckpt.Position:
        """Apply the checkpoint read by ``setup`` (participant and strategy state, weights, rng); the
        position to start at."""
        loaded = self.loaded
        if loaded is None:
            return ckpt.Position(task_index=0, step_in_task=0, global_step=0, task_started=False)
        self.ctx.resuming = True
        if (loaded.sharded is not None) != (self.parallel == "fsdp"):
            raise ConfigError(
                f"{loaded.path} was written with train.parallel: {'fsdp' if loaded.sharded is not None else 'ddp'}, "
                f"and this run asks for {self.parallel}; the checkpoint layouts differ",
                hint=f"resume with --set train.parallel={'fsdp' if loaded.sharded is not None else 'ddp'}",
            )
        if loaded.sharded is not None:  # weights and sharded strategy tensors, on every process
            restore_sharded(loaded, self.accelerator.unwrap_model(self.model))
        for participant in self.participants:  # a budget's strengths first: strategy state derived from them follows
            participant.load_state_dict(loaded.participants.get(participant.name))
        self.hybrid.load_state_dict(loaded.strategies, self.ctx)  # may rebuild structure the weights need
        if loaded.sharded is None:
            ckpt.load_weights(self.accelerator.unwrap_model(self.model), loaded.weights)
        self.ctx.global_step = loaded.position.global_step
        ckpt.set_rng_state(loaded.rng)
        self.rewrap_if_changed()
        position = loaded.position
        if self.accelerator.is_main_process:
            console_print(self.console, f"resuming from {loaded.path}: {describe_position(position, self.tasks)}")
        return position

    def rewrap_if_changed(self) -> None:
        """Wrap the model again for several processes when a strategy changed its parameters (o-lora's
        new adapter, progressive prompts' grown embedding): DDP's reducer knows only the parameters it
        was built with, and building it again broadcasts the main process's values of every new one."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        layout = parameter_layout(unwrapped)
        if layout == self.layout or self.accelerator.num_processes == 1 or self.sharded:
            self.layout = layout
            return
        self.accelerator.free_memory()  # drops the old wrapper (its gradient buckets and hooks); optimizers are per task
        del self.model
        self.ctx.model = unwrapped
        self.model = self.ctx.model = self.accelerator.prepare(unwrapped)
        self.layout = layout

    # -- train --------------------------------------------------------------------------------

    def train_tasks(self, start: ckpt.Position) -> list[TaskStats]:
        """Each task from ``start`` on, in order; a checkpoint after each; until a participant stops the run."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.full_weights = self.hybrid.modifies_frozen_weights or not is_peft_model(unwrapped)
        done = []
        for task in self.tasks[start.task_index:]:
            done.append(self.train_one_task(task, start))
            if self.decision.stops:
                break
        return done

    def train_one_task(self, task: TaskInfo, start: ckpt.Position) -> TaskStats:
        """before_task, a fresh optimizer (restored mid-task), the loop, after_task, outputs, checkpoint."""
        config, hybrid, accelerator, ctx = self.config, self.hybrid, self.accelerator, self.ctx
        ctx.task = task
        resumed_here = task.index == start.task_index
        mid_task = resumed_here and start.task_started  # before_task ran: its effects are in the strategy state
        if not mid_task:
            hybrid.before_task(task, ctx)
            self.rewrap_if_changed()
            for participant in self.participants:
                participant.on_task_start(accelerator.unwrap_model(self.model), ctx, task)
        first_step = start.step_in_task if resumed_here else 0
        optimizer = accelerator.prepare_optimizer(build_optimizer(self.model, config.train, hybrid.optimizer_settings()), device_placement=False)
        scheduler = build_scheduler(optimizer, config.train, task.steps)
        if mid_task and self.loaded is not None and self.loaded.sharded is not None and self.loaded.scheduler is not None:
            with keep_hyperparameters(optimizer, scheduler):  # resharded to this run's processes
                restore_sharded_optimizer(self.loaded, self.model, optimizer)
                scheduler.load_state_dict(self.loaded.scheduler)
        elif mid_task and self.loaded is not None and self.loaded.optimizer is not None:
            # the restored state, with the hyperparameters of this config (they may change on resume)
            with keep_hyperparameters(optimizer, scheduler):
                optimizer.load_state_dict(self.loaded.optimizer)
                scheduler.load_state_dict(self.loaded.scheduler)

        enabled = config.train.progress and accelerator.is_main_process
        with TaskProgress(f"{hybrid.name} · {task.name}", task.steps, first_step, enabled, self.console) as progress, \
                self.stop.installed():
            stats = train_task(
                model=self.model, hybrid=hybrid, ctx=ctx, task=task, optimizer=optimizer, scheduler=scheduler,
                start_step=first_step, on_step_end=functools.partial(self.end_of_step, task, optimizer, scheduler),
                progress=progress, stop=self.stop,
            )
        for participant in self.participants:  # a budget restores its kept point before anything is exported or scored
            participant.on_train_end(self.model, ctx, task)  # sharded: not gathered, so writes reach the shards
        hybrid.after_task(task, ctx)
        stats.peak_memory = peak_memory_bytes(accelerator.device)
        ckpt.check_finite_weights(accelerator.unwrap_model(self.model), f"the end of task '{task.name}'")
        if config.output.save_per_task:
            self.write_model_dir(inside(self.run_dir, "tasks", task_folder_name(task.index, task.name)))
        with gathered(self.model) if self.measuring else contextlib.nullcontext():  # sharded: whole weights on
            # every process, so the main one measures alone
            self.decision = first_stop([p.on_task_end(self.model, ctx, task, stats) for p in self.participants])
        accelerator.wait_for_everyone()
        if not self.decision.stops:  # a stopped run keeps no task-end checkpoint: a resume repeats the stop
            # The task is complete: the next position is the start of the next task, before its setup.
            self.save_checkpoint(ckpt.Position(task.index + 1, 0, ctx.global_step, task_started=False))
        return stats

    def end_of_step(self, task: TaskInfo, optimizer: Any, scheduler: Any, step_in_task: int) -> bool:
        """After each optimizer step: the participants (a budget check, a step evaluation), the periodic
        checkpoint, and a Ctrl-C's stop. True when a participant ends the task here."""
        stopping = self.stop.requested
        with gathered(self.model) if self.sharded and self.measuring and self.measures_at(step_in_task) \
                else contextlib.nullcontext():
            decision = first_stop([
                p.on_step_end(self.model, self.ctx, task, step_in_task, stopping=stopping) for p in self.participants
            ])
        if decision.stops:
            self.decision = decision
            return True
        every, eval_every = self.config.checkpoint.every, self.config.eval.every_n_steps
        if eval_every and step_in_task % eval_every == 0 and not stopping:
            self.accelerator.wait_for_everyone()  # the other processes waited for the main one's evaluation
        position = ckpt.Position(task.index, step_in_task, self.ctx.global_step, True)
        saved = None
        if every and step_in_task % every == 0 and step_in_task < task.steps:
            saved = self.save_checkpoint(position, optimizer, scheduler)
        if stopping:
            self.stop_here(position, optimizer, scheduler, saved)
        return False

    def stop_here(self, position: ckpt.Position, optimizer: Any, scheduler: Any, saved: Path | None) -> None:
        """Ctrl-C or SIGTERM: checkpoint the step just completed (a second signal skips that) and stop."""
        if saved is None:  # after a task's last step too: resuming there runs the task's end (outputs, evaluation)
            if self.accelerator.is_main_process:
                console_print(self.console, self.stop.saving_note())
            saved = self.save_checkpoint(position, optimizer, scheduler)
        raise TrainingInterrupted(describe_position(position, self.tasks), saved, self.stop.signum)

    def save_checkpoint(self, position: ckpt.Position, optimizer: Any = None, scheduler: Any = None) -> Path:
        """Everything needed to resume at ``position``; optimizer state only mid-task (a task starts fresh)."""
        if self.parallel == "fsdp":  # every process writes its rows (DCP)
            save_sharded_checkpoint(
                self.run_dir, position=position, model=self.accelerator.unwrap_model(self.model), optimizer=optimizer,
                scheduler=scheduler, strategy_state=self.hybrid.state_dict(), keep=self.config.checkpoint.keep,
                participant_state={p.name: p.state_dict() for p in self.participants},
                extra={k: v for p in self.participants for k, v in p.checkpoint_meta().items()},
            )
        elif self.accelerator.is_main_process:
            ckpt.save_checkpoint(
                self.run_dir,
                position=position,
                model=self.accelerator.unwrap_model(self.model),
                full_weights=self.full_weights,
                optimizer=optimizer,
                scheduler=scheduler,
                strategy_state=self.hybrid.state_dict(),
                keep=self.config.checkpoint.keep,
                participant_state={p.name: p.state_dict() for p in self.participants},
                extra={k: v for p in self.participants for k, v in p.checkpoint_meta().items()},
                processes=self.accelerator.num_processes,
            )
        self.accelerator.wait_for_everyone()
        for participant in self.participants:
            participant.after_checkpoint()
        return ckpt.checkpoint_dir(self.run_dir, position.global_step, position.task_index)

    def measures_at(self, step_in_task: int) -> bool:
        """Whether a participant measures the model after this step (a step evaluation, or the ``measures_at``
        of a participant every process has, e.g. a budget): under sharding the weights are gathered for it on
        every process, so every process must give the same answer."""
        every = self.config.eval.every_n_steps
        if every and step_in_task % every == 0:
            return True
        shared = [p for p in self.participants if p is not self.observer]  # the observer is the main process's
        return any(getattr(p, "measures_at", lambda step: False)(step_in_task) for p in shared)

    def write_model_dir(self, out_dir: Path, merge: bool = False) -> None:
        """A model folder ``from_pretrained`` loads, written by the main process; a sharded model's whole
        weights are gathered onto the main process's CPU first (every process takes part)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        whole = consolidated_state_dict(unwrapped) if self.sharded else None
        if self.accelerator.is_main_process:
            save_model_dir(unwrapped, self.tokenizer, out_dir, merge=merge,
                           as_full_model=self.hybrid.modifies_frozen_weights, state_dict=whole)
        del whole

    # -- export -------------------------------------------------------------------------------

    def export(self, task_stats: list[TaskStats]) -> RunOutcome:
        """The final model folder (adapter, or full model; merged too when asked); trackers closed."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        final_dir = self.run_dir / "final"
        self.write_model_dir(final_dir, merge=self.config.output.merge)
        if self.accelerator.is_main_process:
            export_task_choices(self.run_dir, final_dir, [(t.index, t.name) for t in self.tasks],
                                [s.name for s in self.hybrid.strategies], full_model=self.full_weights)
        self.accelerator.wait_for_everyone()
        end_training(self.accelerator)
        outcome = RunOutcome(self.run_dir, final_dir, unwrapped, self.tokenizer, task_stats, self.observer,
                             self.accelerator.is_main_process)
        for participant in self.participants:
            participant.on_run_end(outcome)
        return outcome


def finetune(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    observer: RunObserver | None = None,
    console: Console | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    allow_changed_data: bool = False,
) -> RunOutcome:
    """Train ``config.tasks`` in order with ``config.strategies``; resume exactly from the last checkpoint.

    ``model``/``tokenizer`` may be passed in memory (tests, benchmarks); otherwise they are loaded from
    ``config.model``. ``overwrite`` empties an ``output.dir`` that holds an earlier run or other files
    (never one that holds an input of the run). Ctrl-C during training checkpoints the last completed
    step and raises :class:`~retain.train.interrupt.TrainingInterrupted`. ``allow_changed_data``: resume
    although an input's content changed since the run started (recorded in ``inputs.json``).
    """
    recipe = FineTune(config, observer=observer, console=console)
    with recipe.held:
        recipe.setup(resume=resume, overwrite=overwrite, model=model, tokenizer=tokenizer, allow_changed_data=allow_changed_data)
        start = recipe.restore()
        task_stats = recipe.train_tasks(start)
        outcome = recipe.export(task_stats)
    if recipe.decision.stop is not None:  # a participant ended the run (a budget's on_exhausted: stop)
        raise recipe.decision.stop
    return outcome


def _flat_hparams(config: RunConfig) -> dict[str, Any]:
    """The config as flat ``a.b.c`` scalars, the form trackers take as hyperparameters."""
    flat: dict[str, Any] = {}
    _flatten_into(flat, config.model_dump(mode="json"), "")
    return flat


def _flatten_into(flat: dict[str, Any], node: Any, prefix: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten_into(flat, v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, (int, float, str, bool)):
        flat[prefix] = node
    else:
        flat[prefix] = str(node)


def describe_position(position: ckpt.Position, tasks: list[TaskInfo]) -> str:
    """Where a run stands, in the numbering of checkpoint names: steps count from 1, and "after step k"
    is the state of checkpoint ``step-<global k>``."""
    if position.task_index >= len(tasks):
        return f"after the last task (global step {position.global_step})"
    task = tasks[position.task_index]
    where = f"task '{task.name}' ({position.task_index + 1} of {len(tasks)})"
    if position.step_in_task == 0 and not position.task_started:
        return f"{where}, before its first step (global step {position.global_step})"
    return f"{where}, after step {position.step_in_task} of {task.steps} (global step {position.global_step})"

