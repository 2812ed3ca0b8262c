"""A forgetting budget inside a run, as a run participant (``retain.eval.participant``): measure every
``check_every`` steps, move the strengths, keep the best in-budget point of each task, and roll back to
it when a task ends over budget. It decides; the recipe stops where a decision says so.

What happens, per task::

    on_task_start  measure the model as the task starts (a candidate: it learned nothing of the task yet)
    on_step_end    at check steps: measure (``retain.eval.budget``), let the controller move every
                   declared strength (``retain.train.budget``), apply them (``Strategy.set_strength``),
                   remember the point if it is within budget with the best new-task score so far;
                   over budget with every strength at its limit and ``on_exhausted: stop``: a stop decision
    on_train_end   measure again if the last step was not a check; over budget -> ``on_exhausted``:
                   rollback/stop restore the kept point before ``after_task``, the task-end evaluation
                   and the exports; warn keeps the last model and says so
    on_task_end    record the trained tasks' scores (forgetting's reference); stop: a stop decision

The kept point is the trainable weights only (nothing else moves within a task: the one strategy that
changes frozen weights, ewc-lora, merges in ``after_task``, which runs after the rollback). They stay
in memory when they are a small share of the model (adapters, prompts, a few unfrozen blocks) and go
to ``<run_dir>/budget/`` otherwise (full fine-tuning), written atomically; sharded weights (FSDP2) stay
in memory as sharded clones, each process its own rows. Strategy state that accumulates along the path
(path integrals, replay counters) is not rolled back.

Everything here is in the checkpoint (``state_dict``), the kept weights of the memory case included, so
a resumed run takes the same decisions as an uninterrupted one.

Several processes: the main process measures alone and its measurement is given to every process;
the controller, the kept point's choice and the task's decision are pure functions of the
measurements, so every process takes the same ones (strengths, rollback, stop) without further
messages. Data-parallel processes hold the same weights, so the main process alone keeps the point; a
rollback restores it there and broadcasts the trainable weights to the others. Sharded weights
(FSDP2) are gathered on every process around a measurement, as for the evaluation (the recipe gathers
around the steps :meth:`BudgetParticipant.measures_at` names; the participant gathers itself at a
task's start and end), so the main process measures the whole model alone; every process keeps its
own rows of the point (sharded clones) and a rollback writes them back into its shards. The kept
point goes into the sharded checkpoint as sharded tensors, so a resume on another number of processes
reads it resharded (and a point kept whole, on disk by one process, is cut to each process's rows).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from retain.config import BudgetConfig, RunConfig
from retain.data.sampling import Stream, derive_seed, seeded_subset
from retain.errors import ConfigError, GateError
from retain.eval.budget import BudgetMeter, Measurement, budget_problems, mean_task_loss
from retain.eval.participant import GO_ON, Decision, Participant
from retain.eval.suite import SuiteConfig
from retain.io import append_jsonl, atomic_file
from retain.models.sharding import (
    fsdp_modules, gathered, holds_shards, is_dtensor, is_sharded, local, once, shard_like, sharded_parameters,
)
from retain.results.schema import BudgetCheck, BudgetResult, BudgetTask
from retain.strategies import Strategy, TaskInfo
from retain.strategies.base import Strength
from retain.train.budget import Bounds, BudgetController, is_check_step, next_check_step, worst_violation
from retain.train.checkpoint import save_tensors
from retain.train.progress import console_print

log = logging.getLogger("retain")

#: Trainable weights up to this share of the model are kept in memory; more go to disk.
IN_MEMORY_SHARE = 0.25
KEPT_DIR = "budget"


class BudgetExhausted(GateError):
    """``on_exhausted: stop``: over budget with no protection left to add (or a task ended over budget)."""


@dataclass
class KeptPoint:
    """The best point of the current task so far: where it is and what was measured there."""

    step: int
    global_step: int
    score: float | None
    within: bool
    violation: float | None
    file: str | None = None  # under <run_dir>/budget/ when kept on disk
    tensors: dict[str, torch.Tensor] | None = None  # when kept in memory

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "tensors"}

    def better_than(self, other: "KeptPoint | None") -> bool:
        """In budget beats over budget; then the higher new-task score (in budget) or the smaller violation."""
        if other is None:
            return True
        if self.within != other.within:
            return self.within
        if self.within:
            return _gt(self.score, other.score)
        return _gt(None if self.violation is None else -self.violation, None if other.violation is None else -other.violation)


def _gt(a: float | None, b: float | None) -> bool:
    """a > b, where a measured value beats an unmeasured one."""
    if a is None:
        return False
    return b is None or a > b


def budget_config_problems(config: RunConfig) -> list[str]:
    """What the run config alone shows a budget lacks (no eval suite to measure on), before the suite loads."""
    if config.budget is None or config.eval.suite:
        return []
    return budget_problems(config.budget, None, [], "eval.suite")


def broadcast_trainable(model: nn.Module) -> None:
    """The main process's trainable weights copied into every process's (data-parallel rollback)."""
    import torch.distributed as dist

    with torch.no_grad():
        for _, p in sorted(sharded_parameters(model).items()):
            dist.broadcast(p.data, src=0)


def whole_weights(model: nn.Module) -> Any:
    """The whole weights on every process for a block (a collective): a sharded model not gathered yet is
    gathered (``retain.models.sharding.gathered``); otherwise nothing changes."""
    return gathered(model) if holds_shards(model) else contextlib.nullcontext()


def budget_participant(
    config: RunConfig, strategies: list[Strategy], suite: SuiteConfig | None, *, processes: int,
    report: Callable[[BudgetResult], None] | None, run_dir: Path, console: Any = None,
) -> "BudgetParticipant | None":
    """The run's budget participant, or None without a ``budget:`` section; refuses, before any model loads,
    a budget the suite cannot measure. Built on every process (``processes``: how many): the main one
    measures and all apply the same decisions."""
    if config.budget is None:
        return None
    problems = budget_problems(config.budget, suite, [t.name for t in config.tasks], "eval.suite")
    if problems:
        raise ConfigError("invalid budget:\n  " + "\n  ".join(problems))
    assert suite is not None  # budget_problems refuses a budget without a suite
    meter = BudgetMeter(
        suite, config.budget.probe_examples, config.eval.batch_size,
        measure_retention=config.budget.min_general_retention is not None, measure_kl=config.budget.max_kl is not None,
        measure_forgetting=config.budget.max_task_forgetting is not None,
        measure_task_kl=config.budget.max_task_kl is not None,
    )
    return BudgetParticipant(config.budget, strategies, meter, run_dir=run_dir, report=report, console=console)


class BudgetParticipant(Participant):
    """The budget of one run: controller, measurements, the kept point and the per-task decisions."""

    name = "budget"  # its checkpoint state is ``budget.json``

    def __init__(
        self,
        config: BudgetConfig,
        strategies: list[Strategy],
        meter: BudgetMeter,
        *,
        run_dir: Path,
        report: Callable[[BudgetResult], None] | None = None,
        console: Any = None,
    ) -> None:
        self.config = config
        self.meter = meter
        self.run_dir = Path(run_dir)
        self.report = report
        self.console = console
        self.ctx: Any = None  # the run's StrategyContext, bound in on_start
        self.strategies = {s.name: s for s in strategies}
        strengths = [Strength.of(type(s)) for s in strategies if s.strength is not None and config.adapt]
        start = {x.label: x.clip(getattr(self.strategies[x.strategy].config, x.key)) for x in strengths if x}
        self.bounds = Bounds(config.min_general_retention, config.max_kl, config.max_task_forgetting,
                             config.max_task_kl)
        self.controller = BudgetController(
            self.bounds, [x for x in strengths if x], values=dict(start), eta=1.0,
            max_step=config.max_step * math.log(10.0), margin=config.margin,
        )
        self.start_values = dict(start)
        self.checks: list[BudgetCheck] = []
        self.decisions: list[BudgetTask] = []
        self.kept: KeptPoint | None = None
        self.in_memory = True
        self.seconds = 0.0
        self.stopped: str | None = None
        self._stop: GateError | None = None
        self._stopped_at: int | None = None  # the step a mid-task stop decision ended the task at
        self.apply()

    # -- strengths ----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "adaptive" if self.controller.strengths else "rollback baseline"

    def apply(self) -> None:
        """Hand each strategy its current strength (only where it changed)."""
        for strength in self.controller.strengths:
            strategy, value = self.strategies[strength.strategy], self.controller.values[strength.label]
            if getattr(strategy.config, strength.key) != value:
                strategy.set_strength(value)

    # -- participant points -------------------------------------------------------------------

    def on_start(self, model: nn.Module, ctx: Any) -> None:
        """The base model's side of every measurement, taken before any strategy wraps the model."""
        self.ctx = ctx
        self._agreed(model, lambda: self._start(model))

    def _start(self, model: nn.Module) -> None:
        self.meter.start(model, self.ctx.tokenizer, self.ctx.tasks)
        if self.config.min_general_retention is not None and self.meter.base_general is None:
            raise ConfigError(
                "budget.min_general_retention: the suite's general evals gave no bounded score on the base model "
                "(e.g. next_token_accuracy); add one to eval.suite"
            )
        if self.config.min_general_retention is not None and self.meter.base_general == 0:
            raise ConfigError(
                "budget.min_general_retention: the base model scores 0 on the select part of the suite's general "
                "evals, so retention (after / before) is undefined; use general evals the base model scores above 0 on"
            )

    def on_task_start(self, model: nn.Module, ctx: Any, task: TaskInfo) -> None:
        """The task's first candidate: the model as the task starts (no strength moves on it)."""
        trainable = sharded_parameters(model)
        total = sum(p.numel() for p in sharded_parameters(model, trainable_only=False).values())
        small = sum(p.numel() for p in trainable.values()) <= IN_MEMORY_SHARE * max(total, 1)
        self.in_memory = small or is_sharded(model)  # sharded: each process keeps its rows in memory
        self.kept = None
        self._stopped_at = None
        self.controller.new_task()
        self.check(model, task, 0, update=False)

    def measures_at(self, step_in_task: int) -> bool:
        """Whether this participant measures after the step (the recipe gathers sharded weights for it)."""
        return is_check_step(step_in_task, self.config.check_every, self.config.early_checks)

    def on_step_end(self, model: nn.Module, ctx: Any, task: TaskInfo, step: int, *, stopping: bool) -> Decision:
        """Measure at check steps (before the step's checkpoint, which holds what the check changed)."""
        if not is_check_step(step, self.config.check_every, self.config.early_checks):
            return GO_ON
        row = self.check(ctx.unwrapped_model, task, step)
        if not row.within_budget:
            return self._over_budget(row, task)
        return GO_ON

    def on_train_end(self, model: nn.Module, ctx: Any, task: TaskInfo) -> None:
        self.end_task(ctx.unwrapped_model, task, end_step=self._stopped_at)

    def on_task_end(self, model: nn.Module, ctx: Any, task: TaskInfo, stats: Any) -> Decision:
        """Record what forgetting is measured from; a run the budget stopped ends here (no task-end
        checkpoint: a resume repeats the stop rather than go on past it)."""
        self.record_task_end(ctx.unwrapped_model, task)
        self._report()
        return Decision(stop=self.stop_error()) if self.stopped else GO_ON

    # -- measuring ----------------------------------------------------------------------------

    @property
    def _main(self) -> bool:
        return self.ctx is None or self.ctx.accelerator.is_main_process

    def _agreed(self, model: nn.Module, work: Callable[[], Any]) -> Any:
        """``work()`` (a measurement) on the main process, on whole weights (sharded ones gathered on every
        process first, unless the recipe did), its value on every process."""
        with whole_weights(model):
            return once(self.ctx.accelerator, work)

    def _measure(self, model: nn.Module, task: TaskInfo) -> Measurement:
        """The main process's measurement, on every process (the decisions that follow are computed
        from it alike on each)."""
        return self._agreed(model, lambda: self._measure_here(model, task))

    def _measure_here(self, model: nn.Module, task: TaskInfo) -> Measurement:
        earlier = [t.name for t in self.ctx.tasks[: task.index]]
        measured = self.meter.measure(model, self.ctx.tokenizer, task.name, earlier)
        if measured.task_score is None:  # no eval of this task in the suite: held-out (or a fixed subset of) its data
            examples = task.data.validation or task.train_examples
            subset = seeded_subset(examples, self.meter.probe_examples, derive_seed(self.ctx.config.train.seed, Stream.BUDGET_PROBE))
            measured.task_score = -mean_task_loss(model, subset, self.ctx.collate, self.ctx.device, self.meter.batch_size)
        return measured

    def check(self, model: nn.Module, task: TaskInfo, step: int, *, update: bool = True) -> BudgetCheck:
        """Measure, move the strengths (``update``), remember the point if it is the best so far; one trajectory row."""
        start = time.perf_counter()
        before = dict(self.controller.values)
        measured = self._measure(model, task)
        global_step = self.ctx.global_step
        if update:
            upcoming = next_check_step(step, self.config.check_every, self.config.early_checks, task.steps)
            worst = self.controller.update(measured, global_step, global_step + upcoming - step if step < task.steps else None)
            self.apply()
        else:
            worst = worst_violation(measured, self.bounds)
        within = worst is None or worst <= 0.0
        row = BudgetCheck(
            task=task.name, step=step, global_step=global_step, general_retention=measured.general_retention,
            kl=measured.kl, task_forgetting=measured.task_forgetting, new_task_score=measured.task_score,
            task_kl=measured.task_kl,
            violation=worst, within_budget=within, strengths=dict(self.controller.values),
        )
        moved = {k: (before[k], v) for k, v in self.controller.values.items() if v != before.get(k)}
        self.checks.append(row)
        self._say_check(row, moved)
        candidate = KeptPoint(step, global_step, measured.task_score, within, worst)
        if candidate.better_than(self.kept):
            self._keep(model, task, candidate)
        self._log(row)
        self.seconds += time.perf_counter() - start
        return row

    def _say_check(self, row: BudgetCheck, moved: dict[str, tuple[float, float]]) -> None:
        """One console line per check: what was measured against which bound, and how the strengths moved."""
        if not self._main:
            return
        state = "within budget" if row.within_budget else "over budget"
        change = "; ".join(f"{k} {a:.3g} -> {b:.3g}" for k, (a, b) in moved.items()) or "strengths unchanged"
        console_print(self.console, f"budget: task '{row.task}' step {row.step}: {self.describe(row)}: {state}; {change}")

    def _over_budget(self, row: BudgetCheck, task: TaskInfo) -> Decision:
        what = self.describe(row)
        if self.config.on_exhausted == "warn":
            if self._main:
                console_print(self.console, f"budget: over at task '{task.name}' step {row.step} ({what}); going on (on_exhausted: warn)")
        elif self.config.on_exhausted == "stop" and self.controller.at_protective_limit():
            limits = ", ".join(f"{k}={v:.3g}" for k, v in self.controller.values.items()) or "no adaptable strength"
            self._stopped_at = row.step
            self._stop = BudgetExhausted(
                f"budget exhausted at task '{task.name}' step {row.step}: {what}, with every strength at its most "
                f"protective limit ({limits})",
                hint="loosen the budget, lower train.lr, or add a protective strategy; the best in-budget point was kept",
            )
            return Decision(stop=self._stop)
        return GO_ON

    def describe(self, row: BudgetCheck) -> str:
        """The measured bounded quantities against their bounds, in words."""
        parts = []
        if self.bounds.min_general_retention is not None and row.general_retention is not None:
            parts.append(f"general retention {row.general_retention:.4f} (floor {self.bounds.min_general_retention:g})")
        if self.bounds.max_kl is not None and row.kl is not None:
            parts.append(f"KL {row.kl:.4g} (ceiling {self.bounds.max_kl:g})")
        if self.bounds.max_task_kl is not None and row.task_kl is not None:
            parts.append(f"task KL {row.task_kl:.4g} (ceiling {self.bounds.max_task_kl:g})")
        if self.bounds.max_task_forgetting is not None and row.task_forgetting is not None:
            parts.append(f"forgetting {row.task_forgetting:.4f} (ceiling {self.bounds.max_task_forgetting:g})")
        return ", ".join(parts) or "nothing budgeted was measurable"

    def _log(self, row: BudgetCheck) -> None:
        measured = ("general_retention", "kl", "task_kl", "task_forgetting", "new_task_score", "violation")
        values = {f"budget/{key}": float(getattr(row, key)) for key in measured if getattr(row, key) is not None}
        values["budget/within"] = float(row.within_budget)
        values.update({f"budget/{k}": v for k, v in row.strengths.items()})
        accelerator = self.ctx.accelerator
        accelerator.log({f"{row.task}/{k}": v for k, v in values.items()}, step=row.global_step)
        if accelerator.is_main_process:
            append_jsonl(self.run_dir / "train_log.jsonl",
                         {"task": row.task, "step": row.step, "global_step": row.global_step, **values})
        log.info("budget check at task '%s' step %d: %s", row.task, row.step, self.describe(row))

    # -- the kept point -----------------------------------------------------------------------

    def _keeps_here(self, model: nn.Module) -> bool:
        """Whether this process holds kept weights: every process its rows when sharded, else the main one."""
        return self._main or is_sharded(model)

    def _keep(self, model: nn.Module, task: TaskInfo, point: KeptPoint) -> None:
        params = sharded_parameters(model)  # the shards, also while the recipe holds the gathered weights
        if is_sharded(model):
            weights = {n: p.detach().clone() for n, p in params.items()}  # sharded clones: this process's rows
        else:
            weights = {n: p.detach().to("cpu", copy=True) for n, p in params.items()} if self._main else {}
        if self.in_memory or is_sharded(model):  # sharded: in memory even when a resumed state said disk
            point.tensors = weights if self._keeps_here(model) else None
        else:
            point.file = f"kept-task{task.index:02d}-step{point.global_step:08d}.safetensors"
            if self._main:
                with atomic_file(self.run_dir / KEPT_DIR / point.file) as tmp:
                    save_tensors(weights, tmp)
            self.ctx.accelerator.wait_for_everyone()
        replaced = self.kept
        self.kept = point
        if replaced is not None and replaced.file and replaced.file != point.file:
            self.after_checkpoint()  # the one it replaces, unless a checkpoint needs it

    def _restore(self, model: nn.Module, point: KeptPoint) -> None:
        """The kept weights back on every process: its own rows when sharded (a point kept whole, by a
        run on one process, is cut to them), else the main process's copy broadcast to the others."""
        from safetensors.torch import load_file

        sharded = is_sharded(model)
        if sharded:
            for module in fsdp_modules(model):  # a gathered copy would hide the restored rows from the next forward
                module.reshard()
        if self._keeps_here(model):
            tensors = point.tensors if point.tensors is not None else load_file(str(self.run_dir / KEPT_DIR / str(point.file)))
            own = sharded_parameters(model)
            with torch.no_grad():
                for name, value in tensors.items():
                    target = own[name]
                    if is_dtensor(target) and not is_dtensor(value):
                        value = shard_like(value.to(local(target).device, target.dtype), target)
                    local(target).copy_(local(value).to(local(target).device, target.dtype))
        if self.ctx.accelerator.num_processes > 1 and not sharded:
            broadcast_trainable(model)

    def end_task(self, model: nn.Module, task: TaskInfo, end_step: int | None = None) -> BudgetTask:
        """The task's decision: keep the last model, or restore the kept point (rollback/stop over budget).

        ``end_step``: the task stopped early at that step (a stop decision, ``on_exhausted: stop``)."""
        stop, end_step = self._stop, task.steps if end_step is None else end_step
        last = self.checks[-1] if self.checks else None
        if last is None or last.task != task.name or last.step != end_step:
            last = self.check(model, task, end_step)
        start = time.perf_counter()
        kept, policy = self.kept, self.config.on_exhausted
        decision = BudgetTask(task=task.name, end_step=end_step, kept_step=end_step, within_budget=last.within_budget)
        if last.within_budget:
            decision.reason = f"the task ended within budget ({self.describe(last)})"
        elif policy == "warn":
            decision.reason = f"the task ended over budget ({self.describe(last)}); kept anyway (on_exhausted: warn)"
        elif kept is None or kept.step == end_step:
            decision.reason = f"the task ended over budget ({self.describe(last)}) and no earlier point was better"
        else:
            self._restore(model, kept)
            kept_row = next(r for r in reversed(self.checks) if r.task == task.name and r.step == kept.step)
            score = "" if kept.score is None else f", new-task score {kept.score:.4f}"
            why = (f"the best new-task score within budget ({self.describe(kept_row)}{score})" if kept.within
                   else f"no point was within budget; the least over it ({self.describe(kept_row)})")
            decision.kept_step, decision.rolled_back, decision.within_budget = kept.step, True, kept.within
            decision.reason = f"the task ended over budget ({self.describe(last)}); restored step {kept.step}: {why}"
        if stop is not None:
            self.stopped = str(stop)
        elif policy == "stop" and not last.within_budget:
            self.stopped = f"task '{task.name}' ended over budget ({self.describe(last)})"
        self.decisions.append(decision)
        if self._main:
            console_print(self.console, f"budget: task '{task.name}' keeps step {decision.kept_step} of {end_step}: {decision.reason}")
        self.kept = None
        self.seconds += time.perf_counter() - start
        return decision

    def record_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        """The trained tasks' subset scores after this task (what forgetting is measured from)."""
        start = time.perf_counter()
        trained = [t.name for t in self.ctx.tasks[: task.index + 1]]
        self._agreed(model, lambda: self.meter.record_task_end(model, self.ctx.tokenizer, trained))
        self.seconds += time.perf_counter() - start

    def stop_error(self) -> GateError:
        """What ends a run stopped by ``on_exhausted: stop`` (exit code 1)."""
        return self._stop or BudgetExhausted(
            f"budget: {self.stopped}; the run stopped (on_exhausted: stop) with the best in-budget point exported",
            hint="loosen the budget, lower train.lr, or use on_exhausted: rollback to go on with the kept point",
        )

    def kept_files(self) -> set[str]:
        return {self.kept.file} if self.kept is not None and self.kept.file else set()

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"budget_kept_files": sorted(self.kept_files())}

    def after_checkpoint(self) -> None:
        """Delete kept-weight files neither this run nor a checkpoint on disk refers to."""
        folder = self.run_dir / KEPT_DIR
        if not folder.is_dir() or not self._main:
            return
        referenced = referenced_kept_files(self.run_dir) | self.kept_files()
        for path in folder.glob("kept-*.safetensors"):
            if path.name not in referenced:
                path.unlink(missing_ok=True)

    # -- checkpoint and results ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        kept = None
        if self.kept is not None:
            kept = {**self.kept.meta(), **({"tensors": self.kept.tensors} if self.kept.tensors is not None else {})}
        return {
            "controller": self.controller.state_dict(),
            "checks": [r.model_dump() for r in self.checks],
            "decisions": [d.model_dump() for d in self.decisions],
            "kept": kept,
            "in_memory": self.in_memory,
            "seconds": self.seconds,
            "history": {k: list(v) for k, v in self.meter.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore, then apply the restored strengths (before the strategies load their own state)."""
        if state is None:
            return
        self.controller.load_state_dict(state["controller"])
        self.checks = [BudgetCheck.model_validate(r) for r in state.get("checks", [])]
        self.decisions = [BudgetTask.model_validate(d) for d in state.get("decisions", [])]
        kept = state.get("kept")
        self.kept = None if kept is None else KeptPoint(**kept)
        if self.kept is not None and not self._main and not self._sharded_run():
            self.kept.tensors = None  # data-parallel: the main process alone keeps the point (a rollback broadcasts it)
        self.in_memory = bool(state.get("in_memory", True))
        self.seconds = float(state.get("seconds", 0.0))
        self.meter.history = {k: [float(x) for x in v] for k, v in state.get("history", {}).items()}
        self.apply()
        self._report()

    def _sharded_run(self) -> bool:
        model = getattr(self.ctx, "model", None) if self.ctx is not None else None
        return model is not None and is_sharded(model)

    def _report(self) -> None:
        if self.report is not None:
            self.report(self.result())

    def result(self) -> BudgetResult:
        bounds = {k: v for k, v in asdict(self.bounds).items() if v is not None}
        return BudgetResult(
            mode=self.mode, bounds=bounds, on_exhausted=self.config.on_exhausted, check_every=self.config.check_every,
            probe_examples=self.config.probe_examples, start=dict(self.start_values),
            final=dict(self.controller.values), checks=list(self.checks), tasks=list(self.decisions),
            stopped=self.stopped, seconds=self.seconds,
        )


def referenced_kept_files(run_dir: Path) -> set[str]:
    """Kept-weight files the checkpoints in ``run_dir`` refer to (a resume from one of them needs its file)."""
    names: set[str] = set()
    for meta in (Path(run_dir) / "checkpoints").glob("step-*/meta.json"):
        try:
            names.update(json.loads(meta.read_text()).get("extra", {}).get("budget_kept_files", []))
        except (OSError, ValueError):
            continue
    return names
