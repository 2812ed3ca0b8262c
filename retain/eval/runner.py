"""Evaluation attached to a training run: the base model once, then after every task.

The observer scores every eval of the suite (every earlier task's and the general ones) at each model
state, measures drift from the base model, keeps before/after generations, and persists its records
next to the checkpoints so a resumed run keeps the rows it already measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from retain.eval.cache import cached_scores
from retain.eval.participant import GO_ON, Decision, Participant
from retain.eval.drift import (
    ProbeReference,
    compute_probe_reference,
    kl_from_reference,
    snapshot_weights,
    task_input_reference,
    weight_rel_l2,
)
from retain.eval.split import prompts_of
from retain.eval.suite import SuiteConfig, evaluate_task, load_suite, suite_hash
from retain.eval.tasks import SharedWork
from retain.eval.tasks.generate import generate_samples
from retain.io import append_jsonl, atomic_write_text
from retain.models.fingerprint import model_fingerprint
from retain.results.schema import BudgetResult, Drift, Results, Score, StepRecord, StrategyRun
from retain.results import bootstrap, metrics
from retain.results.summary import build_run, general_score


def perplexity_delta(base: dict[str, Score], scores: dict[str, Score]) -> float | None:
    """Perplexity change on the first general perplexity eval (positive: the model got worse)."""
    for key, score in base.items():
        if score.role == "general" and score.metric == "perplexity" and key in scores:
            return scores[key].value - score.value
    return None


def step_eval_due(ctx: Any, step: int) -> bool:
    """Whether ``eval.every_n_steps`` asks for a mid-task evaluation after ``step`` steps of the task."""
    every = ctx.config.eval.every_n_steps
    return bool(every) and step % every == 0


class SuiteObserver(Participant):
    """The run participant (``retain.eval.participant``) that produces the rows of results.json."""

    name = "suite"

    def __init__(
        self,
        suite: SuiteConfig,
        *,
        name: str,
        run_dir: Path,
        config: dict[str, Any] | None = None,
        batch_size: int = 16,
        cache_dir: Path | None = None,
        progress: bool = False,
        console: Console | None = None,
    ) -> None:
        self.suite = suite
        self.progress = progress
        self.console = console
        self.name = name
        self.run_dir = Path(run_dir)
        self.config = config or {}
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.records: dict[int, StepRecord] = {}
        self.reference: ProbeReference | None = None
        self.base_weights: dict[str, Any] = {}
        self.base_scores: dict[str, Score] = {}
        self.task_names: list[str] = []
        self.trainable_params: int | None = None
        self.budget: BudgetResult | None = None
        self.warnings: list[str] = []
        self.task_references: dict[str, ProbeReference] = {}

    @classmethod
    def from_config(cls, run_config: Any, console: Console | None = None) -> "SuiteObserver":
        suite = load_suite(run_config.eval.suite)
        return cls(
            suite,
            name="+".join(s.name for s in run_config.strategies),
            run_dir=Path(run_config.output.dir),
            config=run_config.model_dump(mode="json"),
            batch_size=run_config.eval.batch_size,
            progress=run_config.train.progress,
            console=console,
        )

    # -- scoring with a progress bar --------------------------------------------------------

    def evaluate(self, model: nn.Module, tokenizer: Any, label: str) -> dict[str, Score]:
        """``evaluate_suite``, one eval at a time under a progress bar (when enabled) naming the model state."""
        shared = SharedWork()
        scores: dict[str, Score] = {}
        tasks = self.suite.tasks
        bar = self._progress_bar()
        if bar is None:
            for task in tasks:
                scores.update(self._score(model, tokenizer, task, shared))
            return scores
        with bar:
            handle = bar.add_task(f"scoring {label}", total=len(tasks), current="")
            for task in tasks:
                bar.update(handle, current=task.name)
                scores.update(self._score(model, tokenizer, task, shared))
                bar.advance(handle)
            bar.update(handle, current="done")
        return scores

    def _score(self, model: nn.Module, tokenizer: Any, task: Any, shared: SharedWork) -> dict[str, Score]:
        """One eval's report part, with its select value beside it (one pass over every item)."""
        return evaluate_task(model, tokenizer, task, self.batch_size, shared, part="both", split=self.suite.split)

    def _progress_bar(self) -> Progress | None:
        if not self.progress or not self.suite.tasks:
            return None
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[current]}"),
            TimeElapsedColumn(), console=self.console, transient=False,
        )

    # -- persistence ------------------------------------------------------------------------

    @property
    def records_path(self) -> Path:
        return self.run_dir / "eval_records.json"

    def _load_records(self) -> None:
        """The rows a run already measured (a resumed run keeps them); read when the run starts, after the
        run folder's rules were applied (``--overwrite`` may have emptied it)."""
        self.records = {}
        if self.records_path.is_file():
            for row in json.loads(self.records_path.read_text()):
                record = StepRecord.model_validate(row)
                self.records[record.index] = record

    def _save_records(self) -> None:
        rows = [json.loads(r.model_dump_json()) for r in sorted(self.records.values(), key=lambda r: r.index)]
        atomic_write_text(self.records_path, json.dumps(rows, indent=1))

    # -- hooks ------------------------------------------------------------------------------

    def on_start(self, model: nn.Module, ctx: Any) -> None:
        """Called with the untouched base model, before any strategy wraps it (also on resume)."""
        self._load_records()
        self.task_names = [t.name for t in ctx.tasks]
        tokenizer = ctx.tokenizer
        fingerprint = model_fingerprint(model, tokenizer)
        self.base_scores = cached_scores(
            self.cache_dir,
            fingerprint,
            suite_hash(self.suite),
            lambda: self.evaluate(model, tokenizer, "the base model"),
        )
        if self.suite.probe_prompts:
            self.reference = compute_probe_reference(
                model, tokenizer, prompts_of(self.suite.probe_prompts, "report", self.suite.split),
                self.suite.probe_max_length, self.suite.probe_top_k,
            )
        self.base_weights = snapshot_weights(model)
        self.task_references = {  # each task's own inputs: where RL's Razor measures forgetting
            t.name: task_input_reference(model, t.train_examples, self.suite.probe_max_length, top_k=self.suite.probe_top_k)
            for t in ctx.tasks if t.train_examples
        }
        if 0 not in self.records:
            samples = generate_samples(model, tokenizer, self.suite.sample_prompts, self.suite.sample_max_new_tokens)
            self.records[0] = StepRecord(index=0, scores=self.base_scores, samples=samples)
            self._save_records()

    def on_step_end(self, model: nn.Module, ctx: Any, task: Any, step: int, *, stopping: bool) -> Decision:
        """Every ``eval.every_n_steps`` steps (not when the run is stopping): mid-task scores go to the
        trackers and ``step_evals.jsonl`` (the matrix uses task ends)."""
        if step_eval_due(ctx, step) and not stopping:
            self.score_step(ctx, task)
        return GO_ON

    def score_step(self, ctx: Any, task: Any) -> None:
        unwrapped = ctx.unwrapped_model
        scores = self.evaluate(unwrapped, ctx.tokenizer, f"{task.name} at global step {ctx.global_step}")
        row = {"task": task.name, "global_step": ctx.global_step, **{k: s.value for k, s in scores.items()}}
        ctx.accelerator.log({f"eval/{k}": s.value for k, s in scores.items()}, step=ctx.global_step)
        append_jsonl(self.run_dir / "step_evals.jsonl", row)
        unwrapped.train()

    def on_task_end(self, model: nn.Module, ctx: Any, task: Any, stats: Any) -> Decision:
        unwrapped = ctx.unwrapped_model
        tokenizer = ctx.tokenizer
        scores = self.evaluate(unwrapped, tokenizer, f"after task '{task.name}'")
        drift = Drift(
            kl_from_base=kl_from_reference(self.reference, unwrapped) if self.reference is not None else None,
            ppl_delta=perplexity_delta(self.base_scores, scores),
            weight_rel_l2=weight_rel_l2(self.base_weights, unwrapped) if self.base_weights else None,
            task_kl=kl_from_reference(self.task_references[task.name], unwrapped) if task.name in self.task_references else None,
        )
        samples = generate_samples(unwrapped, tokenizer, self.suite.sample_prompts, self.suite.sample_max_new_tokens)
        self.trainable_params = stats.trainable_params or self.trainable_params  # counted before after_task froze any
        self.records[task.index + 1] = StepRecord(
            index=task.index + 1,
            task=task.name,
            global_step=ctx.global_step,
            scores=scores,
            drift=drift,
            train_loss=stats.last_loss,
            seconds=stats.seconds,
            seconds_per_step=stats.seconds_per_step,
            peak_memory_bytes=getattr(stats, "peak_memory", None),
            samples=samples,
        )
        self._save_records()
        unwrapped.train()
        return GO_ON

    def on_run_end(self, outcome: Any) -> None:
        """results.json beside the run (also for a run a participant stopped: its kept point is what was exported)."""
        self.write_results(outcome)

    # -- results ----------------------------------------------------------------------------

    def record_warnings(self, warnings: list[str]) -> None:
        """What the run was allowed to do against a rule (``--allow-overlap``); kept in results.json."""
        self.warnings += [w for w in warnings if w not in self.warnings]

    def set_budget(self, budget: BudgetResult | None) -> None:
        """The run's forgetting budget so far (trajectory, kept points); it goes into results.json."""
        self.budget = budget

    def strategy_run(self) -> StrategyRun:
        run = build_run(self.name, self.task_names, list(self.records.values()), self.config, self.trainable_params)
        run.budget = self.budget.model_copy(deep=True) if self.budget is not None else None
        run.warnings = list(self.warnings)
        if run.budget is not None:
            self._report_kept(run)
        return run

    def _report_kept(self, run: StrategyRun) -> None:
        """Each budget decision chose its model on the select part; say what that model keeps on the
        report part (the task-end record, scored after any rollback), with its interval."""
        assert run.budget is not None
        base = self.records.get(0)
        index = {name: i + 1 for i, name in enumerate(self.task_names)}
        for decision in run.budget.tasks:
            record = self.records.get(index.get(decision.task, -1))
            if base is None or record is None:
                continue
            found = bootstrap.interval(
                metrics.general_retention(general_score(base), general_score(record)),
                bootstrap.retention_replicates(base, record, bootstrap.Draws()),
            )
            if found is not None:
                decision.report_general_retention, decision.report_interval = found.value, found.as_list()

    def results(self, scenario: str | None = None) -> Results:
        base_model = str(self.config.get("model", {}).get("name_or_path", ""))
        return Results(scenario=scenario, base_model=base_model, runs=[self.strategy_run()])

    def write_results(self, outcome: Any = None, scenario: str | None = None) -> Path:
        path = self.run_dir / "results.json"
        self.results(scenario).save(path)
        return path
