"""The results file (``results.json``): a versioned, documented pydantic schema.

Field names are part of the public contract (reports, CI gates and other people's notebooks read
them), so they only change with a new major ``SCHEMA_VERSION``. Minor versions may add optional
fields; ``Results.load`` accepts any minor version of a known major and refuses the rest.

Non-finite floats (an overflowing perplexity, a NaN metric) are written as the JSON strings
"Infinity" / "-Infinity" / "NaN", so the file stays strict JSON and still round-trips.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retain.errors import DataError
from retain.io import atomic_write_text

SCHEMA_VERSION = "1.2"  # 1.1: StrategyRun.budget; 1.2: select/report parts, intervals, seeds


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def _package_version() -> str:
    """Installed version of retain, without importing it (the package root pulls in torch)."""
    try:
        return metadata.version("retain")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SchemaModel(BaseModel):
    """Base of every results model.

    Unknown keys are ignored so that a file from a newer minor version (which may only add optional
    fields) still loads; non-finite floats are written as strings to keep the file strict JSON.
    """

    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="strings")


class ItemScores(SchemaModel):
    """A bounded score item by item, so intervals can be computed by resampling items: the value is
    ``sum(num) / sum(den)`` (token-weighted windows: hits and tokens per window) or the mean of ``num``
    (records, ``den`` None). Items are in pool order, the same order for every model state, so a before
    and an after score pair item by item."""

    num: list[float]
    den: list[float] | None = None
    exp: bool = Field(False, description="The value is exp of the ratio (perplexity from summed NLL).")

    def value(self) -> float:
        total = sum(self.den) if self.den is not None else len(self.num)
        ratio = sum(self.num) / total if total else float("nan")
        if self.exp:
            return math.exp(ratio) if ratio < 709.0 else float("inf")
        return ratio

    def subset(self, ids: list[int]) -> "ItemScores":
        den = None if self.den is None else [self.den[i] for i in ids]
        return ItemScores(num=[self.num[i] for i in ids], den=den, exp=self.exp)


class PartScore(SchemaModel):
    """The same eval on the other part of its items (``select``: what choosers read)."""

    value: float
    n: int = Field(0, ge=0, description="Examples or tokens it was computed over.")


class Score(SchemaModel):
    """One evaluation result of one model state on one eval."""

    value: float = Field(description="The measured value, as the metric defines it (not inverted).")
    metric: str = Field(
        description='What was measured: "next_token_accuracy", "loss", "perplexity", "accuracy", ...'
    )
    higher_is_better: bool = Field(description="Direction of improvement for this metric.")
    bounded: bool = Field(
        description="True when the value lies in [0, 1]; only bounded scores enter the matrix R."
    )
    role: Literal["general", "task"] = Field(
        description='"general": a general-ability suite to preserve; "task": a training task\'s eval.'
    )
    train_task: str | None = Field(
        None, description="Name of the training task this eval measures (None for general evals)."
    )
    n: int = Field(0, ge=0, description="How many examples or tokens the value was computed over.")
    part: Literal["report", "select", "all"] = Field(
        "all", description="Which items of the eval the value is over: its report part (run results), its "
        "select part (what chooses), or all (a file from before the split, or an eval too small to split)."
    )
    select: PartScore | None = Field(None, description="The value on the select part (part report only).")
    items: ItemScores | None = Field(None, description="Per-item scores of this part (bounded scores), for intervals.")

    def on(self, part: Literal["report", "select"]) -> "Score":
        """This score as read by ``part``: the select value for ``select`` (the value itself when the
        eval has no separate select part), else unchanged."""
        if part == "select" and self.select is not None:
            return self.model_copy(update={"value": self.select.value, "n": self.select.n, "part": "select",
                                           "select": None, "items": None})
        return self


class Drift(SchemaModel):
    """How far the model moved from the base model, independent of any task score."""

    kl_from_base: float | None = Field(
        None, description="Mean per-token KL(base || model) on the probe prompts, in nats."
    )
    ppl_delta: float | None = Field(
        None, description="Perplexity on general text minus the base model's perplexity on it."
    )
    weight_rel_l2: float | None = Field(
        None, description="Relative weight distance ||theta - theta_0|| / ||theta_0||."
    )
    task_kl: float | None = Field(
        None, description="KL(base || model) on the just-trained task's own inputs, nats/token (RL's Razor) (1.2)."
    )


class StepRecord(SchemaModel):
    """Everything measured at one model state: the base model or the model after one task."""

    index: int = Field(ge=0, description="0 = base model; i = after training task i (1-indexed).")
    task: str | None = Field(None, description="Training task just finished; None for the base model.")
    global_step: int = Field(0, ge=0, description="Optimizer steps taken since the start of the run.")
    scores: dict[str, Score] = Field(
        default_factory=dict, description="Scores keyed by eval name, in evaluation order."
    )
    drift: Drift | None = Field(None, description="Distance from the base model (None for the base).")
    train_loss: float | None = Field(None, description="Mean training loss over this task.")
    seconds: float = Field(0.0, ge=0, description="Wall-clock training time of this task, seconds.")
    seconds_per_step: float | None = Field(None, description="Mean wall-clock seconds per optimizer step.")
    peak_memory_bytes: int | None = Field(None, description="Peak accelerator memory while training.")
    samples: dict[str, str] = Field(
        default_factory=dict, description="Probe prompt -> greedy continuation generated at this state."
    )


class Summary(SchemaModel):
    """Headline numbers of one strategy run; None where a value was not measured or is undefined."""

    new_task_score: float | None = Field(None, description="Last task's primary score after the last step.")
    new_task_score_before: float | None = Field(
        None, description="Last task's primary score on the base model."
    )
    general_before: float | None = Field(None, description="Mean bounded general score of the base model.")
    general_after: float | None = Field(None, description="Mean bounded general score after the last step.")
    general_retention: float | None = Field(None, description="general_after / general_before.")
    acc: float | None = Field(None, description="ACC: mean of the last row of R.")
    bwt: float | None = Field(None, description="BWT (paper form, divided by T-1); None for T < 2.")
    fwt: float | None = Field(None, description="FWT (paper form, divided by T-1); None for T < 2.")
    forgetting: float | None = Field(
        None, description="Chaudhry 2018 average forgetting F_T; None for T < 2."
    )
    kl_from_base: float | None = Field(None, description="Drift of the last record: KL(base || model).")
    ppl_delta: float | None = Field(None, description="Drift of the last record: perplexity delta.")
    weight_rel_l2: float | None = Field(None, description="Drift of the last record: relative L2.")
    task_kl: float | None = Field(None, description="Drift of the last record: KL on the last task's own inputs (1.2).")
    seconds_per_step: float | None = Field(None, description="Mean seconds/step over the trained tasks.")
    peak_memory_bytes: int | None = Field(None, description="Largest peak memory over the trained tasks.")
    trainable_params: int | None = Field(None, description="Number of parameters the strategy trained.")
    gain: float | None = Field(None, description="new_task_score - new_task_score_before (1.2).")
    general_retention_interval: list[float] | None = Field(
        None, description="[low, high]: paired bootstrap interval of general_retention over report items (1.2)."
    )
    new_task_score_interval: list[float] | None = Field(None, description="[low, high] of new_task_score (1.2).")
    gain_interval: list[float] | None = Field(None, description="[low, high] of gain, paired item by item (1.2).")
    confidence: float | None = Field(None, description="Confidence level of the intervals (0.95).")


class BudgetCheck(SchemaModel):
    """One budget measurement during training (a fixed subset of the suite) and the strengths after it."""

    task: str = Field(description="Training task being trained.")
    step: int = Field(ge=0, description="Optimizer steps into that task (0: its start).")
    global_step: int = Field(ge=0, description="Optimizer steps since the start of the run.")
    general_retention: float | None = Field(None, description="Subset general score / the base model's on it.")
    kl: float | None = Field(None, description="KL(base || model) on the probe prompts, nats/token.")
    task_forgetting: float | None = Field(None, description="Mean forgetting of earlier tasks on their subsets.")
    task_kl: float | None = Field(None, description="KL(base || model) on the current task's own inputs (1.2).")
    new_task_score: float | None = Field(None, description="What the kept point maximizes (subset score of the task).")
    violation: float | None = Field(None, description="Worst normalized violation (> 0: over budget).")
    within_budget: bool = Field(True, description="Every measured bound held.")
    strengths: dict[str, float] = Field(
        default_factory=dict, description='"strategy.key" -> value in force after this check.'
    )


class BudgetTask(SchemaModel):
    """What the budget decided at the end of one task: which step's model was kept, and why."""

    task: str
    end_step: int = Field(ge=0, description="The task's last step.")
    kept_step: int = Field(ge=0, description="Step (into the task) of the model kept; end_step unless rolled back.")
    rolled_back: bool = Field(False, description="The task ended over budget and an earlier point was restored.")
    within_budget: bool = Field(True, description="The kept point was within budget when measured.")
    reason: str = Field("", description="Why this point was kept, in words.")
    report_general_retention: float | None = Field(
        None, description="The kept model's general retention on the report part (chosen on select) (1.2)."
    )
    report_interval: list[float] | None = Field(None, description="[low, high] of report_general_retention (1.2).")


