"""FLOW, Fine-tuning with pre-trained Loss-Oriented Weighting (Sanyal et al., ICML 2025, arXiv 2502.02797;
authors' code ``sanyalsunny111/FLOW_finetuning``): upweight the training examples the base model already
finds easy, and downweight the hard ones, so the fine-tune moves the model less.

Per training example i, with L_i the base model's mean cross-entropy over its scored (completion) tokens::

    tau = median_i L_i                      (the authors' "temperature": get_dataset_temperature.py)
    w_i = exp(-L_i / tau)                   (create_weighted_dataset.py, loss_type "sequence")
    L(theta) = sum_i w_i * sum_t CE_it(theta) / (scored tokens of the batch)   (WeightedLossTrainer)

The weights are not renormalised (the median example weighs 1/e), as in the authors' trainer: the
normaliser is the unweighted token count. ``tau_scale`` multiplies tau (1: the authors'); a smaller tau
tilts the weights harder towards easy examples.

How the weights reach the loop's token-mean loss without changing it: the loop's task loss is
``sum_t CE_t / N`` over the N scored tokens of the optimizer step (every micro-batch and process);
this strategy adds the term

    sum over the step's scored tokens of (w_row - 1) * CE_t / N

so task loss + term = sum_t w_row CE_t / N, FLOW's loss, and its gradient. Each micro-batch's term is
its share (times the micro-batches x processes the loop averages terms over); N is counted as the
step's batches are built (``transform_batch`` sees every micro-batch of the step, every process's rows,
before the first forward), so FLOW must come after every strategy that transforms batches (stm's masks
and replay's rows change what is scored). Rows that are not the task's training examples (replayed
rows) keep weight 1. The term costs one more cross-entropy over the logits the task forward made.

The base model's per-token CEs are STM's cached base pass (:func:`retain.strategies.stm.token_ce_table`,
the same ``<cache_dir>/stm/`` file, so ``stm`` and ``flow`` on the same base and data compute it once):
every task's training data, with the model as loaded, at the first task's start. The weights are part of
the checkpoint. The authors' per-token variant (``loss_type: token``) is not implemented.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from retain.config import RunConfig
from retain.data import IGNORE_INDEX, count_scored_tokens
from retain.data.identity import batch_rows, example_key, examples_hash
from retain.models.fingerprint import base_fingerprint
from retain.models.runtime import align_to_inputs
from retain.stats.token_tables import TokenTable, cache_file, cached_table
from retain.strategies.base import Batch, Strategy, StrategyConfig, StrategyContext, Strength, TaskInfo
from retain.strategies.registry import get_strategy_class, register_strategy
from retain.strategies.stm import token_ce_table

logger = logging.getLogger("retain")

#: Batch field added by ``flow``: ``(rows, seq)``, each row's weight w_i on every position (1 for rows that
#: are not training examples of the task). Per token so the loop slices it with the batch's columns.
SAMPLE_WEIGHT = "sample_weight"


class FlowConfig(StrategyConfig):
    tau_scale: float = Field(
        1.0, gt=0.0, description="tau = tau_scale x the median base loss (1: the authors'); smaller upweights easy "
        "examples harder."
    )
    batch_size: int = Field(16, gt=0, description="Examples per forward batch of the base-model pass.")
    cache: bool = Field(True, description="Store/reuse the base model's per-token CEs (STM's cache, <cache_dir>/stm).")


def example_losses(examples: list, table: TokenTable) -> torch.Tensor:
    """L_i: each example's mean base-model CE over its scored tokens (labels != -100, never position 0);
    NaN for an example without one."""
    out = torch.empty(len(examples), dtype=torch.float64)
    for index, example in enumerate(examples):
        ce = table.example(index, "ce").double()
        scored = torch.tensor(example.labels) != IGNORE_INDEX
        scored[0] = False
        out[index] = ce[scored].mean() if scored.any() else float("nan")
    return out


def flow_weights(losses: torch.Tensor, tau_scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """(w_i = exp(-L_i / tau), tau) with tau = tau_scale x the median of the finite L_i; examples without a
    scored token weigh 0 (they add nothing to the loss either way), as the authors' NaN -> 0."""
    finite = losses[torch.isfinite(losses)]
    if finite.numel() == 0:
        return torch.zeros_like(losses, dtype=torch.float32), 1.0
    # the median of an even count: the mean of the two middle values (numpy's, which the authors use)
    ordered = finite.sort().values
    n = ordered.numel()
    median = float(ordered[n // 2]) if n % 2 else float((ordered[n // 2 - 1] + ordered[n // 2]) / 2)
    tau = tau_scale * median if median > 0 else tau_scale
    weights = torch.exp(-losses / tau)
    return torch.nan_to_num(weights, nan=0.0).to(torch.float32), tau


def weighted_token_terms(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over scored tokens of (w - 1) * CE: what turns the plain token-loss sum into the weighted one."""
    if labels.shape[1] < 2:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                         reduction="none")  # 0 where the label is ignored
    return ((weights[:, 1:].float() - 1.0) * ce).sum()


@register_strategy("flow")
class Flow(Strategy):
    Config = FlowConfig
    strength = Strength("tau_scale", 0.1, 10.0, protects_more_when_higher=False)

    def __init__(self, config: FlowConfig | None = None) -> None:
        super().__init__(config)
        self._losses: dict[int, torch.Tensor] = {}  # task index -> L_i of its training examples
        self._lookup: dict[bytes, tuple[float, int]] = {}
        self._lookup_task: int | None = None
        self._scored: dict[int, int] = {}  # scored tokens of each micro-batch of the step, every process

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        names = [spec.name for spec in run.strategies]
        if self.name not in names:
            return []
        after = [n for n in names[names.index(self.name) + 1:]
                 if get_strategy_class(n).transform_batch is not Strategy.transform_batch]
        if after:
            return [f"flow weighs the rows and tokens the other strategies leave: list it after {', '.join(after)}"]
        return []

    # ------------------------------------------------------------------ the base model's losses

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if not self._losses:  # the run's first task: the weights are still the original ones
            fingerprint = base_fingerprint(ctx.unwrapped_model)
            for each in ctx.tasks:
                self._losses[each.index] = example_losses(each.train_examples, self._table(each, ctx, fingerprint))
        self._report(task, ctx)

    def _table(self, task: TaskInfo, ctx: StrategyContext, fingerprint: str) -> TokenTable:
        examples = task.train_examples

        def compute() -> TokenTable:
            return token_ce_table(ctx, examples, self.config.batch_size, adapters_off=True)

        if not self.config.cache:
            return compute()
        data_hash = examples_hash(examples)
        metadata = {"kind": "stm-token-ce", "fingerprint": fingerprint, "data_hash": data_hash}  # STM's file
        table, hit = cached_table(cache_file(ctx.cache_dir, "stm", fingerprint, data_hash), metadata, compute,
                                  ctx.accelerator)
        logger.info("flow: task '%s': %s base-model losses", task.name, "reused cached" if hit else "computed")
        return table

    def _report(self, task: TaskInfo, ctx: StrategyContext) -> None:
        weights, tau = flow_weights(self._losses[task.index], self.config.tau_scale)
        ctx.log("flow/tau", tau)
        ctx.log("flow/mean_weight", float(weights.mean()) if weights.numel() else 0.0)

    def set_strength(self, value: float) -> None:
        super().set_strength(value)
        self._lookup, self._lookup_task = {}, None  # weights follow the new tau from the next batch

    def _lookup_for(self, task: TaskInfo) -> dict[bytes, tuple[float, int]]:
        """Example key -> (w_i, length) for the task's training examples."""
        if self._lookup_task != task.index:
            examples = task.train_examples
            losses = self._losses[task.index]
            if len(losses) != len(examples):
                raise RuntimeError(f"flow: the weights saved for task '{task.name}' do not match its training data; "
                                   "the data changed since the run started. Start a new run (new output.dir).")
            weights, _ = flow_weights(losses, self.config.tau_scale)
            self._lookup = {example_key(e.input_ids): (float(w), len(e.input_ids)) for e, w in zip(examples, weights)}
            self._lookup_task = task.index
        return self._lookup

    # ------------------------------------------------------------------ per batch

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        if ctx.micro_batch == 0:
            self._scored = {}
        self._scored[ctx.micro_batch] = int(count_scored_tokens(batch["labels"]))  # host tensors: no sync
        task = ctx.task
        weights = torch.ones(batch["input_ids"].shape, dtype=torch.float32)
        if task is not None and task.index in self._losses:
            lookup = self._lookup_for(task)
            for row, (key, positions) in enumerate(batch_rows(batch["input_ids"], batch["attention_mask"])):
                entry = lookup.get(key)
                if entry is not None and entry[1] == len(positions):
                    weights[row] = entry[0]
        return {**batch, SAMPLE_WEIGHT: weights}

    def extra_losses(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        weights = batch.get(SAMPLE_WEIGHT)
        if weights is None:
            return {}
        logits = align_to_inputs(outputs.logits, batch["input_ids"].shape[1])
        total = weighted_token_terms(logits, batch["labels"], weights.to(logits.device))
        step_scored = sum(self._scored.values())
        if ctx.step_tokens is None or step_scored == 0:  # hooks driven by hand (or a Trainer): this micro-batch
            return {"reweight": total / count_scored_tokens(batch["labels"]).clamp_min(1).float()}
        return {"reweight": total * ctx.step_parts / step_scored}

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {"losses": {str(i): t for i, t in self._losses.items()}}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self._losses = {int(i): t.double() for i, t in state.get("losses", {}).items()}
        self._lookup, self._lookup_task, self._scored = {}, None, {}
