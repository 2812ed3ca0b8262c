"""Synthetic replay: rehearse examples the base model wrote itself, for data that may not be kept
(GDPR, HIPAA, licences). Self-Synthesized Rehearsal, Huang et al., ACL 2024 (code DeepLearnXMU/SSR).

Before the first task, the base model (adapters disabled when the run wraps it with peft) generates one
set per source (see :mod:`retain.strategies.synthetic_replay.generation` for the pipeline):
- each task listed under ``tasks`` from its ``description`` and ``demonstrations`` (texts or
  ``{prompt, completion}`` pairs that the user supplies); every other task from
  ``demonstrations_from_data`` (default 3) examples of its own training data chosen by seed: those are
  the only real examples kept (set it to 0 to keep none);
- a general set from ``prompts`` (continuations of general prompts), or, when none are given, from the
  openings (first ``opening_words`` words) of ``general_prompts`` (default 8) texts of ``general_data``
  chosen by seed.

With no settings at all, ``synthetic-replay`` thus runs from its name like every other strategy: a set
per task from 3 of its examples, and a general set when the run has ``general_data``.
Sets are written to ``output_dir`` (default ``<run_dir>/synthetic``) as ``<source>.jsonl`` with a
``manifest.json`` naming the description, demonstrations and sampling settings behind each; a later run
can reuse them with ``reuse_dir``. With several processes the main process generates (and relabels)
alone and gives the sets to the others.

The general set is rehearsed from the first step; a task's set from the task after it (the same
schedule as replaying that task's real data). With ``relabel: true`` the latest model re-answers every
active prompt/completion set after each task (SSR's refinement step).

Mixing into batches is replay's (ratio, replace/append, cut to the batch width); the sets, the buffer's
generator and the ratio counters are in ``state_dict``, so a resumed run neither regenerates nor
rehearses different rows.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from retain.config import DataConfig, RunConfig, StrictModel
from retain.data import load_records
from retain.data.replay_buffer import RatioSchedule, ReplayBuffer, mix_from_buffer
from retain.data.sampling import Stream, derive_seed, seeded_generator
from retain.io import atomic_write_text, inside
from retain.models.sharding import is_sharded, once
from retain.strategies._shared.mixing import RatioMixing
from retain.strategies.base import Batch, StrategyConfig, StrategyContext, Strength, TaskInfo
from retain.strategies.registry import register_strategy
from retain.strategies.synthetic_replay.generation import (
    SamplingSettings,
    example_as_demonstration,
    load_jsonl,
    records_to_examples,
    relabel,
    save_jsonl,
    synthesize,
)

GENERAL_SOURCE = "@general"


def opening_text(record: dict[str, Any], cfg: DataConfig, words: int) -> str:
    """The first ``words`` words of a record's text: its text field, prompt, or first message's content."""
    value = record.get(cfg.text_field)
    if not isinstance(value, str):
        value = record.get(cfg.prompt_field)
    if not isinstance(value, str):
        messages = record.get(cfg.messages_field)
        first = messages[0] if isinstance(messages, list) and messages else None
        value = first.get("content") if isinstance(first, dict) else None
    return " ".join(value.split()[:words]) if isinstance(value, str) else ""


class PromptCompletion(StrictModel):
    prompt: str
    completion: str


class TaskSeed(StrictModel):
    """What the model is shown to write examples of one task."""

    description: str = Field("", description="What the task is, in words; placed before the demonstrations.")
    demonstrations: list[str] | list[PromptCompletion] = Field(
        default_factory=list, description="A few example texts, or {prompt, completion} pairs (SSR uses 2)."
    )


class SyntheticReplayConfig(StrategyConfig):
    tasks: dict[str, TaskSeed] = Field(default_factory=dict, description="Task name -> description + demonstrations.")
    prompts: list[str] = Field(default_factory=list, description="General prompts whose continuations form a general set.")
    demonstrations_from_data: int = Field(
        3, ge=0,
        description="For tasks not under `tasks`: this many of their training examples are the demonstrations (0: none).",
    )
    general_prompts: int = Field(
        8, ge=0, description="Without `prompts`: this many openings of general_data texts are the general prompts (0: none)."
    )
    opening_words: int = Field(8, gt=0, description="Words of a general_data text that make its opening.")
    per_source: int = Field(200, gt=0, description="Examples kept per set (SSR: 200 per task).")
    candidates: int | None = Field(None, gt=0, description="Candidates generated per set; default 2 x per_source.")
    max_new_tokens: int = Field(64, gt=0)
    completion_max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.6, gt=0, le=1)
    repetition_penalty: float = Field(1.2, gt=0)
    separator: str = Field("\n\n", min_length=1, description="Between demonstrations; a generation ends at it.")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="Drop a candidate this similar (shingle Jaccard) to a kept one; 1 disables.")
    select: Literal["kmeans", "first"] = Field("kmeans", description="kmeans: diverse subset on mean hidden states.")
    relabel: bool = Field(False, description="After each task, the latest model re-answers synthetic prompts.")
    ratio: float = Field(0.05, gt=0.0, lt=1.0, description="Share of all trained rows that are synthetic.")
    mode: Literal["replace", "append"] = "replace"
    max_length: int | None = Field(None, gt=1, description="Cut rehearsed rows to this; default: the batch's width.")
    example_max_length: int = Field(256, gt=1, description="Tokens per synthetic example when tokenized.")
    output_dir: str | None = Field(None, description="Where the JSONL sets go; default <run_dir>/synthetic.")
    reuse_dir: str | None = Field(None, description="Load <source>.jsonl sets found here instead of generating them.")
    batch_size: int = Field(16, gt=0, description="Generation batch size.")
    seed: int | None = Field(None, description="Sampling seed; default train.seed.")

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens,
            completion_max_new_tokens=self.completion_max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            separator=self.separator,
            batch_size=self.batch_size,
        )


@register_strategy("synthetic-replay")
class SyntheticReplay(RatioMixing):
    Config = SyntheticReplayConfig
    strength = Strength("ratio", 0.01, 0.9)  # a strong shift may need most rows replayed to hold a budget
    input_path_keys = ("reuse_dir",)
    output_path_keys = ("output_dir",)

    @classmethod
    def stores_real_data(cls, config: StrategyConfig) -> bool:
        """Only demonstrations taken from the task's own data are real examples; counted when the settings ask
        for them (the guide's hybrids write from general prompts, which ``retain tune`` fills from general text)."""
        return "demonstrations_from_data" in config.model_fields_set and bool(getattr(config, "demonstrations_from_data"))

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        config = self.config
        general = bool(config.prompts) or (config.general_prompts > 0 and run.general_data is not None)
        if not config.tasks and not general and not config.demonstrations_from_data:
            return [
                f"nothing to synthesize from: set {where}.prompts or general_data (general), {where}.tasks: "
                f"{{<task>: {{description, demonstrations}}}}, or {where}.demonstrations_from_data: 3"
            ]
        names = [t.name for t in run.tasks]
        problems = []
        unknown = sorted(set(config.tasks) - set(names))
        if unknown:
            problems.append(f"{where}.tasks names {unknown}, which are not tasks of this run ({', '.join(names)})")
        for name, seed in config.tasks.items():
            if not seed.demonstrations and not seed.description.strip():
                problems.append(f"{where}.tasks.{name}: give a description or demonstrations (or both)")
        return problems

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        names = [t.name for t in ctx.tasks]
        self.seed = ctx.seed_for(self)
        general = bool(self.config.prompts) or (self.config.general_prompts > 0 and ctx.config.general_data is not None)
        self.sources = ([GENERAL_SOURCE] if general else []) + [
            n for n in names if n in self.config.tasks or self.config.demonstrations_from_data
        ]
        capacity = self.config.per_source * max(1, len(self.sources))
        self.buffer = ReplayBuffer(capacity, seed=derive_seed(self.seed, Stream.SYNTHETIC_BUFFER))
        self.schedule = RatioSchedule(self.config.ratio, self.config.mode)
        self.sets: dict[str, list[dict[str, str]]] = {}
        self.manifest: dict[str, dict[str, Any]] = {}
        self.generated = False
        return model

    # ---- generation -----------------------------------------------------------------------------

    def out_dir(self, ctx: StrategyContext) -> Path:
        return Path(self.config.output_dir) if self.config.output_dir else Path(ctx.run_dir) / "synthetic"

    def _seed_material(self, source: str, ctx: StrategyContext) -> dict[str, Any]:
        """Description, demonstrations and prompts for one source."""
        if source == GENERAL_SOURCE:
            prompts = list(self.config.prompts) or self._general_openings(ctx)
            return {"description": "", "demonstrations": [], "prompts": prompts}
        if source in self.config.tasks:
            seed = self.config.tasks[source]
            demos = [d.model_dump() if isinstance(d, PromptCompletion) else d for d in seed.demonstrations]
            return {"description": seed.description, "demonstrations": demos, "prompts": []}
        task = next(t for t in ctx.tasks if t.name == source)
        generator = seeded_generator(self.seed, Stream.SYNTHETIC_DEMOS, task.index)
        order = torch.randperm(len(task.train_examples), generator=generator)
        picked = [task.train_examples[i] for i in order[: self.config.demonstrations_from_data].tolist()]
        demos = [example_as_demonstration(e, ctx.tokenizer) for e in picked]
        return {"description": "", "demonstrations": demos, "prompts": []}

    def _general_openings(self, ctx: StrategyContext) -> list[str]:
        """The first ``opening_words`` words of ``general_prompts`` general_data texts, chosen by seed."""
        cfg = ctx.config.general_data
        if cfg is None:
            return []
        records = load_records(cfg)
        texts = [t for t in (opening_text(r, cfg, self.config.opening_words) for r in records) if t]
        order = torch.randperm(len(texts), generator=seeded_generator(self.seed, Stream.SYNTHETIC_OPENINGS)).tolist()
        return [texts[i] for i in sorted(order[: self.config.general_prompts])]

    def _generate_all(self, ctx: StrategyContext) -> None:
        """Every set, from the model as it is before any training (the base model): generated once, on
        the main process (every process joins when the weights are sharded), and given to every process."""
        model = ctx.unwrapped_model
        self.sets, self.manifest = once(ctx.accelerator, lambda: self._generated_sets(ctx), together=is_sharded(model))
        self.generated = True
        self._save(ctx)

    def _generated_sets(self, ctx: StrategyContext) -> tuple[dict[str, list[dict[str, str]]], dict[str, dict[str, Any]]]:
        """(sets, manifest): each source's records and what they were made from."""
        model = ctx.unwrapped_model
        sets: dict[str, list[dict[str, str]]] = {}
        manifest: dict[str, dict[str, Any]] = {}
        disable = getattr(model, "disable_adapter", None)
        settings = self.config.sampling()
        reuse = Path(self.config.reuse_dir) if self.config.reuse_dir else None
        with disable() if callable(disable) else contextlib.nullcontext():
            for i, source in enumerate(self.sources):
                material = self._seed_material(source, ctx)
                if reuse is not None and (reuse / f"{source}.jsonl").is_file():
                    records = load_jsonl(reuse / f"{source}.jsonl")[: self.config.per_source]
                else:
                    records = synthesize(
                        model,
                        ctx.tokenizer,
                        self.config.per_source,
                        settings,
                        candidates=self.config.candidates,
                        description=material["description"],
                        demonstrations=material["demonstrations"],
                        prompts=material["prompts"],
                        dedup_threshold=self.config.dedup_threshold,
                        select=self.config.select,
                        # torch.manual_seed takes 64 bits
                        seed=derive_seed(self.seed, Stream.SYNTHETIC_GENERATION, i) % 2**63,
                    )
                if not records:
                    raise RuntimeError(
                        f"synthetic-replay: the model generated no usable example for '{source}'; raise "
                        "max_new_tokens or candidates, or check the prompts"
                    )
                sets[source] = records
                manifest[source] = {**material, "n": len(records)}
        manifest["@settings"] = {k: v for k, v in self.config.model_dump().items() if k not in ("tasks", "prompts")}
        return sets, manifest

    def _save(self, ctx: StrategyContext) -> None:
        if not ctx.accelerator.is_main_process:
            return
        directory = self.out_dir(ctx)
        for source, records in self.sets.items():
            save_jsonl(records, inside(directory, f"{source}.jsonl"))
        atomic_write_text(directory / "manifest.json", json.dumps(self.manifest, indent=2, ensure_ascii=False))

    def _activate(self, source: str, ctx: StrategyContext) -> None:
        examples = records_to_examples(self.sets[source], ctx.tokenizer, self.config.example_max_length)
        if source in self.buffer.sources:
            self.buffer.replace_source(source, examples)
        else:
            self.buffer.extend(source, examples)

    # ---- hooks ----------------------------------------------------------------------------------

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if not self.generated:
            self._generate_all(ctx)
            if GENERAL_SOURCE in self.sets:
                self._activate(GENERAL_SOURCE, ctx)

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        mixed, _ = mix_from_buffer(batch, self.buffer, self.schedule, ctx.tokenizer.pad_token_id, self.config.max_length)
        if len(self.buffer):
            ctx.log("synthetic-replay/realised_ratio", self.schedule.realised)
        return mixed

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if task.name in self.sets:
            self._activate(task.name, ctx)
        if self.config.relabel:
            active = [s for s in self.buffer.sources if any("prompt" in r for r in self.sets[s])]
            model = ctx.unwrapped_model
            answered = once(ctx.accelerator, lambda: {  # once, on the main process, as the generation
                s: relabel(model, ctx.tokenizer, self.sets[s], self.config.sampling()) for s in active
            }, together=is_sharded(model))
            for source in active:
                self.sets[source] = answered[source]
                self._activate(source, ctx)
            if active:
                self._save(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generated": self.generated,
            "sets": self.sets,
            "manifest": self.manifest,
            "buffer": self.buffer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        if not state:
            return
        self.generated = bool(state["generated"])
        self.sets = {k: [dict(r) for r in v] for k, v in state["sets"].items()}
        self.manifest = dict(state["manifest"])
        self.buffer.load_state_dict(state["buffer"])
        self.schedule.load_state_dict(state["schedule"])
