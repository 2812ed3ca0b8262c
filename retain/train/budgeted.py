"""A forgetting budget inside a run: measure every ``check_every`` steps, move the strengths, keep the best
in-budget point of each task, and roll back to it when a task ends over budget.

What happens, per task::

    start      measure the model as the task starts (a candidate: it learned nothing of the task yet)
    each check measure (``retain.eval.budget``), let the controller move every declared strength
               (``retain.train.budget``), apply them (``Strategy.set_strength``), and remember the point
               if it is within budget with the best new-task score so far
    end        measure again if the last step was not a check; over budget -> ``on_exhausted``:
               rollback/stop restore the kept point before ``after_task``, the task-end evaluation and
               the exports; stop then ends the run; warn keeps the last model and says so

The kept point is the trainable weights only (nothing else moves within a task: the one strategy that
changes frozen weights, ewc-lora, merges in ``after_task``, which runs after the rollback). They stay
in memory when they are a small share of the model (adapters, prompts, a few unfrozen blocks) and go
to ``<run_dir>/budget/`` otherwise (full fine-tuning), written atomically. Strategy state that
accumulates along the path (path integrals, replay counters) is not rolled back.

Everything here is in the checkpoint (``state_dict``), the kept weights of the memory case included, so
a resumed run takes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retain.config import BudgetConfig
from retain.data.sampling import seeded_subset
from retain.errors import GateError
from retain.eval.budget import BudgetMeter, Probe
from retain.io import append_jsonl, atomic_file
from retain.models.runtime import eval_mode
from retain.results.schema import BudgetCheck, BudgetResult, BudgetTask
from retain.strategies import Strategy, TaskInfo
from retain.train.budget import (
    Bounds,
    BudgetController,
    Measurement,
    StrengthState,
    next_check_step,
    worst_violation,
)
from retain.train.checkpoint import save_tensors

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


def trainable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def mean_task_loss(model: nn.Module, examples: list, collate: Any, device: torch.device, batch_size: int) -> float:
    """Token-weighted mean loss on ``examples``: the new-task score's fallback (negated) when the suite has no eval
    for the task."""
    total, tokens = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * n
            tokens += n
    return total / tokens if tokens else float("nan")


class BudgetRuntime:
    """The budget of one run: controller, measurements, the kept point and the per-task decisions."""

    def __init__(
        self,
        config: BudgetConfig,
        strategies: list[Strategy],
        meter: BudgetMeter,
        *,
        run_dir: Path,
        ctx: Any,
        console: Any = None,
    ) -> None:
        self.config = config
        self.meter = meter
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        self.console = console
        self.strategies = {s.name: s for s in strategies}
        strengths = [
            StrengthState(s.name, s.strength.key, s.strength.clip(getattr(s.config, s.strength.key)), s.strength.low,
                          s.strength.high, s.strength.protects_more_when_higher)
            for s in strategies
            if s.strength is not None and config.adapt
        ]
        self.bounds = Bounds(config.min_general_retention, config.max_kl, config.max_task_forgetting)
        self.controller = BudgetController(
            self.bounds, strengths, eta=1.0, max_step=config.max_step * math.log(10.0), margin=config.margin
        )
        self.start_values = {s.label: s.value for s in strengths}
        self.checks: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []
        self.kept: KeptPoint | None = None
        self.in_memory = True
        self.seconds = 0.0
        self.stopped: str | None = None
        self._stop: GateError | None = None
        self.apply()

    # -- strengths ----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "adaptive" if self.controller.strengths else "rollback baseline"

    def apply(self) -> None:
        """Hand each strategy its current strength (only where it changed)."""
        for state in self.controller.strengths:
            strategy = self.strategies[state.strategy]
            if getattr(strategy.config, state.key) != state.value:
                strategy.set_strength(state.value)

    # -- measuring ----------------------------------------------------------------------------

    def _probe(self, model: nn.Module, task: TaskInfo) -> Probe:
        earlier = [t.name for t in self.ctx.tasks[: task.index]]
        probe = self.meter.measure(model, self.ctx.tokenizer, task.name, earlier)
        if probe.task_score is None:  # no eval of this task in the suite: held-out (or a fixed subset of) its data
            examples = task.data.validation or task.train_examples
            subset = seeded_subset(examples, self.meter.probe_examples, self.ctx.config.train.seed)
            probe.task_score = -mean_task_loss(model, subset, self.ctx.collate, self.ctx.device, self.meter.batch_size)
        return probe

    def check(self, model: nn.Module, task: TaskInfo, step: int, *, update: bool = True) -> dict[str, Any]:
        """Measure, move the strengths (``update``), remember the point if it is the best so far; one trajectory row."""
        start = time.perf_counter()
        probe = self._probe(model, task)
        measured = Measurement(probe.general_retention, probe.kl, probe.task_forgetting)
        global_step = self.ctx.global_step
        if update:
            upcoming = next_check_step(step, self.config.check_every, self.config.early_checks, task.steps)
            worst = self.controller.update(measured, global_step, global_step + upcoming - step if step < task.steps else None)
            self.apply()
        else:
            worst = worst_violation(measured, self.bounds)
        within = worst is None or worst <= 0.0
        row = BudgetCheck(
            task=task.name, step=step, global_step=global_step, general_retention=probe.general_retention, kl=probe.kl,
            task_forgetting=probe.task_forgetting, new_task_score=probe.task_score, violation=worst, within_budget=within,
            strengths={s.label: s.value for s in self.controller.strengths},
        ).model_dump()
        self.checks.append(row)
        candidate = KeptPoint(step, global_step, probe.task_score, within, worst)
        if candidate.better_than(self.kept):
            self._keep(model, task, candidate)
        self._log(row)
        self.seconds += time.perf_counter() - start
        if not within:
            self._over_budget(row, task)
        return row

    def _over_budget(self, row: dict[str, Any], task: TaskInfo) -> None:
        what = self.describe(row)
        if self.config.on_exhausted == "warn":
            _print(self.console, f"budget: over at task '{task.name}' step {row['step']} ({what}); going on (on_exhausted: warn)")
        elif self.config.on_exhausted == "stop" and all(s.at_protective_limit for s in self.controller.strengths):
            limits = ", ".join(f"{s.label}={s.value:.3g}" for s in self.controller.strengths) or "no adaptable strength"
            raise BudgetExhausted(
                f"budget exhausted at task '{task.name}' step {row['step']}: {what}, with every strength at its most "
                f"protective limit ({limits})",
                hint="loosen the budget, lower train.lr, or add a protective strategy; the best in-budget point was kept",
            )

    def describe(self, row: dict[str, Any]) -> str:
        """The measured bounded quantities against their bounds, in words."""
        parts = []
        if self.bounds.min_general_retention is not None and row.get("general_retention") is not None:
            parts.append(f"general retention {row['general_retention']:.4f} (floor {self.bounds.min_general_retention:g})")
        if self.bounds.max_kl is not None and row.get("kl") is not None:
            parts.append(f"KL {row['kl']:.4g} (ceiling {self.bounds.max_kl:g})")
        if self.bounds.max_task_forgetting is not None and row.get("task_forgetting") is not None:
            parts.append(f"forgetting {row['task_forgetting']:.4f} (ceiling {self.bounds.max_task_forgetting:g})")
        return ", ".join(parts) or "nothing budgeted was measurable"

    def _log(self, row: dict[str, Any]) -> None:
        values = {
            f"budget/{key}": float(row[key])
            for key in ("general_retention", "kl", "task_forgetting", "new_task_score", "violation")
            if row[key] is not None
        }
        values["budget/within"] = float(row["within_budget"])
        values.update({f"budget/{k}": v for k, v in row["strengths"].items()})
        accelerator = self.ctx.accelerator
        accelerator.log({f"{row['task']}/{k}": v for k, v in values.items()}, step=row["global_step"])
        if accelerator.is_main_process:
            append_jsonl(self.run_dir / "train_log.jsonl",
                         {"task": row["task"], "step": row["step"], "global_step": row["global_step"], **values})
        log.info("budget check at task '%s' step %d: %s", row["task"], row["step"], self.describe(row))

    # -- the kept point -----------------------------------------------------------------------

    def start_task(self, model: nn.Module, task: TaskInfo) -> None:
        """The task's first candidate: the model as the task starts (no strength moves on it)."""
        trainable = trainable_weights(model)
        total = sum(p.numel() for p in model.parameters())
        self.in_memory = sum(p.numel() for p in trainable.values()) <= IN_MEMORY_SHARE * max(total, 1)
        self.kept = None
        self.controller.new_task()
        self.check(model, task, 0, update=False)

    def _keep(self, model: nn.Module, task: TaskInfo, point: KeptPoint) -> None:
        weights = {n: p.detach().to("cpu", copy=True) for n, p in trainable_weights(model).items()}
        if self.in_memory:
            point.tensors = weights
        else:
            point.file = f"kept-task{task.index:02d}-step{point.global_step:08d}.safetensors"
            if self.ctx.accelerator.is_main_process:
                with atomic_file(self.run_dir / KEPT_DIR / point.file) as tmp:
                    save_tensors(weights, tmp)
            self.ctx.accelerator.wait_for_everyone()
        replaced = self.kept
        self.kept = point
        if replaced is not None and replaced.file and replaced.file != point.file:
            self.prune(referenced_kept_files(self.run_dir))  # the one it replaces, unless a checkpoint needs it

    def _restore(self, model: nn.Module, point: KeptPoint) -> None:
        from safetensors.torch import load_file

        tensors = point.tensors if point.tensors is not None else load_file(str(self.run_dir / KEPT_DIR / str(point.file)))
        own = trainable_weights(model)
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))

    def end_task(self, model: nn.Module, task: TaskInfo, end_step: int | None = None,
                 stop: GateError | None = None) -> dict[str, Any]:
        """The task's decision: keep the last model, or restore the kept point (rollback/stop over budget).

        ``end_step``/``stop``: the task stopped early at that step with that error (on_exhausted: stop)."""
        end_step = task.steps if end_step is None else end_step
        last = self.checks[-1] if self.checks else None
        if last is None or last["task"] != task.name or last["step"] != end_step:
            last = self.check(model, task, end_step)
        start = time.perf_counter()
        kept, policy = self.kept, self.config.on_exhausted
        decision = {"task": task.name, "end_step": end_step, "kept_step": end_step, "rolled_back": False,
                    "within_budget": last["within_budget"]}
        if last["within_budget"]:
            decision["reason"] = f"the task ended within budget ({self.describe(last)})"
        elif policy == "warn":
            decision["reason"] = f"the task ended over budget ({self.describe(last)}); kept anyway (on_exhausted: warn)"
        elif kept is None or kept.step == end_step:
            decision["reason"] = f"the task ended over budget ({self.describe(last)}) and no earlier point was better"
        else:
            self._restore(model, kept)
            kept_row = next(r for r in reversed(self.checks) if r["task"] == task.name and r["step"] == kept.step)
            score = "" if kept.score is None else f", new-task score {kept.score:.4f}"
            why = (f"the best new-task score within budget ({self.describe(kept_row)}{score})" if kept.within
                   else f"no point was within budget; the least over it ({self.describe(kept_row)})")
            decision.update(kept_step=kept.step, rolled_back=True, within_budget=kept.within,
                            reason=f"the task ended over budget ({self.describe(last)}); restored step {kept.step}: {why}")
            _print(self.console, f"budget: task '{task.name}' {decision['reason']}")
        if stop is not None:
            self.stopped, self._stop = str(stop), stop
        elif policy == "stop" and not last["within_budget"]:
            self.stopped = f"task '{task.name}' ended over budget ({self.describe(last)})"
        self.decisions.append(decision)
        self.kept = None
        self.seconds += time.perf_counter() - start
        return decision

    def record_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        """The trained tasks' subset scores after this task (what forgetting is measured from)."""
        start = time.perf_counter()
        self.meter.record_task_end(model, self.ctx.tokenizer, [t.name for t in self.ctx.tasks[: task.index + 1]])
        self.seconds += time.perf_counter() - start

    def stop_error(self) -> GateError:
        """What ends a run stopped by ``on_exhausted: stop`` (exit code 1)."""
        return self._stop or BudgetExhausted(
            f"budget: {self.stopped}; the run stopped (on_exhausted: stop) with the best in-budget point exported",
            hint="loosen the budget, lower train.lr, or use on_exhausted: rollback to go on with the kept point",
        )

    def kept_files(self) -> set[str]:
        return {self.kept.file} if self.kept is not None and self.kept.file else set()

    def prune(self, referenced: set[str]) -> None:
        """Delete kept-weight files neither this run nor a checkpoint on disk refers to."""
        folder = self.run_dir / KEPT_DIR
        if not folder.is_dir() or not self.ctx.accelerator.is_main_process:
            return
        for path in folder.glob("kept-*.safetensors"):
            if path.name not in referenced | self.kept_files():
                path.unlink(missing_ok=True)

    # -- checkpoint and results ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        kept = None
        if self.kept is not None:
            kept = {**self.kept.meta(), **({"tensors": self.kept.tensors} if self.kept.tensors is not None else {})}
        return {
            "controller": self.controller.state_dict(),
            "checks": [dict(r) for r in self.checks],
            "decisions": [dict(d) for d in self.decisions],
            "kept": kept,
            "in_memory": self.in_memory,
            "seconds": self.seconds,
            "history": {k: list(v) for k, v in self.meter.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore, then apply the restored strengths (before the strategies load their own state)."""
        self.controller.load_state_dict(state["controller"])
        self.checks = [dict(r) for r in state.get("checks", [])]
        self.decisions = [dict(d) for d in state.get("decisions", [])]
        kept = state.get("kept")
        self.kept = None if kept is None else KeptPoint(**kept)
        self.in_memory = bool(state.get("in_memory", True))
        self.seconds = float(state.get("seconds", 0.0))
        self.meter.history = {k: [float(x) for x in v] for k, v in state.get("history", {}).items()}
        self.apply()

    def result(self) -> BudgetResult:
        bounds = {k: v for k, v in asdict(self.bounds).items() if v is not None}
        return BudgetResult(
            mode=self.mode, bounds=bounds, on_exhausted=self.config.on_exhausted, check_every=self.config.check_every,
            probe_examples=self.config.probe_examples, start=dict(self.start_values),
            final={s.label: s.value for s in self.controller.strengths},
            checks=[BudgetCheck.model_validate(r) for r in self.checks],
            tasks=[BudgetTask.model_validate(d) for d in self.decisions], stopped=self.stopped, seconds=self.seconds,
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


def _print(console: Any, message: str) -> None:
    if console is not None:
        console.print(message, markup=False, highlight=False)
    else:
        log.warning("%s", message)