class BudgetResult(SchemaModel):
    """A forgetting budget the run enforced (``budget:`` in the run config)."""

    mode: str = Field(
        description='"adaptive" (strengths moved), or "rollback baseline" (no adaptable strength, or adapt: false).'
    )
    bounds: dict[str, float] = Field(default_factory=dict, description="The bounds, by name, as configured.")
    on_exhausted: str = Field("rollback", description="rollback | stop | warn")
    check_every: int = Field(0, ge=0)
    probe_examples: int = Field(0, ge=0, description="Windows/records per eval measured between task ends.")
    start: dict[str, float] = Field(default_factory=dict, description="Strengths at the start of the run.")
    final: dict[str, float] = Field(default_factory=dict, description="Strengths at the end of the run.")
    checks: list[BudgetCheck] = Field(default_factory=list, description="The trajectory, one row per measurement.")
    tasks: list[BudgetTask] = Field(default_factory=list, description="One decision per finished task.")
    stopped: str | None = Field(None, description="Why the run stopped early (on_exhausted: stop), else None.")
    seconds: float = Field(0.0, ge=0, description="Wall-clock seconds spent measuring and keeping points.")


class StrategyRun(SchemaModel):
    """One strategy (or hybrid) trained through the whole task sequence."""

    name: str = Field(description='Strategy name as configured, e.g. "full", "lora+ewc".')
    config: dict[str, Any] = Field(default_factory=dict, description="The exact config used.")
    task_names: list[str] = Field(description="Training tasks in order; column j of R is task_names[j].")
    records: list[StepRecord] = Field(description="Record 0 = base model, then one per trained task.")
    matrix: list[list[float | None]] = Field(
        default_factory=list, description="R, (T+1) x T: R[i][j] = task j's primary score after task i."
    )
    summary: Summary = Field(default_factory=Summary, description="Headline numbers.")
    budget: BudgetResult | None = Field(None, description="The forgetting budget, when the run had one (1.1).")
    select_summary: Summary | None = Field(
        None, description="The same headline numbers on the select part of every eval: what choosers read (1.2)."
    )
    seed: int | None = Field(None, description="train.seed of this run (1.2).")
    warnings: list[str] = Field(default_factory=list, description="What the run was allowed to do against a rule (1.2).")


