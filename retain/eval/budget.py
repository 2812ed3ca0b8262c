"""What a forgetting budget measures between task ends: a fixed, seeded subset of the eval suite.

The full suite runs at the base model and after every task (``retain.eval.runner``). A budgeted run
also needs the budgeted quantities every ``budget.check_every`` steps, so it measures them on a
subset that stays the same all run: the **select** part of every eval (``retain.eval.split``), at most
``probe_examples`` windows or records of it, and the select probe prompts. What it chooses (strengths,
the kept point) is then reported on the report part, which it never reads. Those are the suite's
held-out texts, never what a strategy trains, replays or anchors on.

- general retention: mean bounded general score on the subset / the base model's on the same subset
  (the rule of ``results.json``, ``retain.results.summary.general_score``);
- KL(base || model) on the probe prompts (nats/token);
- task forgetting (Chaudhry 2018): per earlier task, the best subset score it had at any task end
  since it was learned minus its score now, averaged over the earlier tasks that have an eval;
- the new-task score the kept point maximizes: the current task's primary score on the subset (the
  first bounded ``role: task`` eval naming it, as R uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from retain.data.tokenize import count_scored_tokens
from retain.eval.drift import ProbeReference, compute_probe_reference, kl_from_reference, task_input_reference
from retain.eval.split import prompts_of
from retain.eval.suite import SuiteConfig, evaluate_task
from retain.eval.tasks import EvalTaskConfig, SharedWork
from retain.models.runtime import eval_mode
from retain.results import bootstrap
from retain.results.schema import Score, StepRecord
from retain.results.summary import general_score, primary_task_score

#: Eval types whose scores are never bounded (they cannot give a retention).
UNBOUNDED_TYPES = frozenset({"loss"})


def budget_problems(budget: Any, suite: SuiteConfig | None, task_names: Sequence[str], suite_key: str) -> list[str]:
    """What the suite lacks for the bounds of ``budget`` (a ``BudgetConfig``), one message each, naming
    the missing piece; ``suite_key`` says where the suite comes from (``eval.suite``, the scenario)."""
    if suite is None:
        return [f"budget: needs an eval suite to measure on; set {suite_key} (general evals for min_general_retention, "
                "probe_prompts for max_kl, earlier tasks' evals for max_task_forgetting)"]
    problems = []
    general = [t for t in suite.tasks if t.role == "general" and t.type not in UNBOUNDED_TYPES]
    if budget.min_general_retention is not None and not general:
        problems.append(
            f"budget.min_general_retention: {suite_key} has no bounded general eval (role: general, a type other than "
            "loss, e.g. next_token_accuracy) to measure retention on"
        )
    if budget.max_kl is not None and not suite.probe_prompts:
        problems.append(f"budget.max_kl: {suite_key} has no probe_prompts to measure KL(base || model) on")
    if budget.max_task_forgetting is not None:
        earlier = {t.train_task for t in suite.tasks if t.role == "task"} & set(task_names[:-1])
        if len(task_names) < 2:
            problems.append("budget.max_task_forgetting: needs two or more tasks (forgetting is of earlier tasks)")
        elif not earlier:
            problems.append(
                f"budget.max_task_forgetting: {suite_key} has no eval (role: task, train_task: ...) of a task before the "
                f"last ({', '.join(task_names[:-1])})"
            )
    return problems


def capped(task: EvalTaskConfig, examples: int) -> EvalTaskConfig:
    """An eval without a select part (lm-eval) on at most ``examples`` of its documents. Evals with items
    are capped inside their select part instead (``evaluate_task(limit=...)``), so the probe never reads
    a report item."""
    if task.splits:
        return task
    for key in ("max_examples", "limit"):
        if key in type(task).model_fields:
            current = getattr(task, key)
            return task.model_copy(update={key: examples if current is None else min(current, examples)})
    return task


class KeptInputs(SharedWork):
    """``SharedWork`` across measurements: what does not depend on the model (records read from disk,
    tokenized windows: keys starting with ``"records"`` or ``"inputs"``) is kept; scores are forgotten,
    so each measurement scores its own model state."""

    MODEL_FREE = ("records", "inputs")

    def fresh(self) -> "KeptInputs":
        """For the next model state: the model-free entries only."""
        self._values = {k: v for k, v in self._values.items() if isinstance(k, tuple) and k and k[0] in self.MODEL_FREE}
        return self


@dataclass
class Measurement:
    """What one budget check measured; None where a quantity is not budgeted or not measurable (yet).

    The same record feeds the controller (the bounded quantities), the kept point (``task_score``) and
    the trajectory row of results.json.
    """

    general_retention: float | None = None
    kl: float | None = None
    task_forgetting: float | None = None
    task_score: float | None = None
    general_retention_se: float | None = None  # its bootstrap standard error over the probe's windows
    task_kl: float | None = None  # KL(base || model) on the current task's own inputs (RL's Razor)


@dataclass
class BudgetMeter:
    """Measures the budgeted quantities on the fixed subset; holds the base model's side of each."""

    suite: SuiteConfig
    probe_examples: int
    batch_size: int = 16
    measure_retention: bool = True
    measure_kl: bool = False
    measure_forgetting: bool = False
    measure_task_kl: bool = False
    general: list[EvalTaskConfig] = field(init=False)
    by_task: dict[str, list[EvalTaskConfig]] = field(init=False)
    base_general: float | None = field(init=False, default=None)
    base_record: StepRecord | None = field(init=False, default=None)  # its general scores, item by item
    reference: ProbeReference | None = field(init=False, default=None)
    task_references: dict[str, ProbeReference] = field(init=False, default_factory=dict)
    #: task -> its subset scores at each task end since it was learned (forgetting's maximum runs over them)
    history: dict[str, list[float]] = field(init=False, default_factory=dict)
    inputs: KeptInputs = field(init=False, default_factory=KeptInputs)

    def __post_init__(self) -> None:
        tasks = [capped(t, self.probe_examples) for t in self.suite.tasks]
        self.general = [t for t in tasks if t.role == "general"]
        self.by_task = {}
        for task in tasks:
            if task.role == "task" and task.train_task:
                self.by_task.setdefault(task.train_task, []).append(task)

    def start(self, model: nn.Module, tokenizer: Any, tasks: Sequence[Any] = ()) -> None:
        """The base model's side: its general score on the subset, its probe log-probabilities and (for
        ``max_task_kl``) its log-probabilities on each task's own inputs (``tasks``: the run's TaskInfos)."""
        if self.measure_task_kl:
            self.task_references = {
                t.name: task_input_reference(model, t.train_examples, self.suite.probe_max_length, self.probe_examples,
                                             self.suite.probe_top_k)
                for t in tasks if t.train_examples
            }
        if self.measure_retention:
            self.base_record = StepRecord(index=0, scores=self._scores(model, tokenizer, self.general))
            self.base_general = general_score(self.base_record)
        if self.measure_kl and self.suite.probe_prompts:
            prompts = prompts_of(self.suite.probe_prompts, "select", self.suite.split)[: self.probe_examples]
            self.reference = compute_probe_reference(
                model, tokenizer, prompts, self.suite.probe_max_length, self.suite.probe_top_k
            )

    def _scores(self, model: nn.Module, tokenizer: Any, tasks: list[EvalTaskConfig],
                shared: SharedWork | None = None) -> dict[str, Score]:
        shared = shared or self.inputs.fresh()
        scores: dict[str, Score] = {}
        for task in tasks:
            scores.update(evaluate_task(model, tokenizer, task, self.batch_size, shared, part="select",
                                        split=self.suite.split, limit=self.probe_examples))
        return scores

    def task_score(self, model: nn.Module, tokenizer: Any, task: str, shared: SharedWork | None = None) -> float | None:
        """``task``'s primary score on the subset: its evals in suite order, up to the first bounded one."""
        shared = shared or self.inputs.fresh()
        scores: dict[str, Score] = {}
        for each in self.by_task.get(task, []):
            scores.update(evaluate_task(model, tokenizer, each, self.batch_size, shared, part="select",
                                        split=self.suite.split, limit=self.probe_examples))
            found = primary_task_score(StepRecord(index=0, scores=scores), task)
            if found is not None:
                return found
        return None

    def measure(self, model: nn.Module, tokenizer: Any, task: str, earlier: Sequence[str]) -> Measurement:
        """Everything budgeted, at the model's current state (``earlier``: the tasks trained before ``task``)."""
        shared = self.inputs.fresh()
        probe = Measurement()
        if self.measure_retention and self.base_general:
            record = StepRecord(index=1, scores=self._scores(model, tokenizer, self.general, shared))
            now = general_score(record)
            probe.general_retention = None if now is None else now / self.base_general
            probe.general_retention_se = self._retention_se(record)
        if self.reference is not None:
            probe.kl = kl_from_reference(self.reference, model)
        if task in self.task_references:
            probe.task_kl = kl_from_reference(self.task_references[task], model)
        if self.measure_forgetting:
            probe.task_forgetting = self._forgetting(model, tokenizer, earlier, shared)
        probe.task_score = self.task_score(model, tokenizer, task, shared)
        return probe

    def _retention_se(self, record: StepRecord) -> float | None:
        """The bootstrap standard error of the retention just measured, over the probe's items (paired
        with the base model's): the budget's controller does not react to a change within twice it."""
        if self.base_record is None:
            return None
        replicates = bootstrap.retention_replicates(self.base_record, record, bootstrap.Draws(replicates=400))
        if replicates is None:
            return None
        finite = replicates[np.isfinite(replicates)]
        return float(finite.std(ddof=1)) if finite.size > 1 else None

    def _forgetting(self, model: nn.Module, tokenizer: Any, earlier: Sequence[str], shared: SharedWork) -> float | None:
        drops = []
        for name in earlier:
            best = max(self.history.get(name, []), default=None)
            now = self.task_score(model, tokenizer, name, shared) if best is not None else None
            if best is not None and now is not None:
                drops.append(best - now)
        return sum(drops) / len(drops) if drops else None

    def record_task_end(self, model: nn.Module, tokenizer: Any, trained: Sequence[str]) -> None:
        """After a task: each trained task's subset score, the points forgetting is measured from."""
        if not self.measure_forgetting:
            return
        shared = self.inputs.fresh()
        for name in trained:
            score = self.task_score(model, tokenizer, name, shared)
            if score is not None:
                self.history.setdefault(name, []).append(score)


def mean_task_loss(model: nn.Module, examples: list, collate: Any, device: torch.device, batch_size: int) -> float:
    """Token-weighted mean loss on ``examples``: the new-task score's fallback (negated) when the suite has
    no eval for the task."""
    total, tokens = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            n = int(count_scored_tokens(batch["labels"]))
            total += float(out.loss) * n
            tokens += n
    return total / tokens if tokens else float("nan")
