"""A retain run whose training loop belongs to someone else: strategies, tasks, evaluation and outputs
around a ``transformers.Trainer`` (or TRL's ``SFTTrainer``).

The session holds what ``retain train`` holds (the validated run config, the hybrid, a
:class:`~retain.strategies.base.StrategyContext`, the eval observer) and runs the same hooks at the same
points; the Trainer keeps its optimizer, scheduler, data order, mixed precision and checkpoints.
:mod:`retain.integrations.trainer` connects the two. Its order, per task::

    setup(model, tokenizer)       base model scored; strategies wrap it (LoRA, prompts) before the Trainer sees it
    train(trainer)                before_task (or strategy state restored on resume), trainer.train(),
                                  after_task, the task's model folder, scores after the task, results.json
    finish()                      final/ (with per-task choices), results.json, report.html
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from retain.config import DataConfig, RunConfig, load_config_dict
from retain.errors import ConfigError, StateError
from retain.io import default_cache_dir, ensure_dir
from retain.models.adapters import is_peft_model
from retain.models.export import save_model_dir
from retain.models.tasks import export_task_choices, task_folder_name
from retain.strategies import Hybrid, StrategyContext, TaskInfo
from retain.strategies.base import Strategy
from retain.strategies.registry import validate_run_config
from retain.train.loop import TaskStats, seed_everything
from retain.train.run import load_tasks, peak_memory_bytes

log = logging.getLogger("retain")

DataLike = str | Path | Mapping[str, Any] | DataConfig


def _data_dict(data: DataLike) -> dict[str, Any]:
    if isinstance(data, DataConfig):
        return data.model_dump(mode="json")
    if isinstance(data, Mapping):
        return dict(data)
    return {"path": str(data)}


def _strategy_list(strategies: str | Sequence[Any]) -> list[Any]:
    """``"lora+lwf"``, ``"lora,lwf"``, ``["lora", {"name": "lwf", "alpha": 2}]``: the run config's list."""
    if isinstance(strategies, str):
        return [s.strip() for s in strategies.replace(",", "+").split("+") if s.strip()]
    return list(strategies)


