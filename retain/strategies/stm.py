"""Selective Token Masking (Wu et al. 2025, arXiv 2501.14315): do not train on the tokens the base
model finds most surprising.

One forward pass of the base model over the training data gives each completion token's perplexity
exp(CE); tokens above ``threshold`` get label -100, so the fine-tune learns the task from tokens close
to what the model already says and moves it less. Prompt tokens are masked as usual by the data
pipeline.

The authors' threshold is 2.5 (p < 0.4), for 7B-scale models that find most of their fine-tuning
text predictable. The default here is 50, measured: on ``retain bench stories-contracts`` (a 260K
model, to which contract text is mostly surprising) 2.5 masks 89% of the tokens and keeps 28% of full
fine-tuning's new-task gain (forgetting 66% as much); 50 masks 53%, keeping 65% of the gain with 71% of the
forgetting (``bench/strength_sweep.py``). Set 2.5 for large models.

Ablations (``mode``): ``lowest_all`` and ``random_official`` are the authors' code (every token
*below* the threshold; as many random draws as ``highest`` drops, with replacement over the whole
sequence); ``lowest`` and ``random`` are accepted for them. ``lowest_matched`` and ``random_matched``
drop exactly as many completion tokens as ``highest`` (see ``retain.losses.distill.stm_drop_mask``).

Which base model: ``reference: original`` (default; the method's "base") computes the perplexities
of *every* task's training data with the model as loaded, at the start of the first task, so later
tasks are also judged by the original model even after full fine-tuning changed the weights.
``reference: current`` uses the model as it is at the start of each task instead.

The per-token CEs are cached under ``<cache_dir>/stm/`` keyed by a fingerprint of the reference
weights and a hash of the token ids: reused across runs (and between ``full+stm`` and ``lora+stm``
on the same base), recomputed when the model or the data changes. The masks themselves live in
``state_dict`` so a resumed run never depends on the cache.

Masks are applied in ``transform_batch`` by recognising each row's token ids (batches carry no
example ids): rows that are not this task's training examples (e.g. replay) are left alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from retain.data import IGNORE_INDEX
from retain.data.identity import batch_rows, example_key, examples_hash
from retain.data.sampling import Stream, seeded_generator
from retain.losses.distill import StmMode, next_token_cross_entropy, stm_drop_mask
from retain.models.fingerprint import base_fingerprint, model_fingerprint
from retain.stats.token_tables import TokenTable, cache_file, cached_table, compute_table
from retain.strategies.base import Batch, Strategy, StrategyConfig, StrategyContext, Strength, TaskInfo
from retain.strategies.registry import register_strategy

logger = logging.getLogger("retain")


class StmConfig(StrategyConfig):
    threshold: float = Field(
        50.0,
        gt=1.0,
        description="Drop completion tokens whose base-model perplexity exp(CE) exceeds this (authors: 2.5; "
        "50: the stories-contracts knee).",
    )
    mode: StmMode = Field(
        "highest",
        description="highest: the method. Ablations: lowest_all / random_official (the authors' code; "
        "'lowest' and 'random' mean these), lowest_matched / random_matched (as many tokens as highest drops).",
    )
    reference: Literal["original", "current"] = Field(
        "original", description="Perplexities from the model as loaded (all tasks, once) or at each task's start."
    )
    batch_size: int = Field(16, gt=0, description="Examples per forward batch of the precompute pass.")
    seed: int | None = Field(None, description="Seed of the random ablation; default: train.seed.")
    cache: bool = Field(True, description="Store/reuse the per-token perplexities under <cache_dir>/stm.")

    @field_validator("mode", mode="before")
    @classmethod
    def _official_ablations(cls, value: Any) -> Any:
        """``lowest`` and ``random`` name the ablations as the authors' code runs them."""
        return {"lowest": "lowest_all", "random": "random_official"}.get(value, value)


def token_ce_table(ctx: StrategyContext, examples: list, batch_size: int, adapters_off: bool) -> TokenTable:
    """Per-token CE of ``examples`` under ``ctx``'s model (adapters disabled for the original base)."""
    return compute_table(
        ctx.unwrapped_model,
        examples,
        ctx.collate,
        lambda logits, batch: {"ce": next_token_cross_entropy(logits, batch["input_ids"])},
        batch_size=batch_size,
        device=ctx.device,
        adapters_off=adapters_off,
        accelerator=ctx.accelerator,  # split across processes, gathered on each
    )