class Estimate(SchemaModel):
    """A mean over seeds with its interval (crossed bootstrap over seeds and report items) and the
    spread between the seeds' own values."""

    value: float
    interval: list[float] | None = Field(None, description="[low, high] at the results' confidence.")
    seed_sd: float | None = Field(None, description="Standard deviation of the per-seed values.")
    per_seed: list[float] = Field(default_factory=list)


class Aggregate(SchemaModel):
    """One bench item over several seeds (``retain bench --seeds``): report-part figures with intervals,
    select-part means (what a chooser reads), and the paired difference to the first item."""

    name: str
    seeds: list[int]
    general_retention: Estimate | None = None
    new_task_score: Estimate | None = None
    gain: Estimate | None = None
    share_of_reference_gain: float | None = Field(None, description="gain / the first item's gain (means).")
    select: dict[str, float] = Field(default_factory=dict, description="Means over seeds of the select part.")
    versus: str | None = Field(None, description="The item the differences are taken against (the first item).")
    difference: dict[str, Estimate] = Field(
        default_factory=dict, description="This item minus `versus`, paired on seed, data order and items."
    )
    verdict: dict[str, str] = Field(default_factory=dict, description='"A beats B" or "tie", per figure.')
    confidence: float = 0.95


class Results(SchemaModel):
    """The whole results file: one or more strategy runs on the same scenario and base model."""

    schema_version: str = Field(SCHEMA_VERSION, description="Version of this schema, MAJOR.MINOR.")
    retain_version: str = Field(default_factory=_package_version, description="retain version used.")
    created: str = Field(default_factory=_now_iso, description="Creation time, ISO 8601 (UTC).")
    scenario: str | None = Field(None, description="Scenario (task sequence) name, if a built-in one.")
    base_model: str = Field(description="Base model: local path or hub id.")
    runs: list[StrategyRun] = Field(default_factory=list, description="One entry per strategy run.")
    aggregates: list[Aggregate] = Field(default_factory=list, description="Per item over seeds (1.2).")

    def to_json(self) -> str:
        """Pretty JSON text of the file."""
        return self.model_dump_json(indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file in the same folder, then os.replace): never a half file."""
        target = Path(path)
        atomic_write_text(target, self.to_json())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Results":
        """Read a results file, refusing an unknown major schema version with a message naming it."""
        source = Path(path)
        if not source.is_file():
            raise DataError(f"results file not found: {source}", hint="pass the results.json a train, bench or demo run wrote")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{source}: not a JSON results file ({exc})") from None
        except OSError as exc:
            raise DataError(f"{source}: cannot read the results file ({exc.strerror or exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a JSON object at the top level")
        version = str(data.get("schema_version", "<missing>"))
        if _major(version) != _major(SCHEMA_VERSION):
            raise DataError(
                f"{source}: results schema_version {version!r} is not supported by this retain "
                f"(reads {_major(SCHEMA_VERSION)}.x); use a matching retain version to read it"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DataError(f"{source}: invalid results file: '{where}': {first['msg']} ({exc.error_count()} problem(s))") from None
