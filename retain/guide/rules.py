"""From constraints to a ranked list of hybrids, each with the reasons that put it there.

Each rule is a small pure function ``(hybrid, constraints) -> list[Effect]``: an effect either rules the
hybrid out (``excludes``) or moves it up or down (``points``), and always says why, naming the
constraint that led to it. The ranking adds the points, then breaks ties with the measured evidence
(new-task gain on stories-contracts among hybrids that kept enough general ability; retention among
those that did not), then prefers the simpler hybrid. Rules that must hold (tests pin them): strict privacy never keeps real data; high stakes
always includes a function-preserving method (lwf or fip); low compute trains adapters only (never the
full weights) and never holds a frozen copy of the model.

Constraints recorded in a run YAML (``constraints:``, written by ``retain recommend --out``) bound what
``retain tune`` searches: :func:`tighten` lets flags narrow them and refuses any that would widen them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from retain.errors import ConfigError
from retain.guide.catalogue import (
    CATALOGUE,
    Hybrid,
    extra_passes,
    holds_frozen_copy,
    lwf_teacher,
    memory_in_models,
    min_tasks,
    preserves_function,
    stores_real_data,
    uses_adapters,
)
from retain.guide.evidence import Evidence, EvidenceRow

Compute = Literal["low", "medium", "high"]
Privacy = Literal["strict", "normal"]
Stakes = Literal["high", "normal"]
Weights = Literal["adapters", "full", "any"]


@dataclass(frozen=True)
class Constraints:
    compute: Compute = "medium"
    privacy: Privacy = "normal"
    stakes: Stakes = "normal"
    weights: Weights = "any"
    tasks: int = 1
    min_general_retention: float | None = None  # an explicit floor (recommend --min-general-retention)

    @property
    def retention_floor(self) -> float:
        """The general retention a hybrid should have kept on the benchmark to count as safe: the explicit
        floor when one is given, else what the stakes imply."""
        if self.min_general_retention is not None:
            return self.min_general_retention
        return 0.95 if self.stakes == "high" else 0.9

    def describe(self) -> str:
        weights = {"adapters": "adapters", "full": "full weights", "any": "adapters or full weights"}[self.weights]
        floor = "" if self.min_general_retention is None else f", general retention ≥ {self.min_general_retention:g}"
        return (f"compute {self.compute}, privacy {self.privacy}, stakes {self.stakes}, {weights}, "
                f"{self.tasks} task{'s' if self.tasks != 1 else ''}{floor}")


#: each constraint's values from the widest (searches most) to the narrowest
ORDER: dict[str, tuple[str, ...]] = {
    "compute": ("high", "medium", "low"),
    "privacy": ("normal", "strict"),
    "stakes": ("normal", "high"),
}
#: what ``retain tune`` searches when neither the run YAML nor a flag says
WIDEST = {"compute": "high", "privacy": "normal", "stakes": "normal", "weights": "any"}


def check_consistent(c: Constraints) -> Constraints:
    """Refuse constraints no hybrid can meet: low compute trains adapters only."""
    if c.compute == "low" and c.weights == "full":
        raise ConfigError("compute low rules out full-weight hybrids, and --full-weights asks for them only: "
                          "choose one (--compute medium, or --adapters)")
    return c


def _narrows(key: str, recorded: str, wanted: str) -> bool:
    if key == "weights":
        return wanted == recorded or recorded == "any"
    order = ORDER[key]
    return order.index(wanted) >= order.index(recorded)


def _flag(key: str, value: str) -> str:
    if key == "weights":
        return {"adapters": "--adapters", "full": "--full-weights", "any": "(either)"}[value]
    return f"--{key} {value}"


def tighten(recorded: dict[str, Any] | None, flags: dict[str, str | None], tasks: int = 1,
            source: str = "the run YAML") -> Constraints:
    """The constraints a tune searches: those ``recorded`` (a run YAML's ``constraints:``), narrowed by
    ``flags`` (None: not given). A flag that would widen a recorded constraint is refused, naming both
    values; without a record, what is not given is the widest (compute high, privacy normal, stakes
    normal, adapters or full weights)."""
    values = dict(WIDEST)
    recorded = {k: v for k, v in (recorded or {}).items() if k in WIDEST and v is not None}
    values.update(recorded)
    for key, wanted in flags.items():
        if wanted is None:
            continue
        if key not in WIDEST:
            raise ConfigError(f"unknown constraint {key!r}: one of {', '.join(WIDEST)}")
        allowed = (*ORDER[key],) if key in ORDER else ("adapters", "full", "any")
        if wanted not in allowed:
            raise ConfigError(f"--{key} {wanted!r}: choose one of {', '.join(allowed)}")
        if key in recorded and not _narrows(key, recorded[key], wanted):
            raise ConfigError(
                f"{_flag(key, wanted)} would widen the constraints recorded in {source} ({key} {recorded[key]}): "
                "retain tune never searches outside them",
                hint=f"drop {_flag(key, wanted)}, or edit `constraints: {key}:` in {source} if they changed",
            )
        values[key] = wanted
    return check_consistent(Constraints(tasks=tasks, **values))  # type: ignore[arg-type]


def recorded_constraints(c: Constraints) -> dict[str, str]:
    """The ``constraints:`` block of a run YAML (the number of tasks is the run's own)."""
    return {"compute": c.compute, "privacy": c.privacy, "stakes": c.stakes, "weights": c.weights}


@dataclass(frozen=True)
class Effect:
    points: int
    reason: str
    excludes: bool = False


def exclude(reason: str) -> list[Effect]:
    return [Effect(0, reason, excludes=True)]


Rule = Callable[[Hybrid, Constraints], list[Effect]]


def privacy_rule(h: Hybrid, c: Constraints) -> list[Effect]:
    """Strict privacy: nothing that keeps real examples; no-data methods move up."""
    if c.privacy != "strict":
        return []
    if stores_real_data(h):
        return exclude("privacy strict: replay keeps real training examples in its buffer and checkpoints")
    effects = []
    if "synthetic-replay" in h.names:
        effects.append(Effect(1, "privacy strict → synthetic-replay: rehearses text the base model wrote, keeps no real data"))
    if "lwf" in h.names:
        effects.append(Effect(1, "privacy strict → lwf: distils the model's own outputs, stores no examples"))
    if {"prompt-tuning", "progressive-prompts"} & set(h.names):
        effects.append(Effect(1, "privacy strict → soft prompts: the base model is untouched and no data is kept"))
    return effects


def stakes_rule(h: Hybrid, c: Constraints) -> list[Effect]:
    """High stakes: a function-preserving method is mandatory."""
    if c.stakes != "high":
        return []
    if not preserves_function(h):
        return exclude("stakes high: needs a function-preserving method (lwf or fip); this hybrid has neither")
    method = "fip" if "fip" in h.names else "lwf"
    why = {"fip": "keeps the output distributions on general text along the whole path",
           "lwf": "distils the original model's outputs, so behaviour on general text stays put"}[method]
    return [Effect(2, f"stakes high → {method}: {why}")]


def compute_rule(h: Hybrid, c: Constraints) -> list[Effect]:
    """Low compute: adapters only (full fine-tuning is ruled out), no frozen copy, no extra pass;
    high compute: full weights are affordable."""
    adapters, memory, extra = uses_adapters(h), memory_in_models(h), extra_passes(h)
    if c.compute == "low":
        if "osf" in h.names:
            return exclude("compute low: osf trains the low half of every weight's singular subspace, about as many "
                           "parameters (and optimizer state) as full fine-tuning")
        if holds_frozen_copy(h):
            return exclude("compute low: holds a frozen copy of the whole model "
                           f"({'fip anchor' if 'fip' in h.names else 'lwf teacher'})")
        if not adapters:
            return exclude(f"compute low: full fine-tuning needs ≈{memory:g}× the model's weights in memory")
        effects = [Effect(2, "compute low → adapters: only a small fraction of the weights train, "
                             "no gradients or optimizer state for the base")]
        if "lwf" in h.names and lwf_teacher(h) in ("adapters_off", "cached_topk"):
            effects.append(Effect(0, f"compute low → lwf teacher {lwf_teacher(h)}: no second model in memory"))
        if extra >= 1:
            effects.append(Effect(-1, f"compute low: ≈{1 + extra:.1f}× the work per step (a second batch each step)"))
        if {"ewc-lora", "importance"} & set(h.names):
            effects.append(Effect(1, "compute low → cheap penalty: one importance pass, no extra forward per step"))
        return effects
    if c.compute == "medium":
        effects = []
        if adapters:
            effects.append(Effect(1, "compute medium → adapters: cheaper per step, base weights kept"))
        if holds_frozen_copy(h):
            effects.append(Effect(-1, "compute medium: holds a frozen copy of the model"))
        return effects
    if not adapters:
        return [Effect(1, f"compute high → full weights: room for ≈{memory:g}× the weights; most capacity to learn")]
    return []


def weights_rule(h: Hybrid, c: Constraints) -> list[Effect]:
    """What the user must ship: adapters, or a fully fine-tuned model."""
    if c.weights == "adapters" and not uses_adapters(h):
        return exclude("--adapters: this hybrid trains the full weights")
    if c.weights == "full" and uses_adapters(h):
        return exclude("--full-weights: this hybrid trains adapters or soft prompts")
    return []


def tasks_rule(h: Hybrid, c: Constraints) -> list[Effect]:
    """Sequence methods need a sequence; with one, they add nothing."""
    needed = min_tasks(h)
    if c.tasks < needed:
        return exclude(f"tasks {c.tasks}: built for sequences of {needed} or more tasks")
    if c.tasks >= 2 and ({"o-lora", "progressive-prompts", "ewc-lora"} & set(h.names)):
        return [Effect(1, f"tasks {c.tasks} → built for sequences: keeps each finished task's update apart")]
    return []


def method_notes(h: Hybrid, c: Constraints) -> list[Effect]:
    """What a method needs that no constraint decides (no points): wise's choice on the suite, corda's
    calibration text. (MoFO is not suggested on top of every full-weight hybrid: ``full+mofo`` is a
    catalogue hybrid and competes on its own evidence, which on stories-contracts is small.)"""
    notes = []
    if "wise" in h.names and "alpha" not in h.params("wise"):
        notes.append(Effect(0, "wise → after each task the update is scaled back by the alpha that keeps "
                               f"{h.params('wise').get('min_gain_share', 0.95)} of its gain with the most general "
                               "ability on the suite's select part (needs eval.suite; one select-part evaluation per alpha)"))
    if h.params("lora").get("init") == "corda":
        notes.append(Effect(0, "lora.init corda → calibrates on the run's general_data (a few dozen examples, one "
                               "forward each) before training"))
    return notes


RULES: tuple[Rule, ...] = (privacy_rule, stakes_rule, compute_rule, weights_rule, tasks_rule, method_notes)


#: a hybrid "learned" on the benchmark when its gain is at least this share of the best hybrid's gain
LEARNED_SHARE = 1 / 3


def evidence_effects(row: EvidenceRow | None, c: Constraints, evidence: Evidence | None) -> list[Effect]:
    """Measured results move a hybrid up when it kept the retention floor and learned (at least a third
    of the best gain in the table), and down when it lost more than the floor allows or barely learned
    (its default strength holds the model too tightly for this budget)."""
    if row is None or row.general_retention is None:
        return []
    where = evidence.where() if evidence is not None else "the benchmark"
    kept = f"{row.general_retention:.1%} of general ability on {where}"
    if row.general_retention < c.retention_floor:
        return [Effect(-1, f"evidence: kept only {kept} (< {c.retention_floor:.0%})")]
    best = evidence.best_gain() if evidence is not None else None
    gain = row.new_task_gain
    if gain is not None and best is not None and best > 0 and gain < LEARNED_SHARE * best:
        return [Effect(-1, f"evidence: kept {kept} but learned little at default strength "
                           f"(new-task gain {gain:+.3f}, best {best:+.3f}); retain tune searches the strength")]
    return [Effect(1, f"evidence: kept {kept} (≥ {c.retention_floor:.0%})"
                      + (f" and gained {gain:+.3f} on the new task" if gain is not None else ""))]


@dataclass
class Recommendation:
    hybrid: Hybrid
    points: int
    reasons: list[str]
    evidence: EvidenceRow | None = None
    excluded_by: list[str] = field(default_factory=list)

    @property
    def excluded(self) -> bool:
        return bool(self.excluded_by)


def assess(h: Hybrid, c: Constraints, evidence: Evidence | None = None) -> Recommendation:
    """Every rule's effect on one hybrid."""
    effects = [e for rule in RULES for e in rule(h, c)]
    row = evidence.row(h.key) if evidence is not None else None
    effects += evidence_effects(row, c, evidence)
    return Recommendation(
        hybrid=h,
        points=sum(e.points for e in effects if not e.excludes),
        reasons=[e.reason for e in effects if not e.excludes],
        evidence=row,
        excluded_by=[e.reason for e in effects if e.excludes],
    )


def _sort_key(r: Recommendation, c: Constraints) -> tuple:
    """Points first; among equals, measured hybrids that kept the floor by gain, then those that did not
    by how much they kept (closest to the floor first), then unmeasured ones; then the simpler one."""
    row = r.evidence
    measured = row is not None and row.general_retention is not None
    meets = measured and row.general_retention >= c.retention_floor  # type: ignore[union-attr, operator]
    gain = row.new_task_gain if row is not None and row.new_task_gain is not None else float("-inf")
    then = -gain if meets else (-row.general_retention if measured else float("inf"))  # type: ignore[union-attr]
    return (-r.points, 0 if meets else (1 if measured else 2), then, len(r.hybrid.names), r.hybrid.key)


def rank(
    c: Constraints, evidence: Evidence | None = None, catalogue: tuple[Hybrid, ...] = CATALOGUE
) -> tuple[list[Recommendation], list[Recommendation]]:
    """(allowed hybrids best first, excluded hybrids with the rule that excluded each)."""
    assessed = [assess(h, c, evidence) for h in catalogue]
    allowed = sorted((r for r in assessed if not r.excluded), key=lambda r: _sort_key(r, c))
    return allowed, [r for r in assessed if r.excluded]


def recommend(c: Constraints, evidence: Evidence | None = None, alternatives: int = 2) -> list[Recommendation]:
    """The recommended hybrid first, then up to ``alternatives`` others."""
    allowed, _ = rank(c, evidence)
    return allowed[: 1 + alternatives]


def ladder(c: Constraints) -> list[Hybrid]:
    """The prototyping path as far as the constraints allow: start with LoRA, check general ability,
    then add distillation, then a little rehearsal (synthetic when privacy forbids real data), then
    switch to fip; full-weight rungs last, for when adapters cannot reach the retention floor."""
    rehearsal = "synthetic-replay" if c.privacy == "strict" else "replay"
    lwf = "@lwf.anchor=general@lwf.teacher=adapters_off"
    keys = ["lora", f"lora+lwf{lwf}", f"lora+lwf+{rehearsal}{lwf}", "lora+fip",
            "full+lwf@lwf.anchor=general@lwf.teacher=cached_topk", "full+fip"]
    by_key = {h.key: h for h in CATALOGUE}
    rungs = [by_key[k] for k in keys]
    allowed = {r.hybrid.key for r in rank(c)[0]}
    return [h for h in rungs if h.key in allowed]