class RetainSession:
    """retain's strategies, evaluation and outputs for a training loop run by a Trainer.

    Build it with :meth:`create` (keyword arguments) or from a full :class:`~retain.config.RunConfig`;
    ``config.train`` only seeds strategy randomness there (the Trainer's arguments decide the rest).
    """

    def __init__(self, config: RunConfig, *, suite: Any = None) -> None:
        self.config = config
        self.hybrid = Hybrid(validate_run_config(config))  # every config mistake before any model work
        setters = [s.name for s in self.hybrid.strategies if s.optimizer_settings()]
        if setters:  # the Trainer builds its own optimizer: what these strategies ask of it would never happen
            raise ConfigError(f"strategy {', '.join(setters)} sets the optimizer, and a Trainer keeps its own: "
                              "drop it here (or train with `retain train`)")
        self.run_dir = Path(config.output.dir)
        self.suite = suite if suite is not None else config.eval.suite
        self.observer: Any = None
        self.ctx: StrategyContext | None = None
        self.tokenizer: Any = None
        self.tasks: list[TaskInfo] = []
        self.task_stats: list[TaskStats] = []
        self.next_task = 0
        self.task_start_step = 0  # the Trainer's global_step when the current task's train() began
        self.global_offset = 0  # retain's global step (over all tasks) when the current task began
        self.pending_weights: dict[str, torch.Tensor] | None = None
        self.trainer: Any = None

    @classmethod
    def create(
        cls,
        *,
        strategies: str | Sequence[Any],
        tasks: Mapping[str, DataLike] | None = None,
        task: tuple[str, DataLike] | None = None,
        general_data: DataLike | None = None,
        suite: Any = None,
        output_dir: str | Path = "runs/retain",
        model_name: str = "model",
        seed: int = 0,
        eval_batch_size: int = 16,
        save_per_task: bool = True,
    ) -> "RetainSession":
        """A session from keyword arguments: ``tasks={"contracts": "contracts.jsonl"}`` (or one ``task=(name,
        data)``), a data item being a path, a dict of data keys (``{"path": ..., "max_length": 512}``) or a
        :class:`~retain.config.DataConfig`; ``suite`` a suite YAML path or a loaded ``SuiteConfig``."""
        if (tasks is None) == (task is None):
            raise ConfigError("RetainSession.create: pass either tasks={name: data, ...} or task=(name, data)")
        named = dict(tasks) if tasks is not None else {task[0]: task[1]}
        data: dict[str, Any] = {
            "model": {"name_or_path": str(model_name)},
            "tasks": [{"name": name, "data": _data_dict(item)} for name, item in named.items()],
            "strategies": _strategy_list(strategies),
            "train": {"seed": seed, "progress": False},
            "eval": {"batch_size": eval_batch_size},
            "output": {"dir": str(output_dir), "save_per_task": save_per_task},
        }
        if general_data is not None:
            data["general_data"] = _data_dict(general_data)
        if isinstance(suite, (str, Path)):
            data["eval"]["suite"] = str(suite)
            suite = None
        return cls(load_config_dict(data, source="RetainSession.create"), suite=suite)

    # -- setup ----------------------------------------------------------------------------------

    @property
    def strategies(self) -> list[Strategy]:
        return self.hybrid.strategies

    def setup(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Score the untouched base model, then let the strategies wrap it; pass the result to the Trainer.

        Seeds the global RNGs with the session's seed first, as ``retain train`` does, so adapter and prompt
        initialisations are the same as in a ``retain train`` run with that seed.
        """
        from retain.data import ensure_pad_token

        ensure_dir(self.run_dir, "create the output folder")
        seed_everything(self.config.train.seed)
        self.tokenizer = ensure_pad_token(tokenizer)
        self.tasks = load_tasks(self.config, self.tokenizer)
        # the Trainer's accelerator is bound in train(); setup hooks do not use it
        self.ctx = StrategyContext.for_run(self.config, None, self.tokenizer, model, self.tasks, self.run_dir,
                                           default_cache_dir())
        self.observer = self._observer()
        if self.observer is not None:
            self.observer.on_start(model, self.ctx)
        return self.hybrid.setup(model, self.ctx)

    def _observer(self) -> Any:
        if self.suite is None:
            return None
        from retain.eval.runner import SuiteObserver
        from retain.eval.suite import SuiteConfig, load_suite

        suite = self.suite if isinstance(self.suite, SuiteConfig) else load_suite(self.suite)
        return SuiteObserver(
            suite, name=self.hybrid.name, run_dir=self.run_dir, config=self.config.model_dump(mode="json"),
            batch_size=self.config.eval.batch_size,
        )

    # -- data -----------------------------------------------------------------------------------

    def train_dataset(self, task: str | int | None = None) -> "ExampleDataset":
        """The task's training examples tokenized as ``retain train`` tokenizes them (loss masks included),
        for a ``transformers.Trainer``; batch them with :attr:`data_collator`."""
        return ExampleDataset(self._task(task).train_examples)

    @property
    def data_collator(self) -> Any:
        """Right-pads examples into ``input_ids``/``attention_mask``/``labels``, as retain's loop does."""
        return ExampleCollator(self._require_ctx().tokenizer.pad_token_id)

    def _task(self, task: str | int | None) -> TaskInfo:
        if not self.tasks:
            raise StateError("call session.setup(model, tokenizer) first")
        if task is None:
            if self.next_task >= len(self.tasks):
                raise StateError(f"every task of the session is trained ({', '.join(t.name for t in self.tasks)})")
            return self.tasks[self.next_task]
        for info in self.tasks:
            if info.name == task or info.index == task:
                return info
        raise ConfigError(f"no task {task!r} in the session; its tasks: {', '.join(t.name for t in self.tasks)}")

    def _require_ctx(self) -> StrategyContext:
        if self.ctx is None:
            raise StateError("call session.setup(model, tokenizer) before building or training the Trainer")
        return self.ctx

    # -- the Trainer ----------------------------------------------------------------------------

    def bind(self, trainer: Any) -> None:
        """Called by the retain Trainer when it is built: strategies use its accelerator and model from now on."""
        ctx = self._require_ctx()
        ctx.accelerator = trainer.accelerator
        ctx.model = trainer.model
        self.trainer = trainer

    def train(self, trainer: Any, task: str | int | None = None, resume_from_checkpoint: str | bool | None = None,
              **train_kwargs: Any) -> Any:
        """One task: ``before_task`` (or the strategy state of the checkpoint), ``trainer.train()``,
        ``after_task``, the task's model folder and its scores. Returns what ``trainer.train`` returned."""
        from retain.integrations.checkpoint import find_checkpoint, read_state

        ctx = self._require_ctx()
        if getattr(trainer, "retain", None) is not self:
            raise ConfigError("this Trainer was not built with retain=session: use retain_trainer(TrainerClass)(..., retain=session)")
        info = self._task(task)
        checkpoint = find_checkpoint(trainer, resume_from_checkpoint)
        ctx.task = info
        info.steps = planned_steps(trainer)
        state = read_state(checkpoint) if checkpoint is not None else None
        if state is not None:
            if state.task_index != info.index:
                raise StateError(
                    f"{checkpoint} was saved during task {state.task_index} ({state.task_name}), not '{info.name}'; "
                    "resume each task with its own checkpoint"
                )
            ctx.resuming = True
            self.task_start_step = state.task_start_step
            ctx.global_step = state.global_offset + (trainer_step_of(checkpoint) - state.task_start_step)
            self.hybrid.load_state_dict(state.strategies, ctx)  # may rebuild structure the weights need
            self.pending_weights = state.weights
            self.global_offset = state.global_offset
        else:
            self.task_start_step = trainer.state.global_step
            self.global_offset = ctx.global_step
            self.hybrid.before_task(info, ctx)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=checkpoint, **train_kwargs)
        seconds = time.perf_counter() - started
        self.pending_weights = None
        self.hybrid.after_task(info, ctx)
        self._end_task(trainer, info, seconds)
        return output

    def _end_task(self, trainer: Any, info: TaskInfo, seconds: float) -> None:
        ctx = self._require_ctx()
        unwrapped = ctx.unwrapped_model
        steps = trainer.state.global_step - self.task_start_step
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        stats = TaskStats(
            steps=steps, seconds=seconds, last_loss=losses[-1] if losses else None,
            trainable_params=sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
            peak_memory=peak_memory_bytes(ctx.device),
        )
        self.task_stats.append(stats)
        main = ctx.accelerator.is_main_process
        if self.config.output.save_per_task and main:
            save_model_dir(unwrapped, self.tokenizer, self.run_dir / "tasks" / task_folder_name(info.index, info.name),
                           as_full_model=self.hybrid.modifies_frozen_weights)
        if self.observer is not None:
            self.observer.on_task_end(ctx.model, ctx, info, stats)
            if main:
                self.observer.write_results()
        self.next_task = info.index + 1

    # -- outputs --------------------------------------------------------------------------------

    def finish(self) -> dict[str, Path]:
        """``final/`` (with each task's prompt or adapter when the method has them), ``results.json`` and
        ``report.html`` when a suite was given. Returns the paths written."""
        ctx = self._require_ctx()
        written: dict[str, Path] = {}
        if ctx.accelerator is not None and not ctx.accelerator.is_main_process:
            return written
        unwrapped = ctx.unwrapped_model if ctx.accelerator is not None else ctx.model
        full_model = self.hybrid.modifies_frozen_weights or not is_peft_model(unwrapped)
        final = self.run_dir / "final"
        save_model_dir(unwrapped, self.tokenizer, final, merge=self.config.output.merge,
                       as_full_model=self.hybrid.modifies_frozen_weights)
        trained = [(t.index, t.name) for t in self.tasks[: self.next_task]]
        export_task_choices(self.run_dir, final, trained, [s.name for s in self.strategies], full_model=full_model)
        written["final"] = final
        if self.observer is not None:
            from retain.report.html import write_report
            from retain.results.schema import Results

            results = self.observer.write_results()
            written["results"] = results
            written["report"] = write_report(Results.load(results), self.run_dir / "report.html")
        return written


def planned_steps(trainer: Any) -> int:
    """Optimizer steps the Trainer will take: ``max_steps`` when set, else epochs x batches per epoch."""
    import math

    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    return int(math.ceil(batches / args.gradient_accumulation_steps) * math.ceil(args.num_train_epochs))


def trainer_step_of(checkpoint: Path) -> int:
    """The Trainer's global step a ``checkpoint-N`` folder was saved at."""
    import json

    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state["global_step"])


class ExampleDataset(torch.utils.data.Dataset):
    """retain examples as a map-style dataset of ``{"input_ids", "labels"}`` lists."""

    def __init__(self, examples: Sequence[Any]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": list(example.input_ids), "labels": list(example.labels)}


class ExampleCollator:
    """``retain.data.collate`` for the rows of :class:`ExampleDataset` (a class, so it pickles for workers)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        from retain.data import Example, collate

        examples = [Example(input_ids=list(r["input_ids"]), labels=list(r["labels"])) for r in rows]
        return collate(examples, self.pad_token_id)