def drop_masks(
    examples: list, table: TokenTable, config: StmConfig, generator: torch.Generator
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One boolean drop mask per example, from its cached CEs and its labels; plus, per example, its
    least surprising completion token (position, CE; -1 / inf when it has none), the token kept when
    masking would leave a whole batch without a labelled token."""
    masks, keep_position, keep_ce = [], [], []
    for index, example in enumerate(examples):
        ce = table.example(index, "ce")
        eligible = torch.tensor(example.labels) != IGNORE_INDEX
        eligible[0] = False  # never predicted by a causal LM
        masks.append(stm_drop_mask(ce, eligible, config.threshold, config.mode, generator))
        if eligible.any():
            best = int(torch.where(eligible, ce, torch.full_like(ce, float("inf"))).argmin())
            keep_position.append(best)
            keep_ce.append(float(ce[best]))
        else:
            keep_position.append(-1)
            keep_ce.append(float("inf"))
    return masks, torch.tensor(keep_position, dtype=torch.int64), torch.tensor(keep_ce, dtype=torch.float32)


@register_strategy("stm")
class SelectiveTokenMasking(Strategy):
    supports_sharding = True  # its perplexity pass runs every batch on every process (compute_table)
    Config = StmConfig
    strength = Strength("threshold", 1.25, 100.0, protects_more_when_higher=False)

    def __init__(self, config: StmConfig | None = None) -> None:
        super().__init__(config)
        self._drop: dict[int, torch.Tensor] = {}  # task index -> flat uint8 mask over its training tokens
        self._lengths: dict[int, torch.Tensor] = {}
        self._counts: dict[int, list[int]] = {}  # task index -> [masked, eligible]
        self._keep_position: dict[int, torch.Tensor] = {}  # per example: token kept if a batch empties
        self._keep_ce: dict[int, torch.Tensor] = {}
        self._emptied_batches = 0
        self._seconds = 0.0
        self._cache_hits = 0
        self._lookup: dict[bytes, tuple[torch.Tensor, int, float]] = {}
        self._lookup_task: int | None = None
        self._seed = 0
        self._tables: dict[int, TokenTable] = {}  # per-token CEs, held only when a budget may move the threshold
        self._examples: dict[int, list] = {}

    # ------------------------------------------------------------------ precompute

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self.config.reference == "original":
            if not self._drop:  # the run's first task: the weights are still the original ones
                fingerprint = base_fingerprint(ctx.unwrapped_model)
                for each in ctx.tasks:
                    self._precompute(each, ctx, fingerprint, adapters_off=True)
        else:
            self._precompute(task, ctx, model_fingerprint(ctx.unwrapped_model), adapters_off=False)
        self._report(task, ctx)
        self._lookup_for(task, ctx)  # index the task's examples now, not inside the first training step

    def _precompute(self, task: TaskInfo, ctx: StrategyContext, fingerprint: str, adapters_off: bool) -> None:
        examples = task.train_examples
        start = time.perf_counter()
        data_hash = examples_hash(examples)

        def compute() -> TokenTable:
            return token_ce_table(ctx, examples, self.config.batch_size, adapters_off)

        if self.config.cache:
            metadata = {"kind": "stm-token-ce", "fingerprint": fingerprint, "data_hash": data_hash}
            table, hit = cached_table(
                cache_file(ctx.cache_dir, "stm", fingerprint, data_hash), metadata, compute, ctx.accelerator
            )
        else:
            table, hit = compute(), False
        self._seed = ctx.seed_for(self)
        if ctx.config.budget is not None and ctx.config.budget.adapt:  # the threshold may move: keep the CEs
            self._tables[task.index], self._examples[task.index] = table, examples
        self._set_masks(task.index, examples, table)
        self._seconds += time.perf_counter() - start
        self._cache_hits += int(hit)
        logger.info(
            "stm: task '%s': %s per-token perplexities (%.2fs)", task.name, "reused cached" if hit else "computed",
            time.perf_counter() - start,
        )

    def _set_masks(self, index: int, examples: list, table: TokenTable) -> None:
        """Task ``index``'s drop masks at the current threshold (the random ablation's draw is seeded per task)."""
        generator = seeded_generator(self._seed, Stream.STM_MASK, index)
        masks, keep_position, keep_ce = drop_masks(examples, table, self.config, generator)
        self._keep_position[index], self._keep_ce[index] = keep_position, keep_ce
        self._drop[index] = torch.cat(masks).to(torch.uint8) if masks else torch.zeros(0, dtype=torch.uint8)
        self._lengths[index] = torch.tensor([len(m) for m in masks], dtype=torch.int64)
        eligible = sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)
        self._counts[index] = [int(self._drop[index].sum()), eligible]

    def set_strength(self, value: float) -> None:
        """A new threshold re-derives the masks of every task whose per-token CEs are held (a budgeted run
        holds them); before any task started (a resume applying the budget first) only the value changes."""
        super().set_strength(value)
        for index, table in self._tables.items():
            self._set_masks(index, self._examples[index], table)
        self._lookup, self._lookup_task = {}, None

    def _report(self, task: TaskInfo, ctx: StrategyContext, quiet: bool = False) -> None:
        """Into the next log row (rows do not repeat it): how many tokens this task loses. Called when the
        task starts and again at the first batch after a resume."""
        masked, eligible = self._counts.get(task.index, [0, 0])
        ctx.log("stm/masked_tokens", masked)
        ctx.log("stm/masked_fraction", masked / eligible if eligible else 0.0)
        ctx.log("stm/precompute_seconds", self._seconds)
        ctx.log("stm/cache_hits", self._cache_hits)
        if quiet:
            return
        logger.info(
            "stm: task '%s': %d of %d completion tokens masked (mode %s, threshold %.3g)",
            task.name, masked, eligible, self.config.mode, self.config.threshold,
        )

    # ------------------------------------------------------------------ per batch

    def _lookup_for(self, task: TaskInfo, ctx: StrategyContext) -> dict[bytes, tuple[torch.Tensor, int, float]]:
        """Example key -> (drop mask, fallback position, fallback CE) for the task's training examples."""
        if self._lookup_task != task.index:
            flat, lengths = self._drop[task.index].bool(), self._lengths[task.index]
            examples = task.train_examples
            if len(examples) != len(lengths) or any(len(e.input_ids) != int(n) for e, n in zip(examples, lengths)):
                raise RuntimeError(
                    f"stm: the masks saved for task '{task.name}' do not match its training data; "
                    "the data changed since the run started. Start a new run (new output.dir)."
                )
            pieces = torch.split(flat, lengths.tolist())
            positions, ces = self._keep_position[task.index].tolist(), self._keep_ce[task.index].tolist()
            self._lookup = {
                example_key(e.input_ids): (piece, position, ce)
                for e, piece, position, ce in zip(examples, pieces, positions, ces)
            }
            self._lookup_task = task.index
            self._report(task, ctx, quiet=True)  # a resumed run skips before_task: log the counts again
        return self._lookup

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        task = ctx.task
        if task is None or task.index not in self._drop:
            return batch
        lookup = self._lookup_for(task, ctx)
        labels = batch["labels"].clone()
        fallback: tuple[float, int, int] | None = None  # (CE, row, batch position) of the least surprising token
        for row, (key, positions) in enumerate(batch_rows(batch["input_ids"], batch["attention_mask"])):
            entry = lookup.get(key)
            if entry is None or len(entry[0]) != len(positions):
                continue  # not one of this task's training examples (e.g. a replayed row)
            drop, keep_position, keep_ce = entry
            labels[row, positions[drop].to(labels.device)] = IGNORE_INDEX
            if keep_position >= 0 and (fallback is None or keep_ce < fallback[0]):
                fallback = (keep_ce, row, int(positions[keep_position]))
        if fallback is not None and not (labels[:, 1:] != IGNORE_INDEX).any():  # position 0 is never predicted
            # Every labelled token was masked: the task loss would be 0/0. Keep the batch's least
            # surprising token, the smallest departure from the method that keeps the step finite.
            _, row, position = fallback
            labels[row, position] = batch["labels"][row, position]
            self._emptied_batches += 1
        ctx.log("stm/emptied_batches", self._emptied_batches)  # the run's count so far, in every row
        return {**batch, "labels": labels}

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "drop": {str(i): m for i, m in self._drop.items()},
            "lengths": {str(i): n for i, n in self._lengths.items()},
            "counts": {str(i): c for i, c in self._counts.items()},
            "keep_position": {str(i): t for i, t in self._keep_position.items()},
            "keep_ce": {str(i): t for i, t in self._keep_ce.items()},
            "emptied_batches": self._emptied_batches,
            "precompute_seconds": self._seconds,
            "cache_hits": self._cache_hits,
            "seed": self._seed,
            **({"tables": {str(i): {"ce": t.tensors["ce"], "lengths": t.lengths} for i, t in self._tables.items()}}
               if self._tables else {}),
        }

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self._drop = {int(i): m.to(torch.uint8) for i, m in state.get("drop", {}).items()}
        self._lengths = {int(i): n.to(torch.int64) for i, n in state.get("lengths", {}).items()}
        self._counts = {int(i): list(c) for i, c in state.get("counts", {}).items()}
        self._keep_position = {int(i): t.to(torch.int64) for i, t in state.get("keep_position", {}).items()}
        self._keep_ce = {int(i): t.float() for i, t in state.get("keep_ce", {}).items()}
        self._emptied_batches = int(state.get("emptied_batches", 0))
        self._seconds = float(state.get("precompute_seconds", 0.0))
        self._cache_hits = int(state.get("cache_hits", 0))
        self._seed = int(state.get("seed", ctx.seed_for(self)))
        tables = state.get("tables", {})
        self._tables = {int(i): TokenTable({"ce": t["ce"].float()}, t["lengths"].to(torch.int64)) for i, t in tables.items()}
        self._examples = {i: ctx.tasks[i].train_examples for i in self._tables}
        self._lookup, self._lookup_task = {}, None
