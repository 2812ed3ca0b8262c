"""The hybrids the guide chooses among, and the facts about each that the rules reason with.

A :class:`Hybrid` is a list of strategies with the few settings that make it what it is (the lwf
teacher that avoids a model copy, distillation on general text), written as a ``retain bench`` item
(``lora+lwf@lwf.anchor=general@lwf.teacher=adapters_off``) so the evidence table and the benchmark
name it the same way. Strength values are *not* fixed here: they come from each strategy's own
defaults and declared :class:`~retain.strategies.base.Strength` range, which ``retain tune`` searches.

Every fact is read from the strategy classes, which declare them (``peft_wrapper``, ``min_tasks``,
``preserves_function``, ``quadratic_state``, ``stores_real_data``, ``extra_passes``,
``holds_model_copy``, ``strength``): a new strategy needs no line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retain.strategies.base import Strategy, StrategyConfig
from retain.strategies.registry import get_strategy_class


@dataclass(frozen=True)
class Hybrid:
    """Strategies (in order) with the settings that define this hybrid, plus one line on what it is for."""

    specs: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    summary: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.specs)

    @property
    def label(self) -> str:
        """The strategies joined by ``+`` (``lora+lwf``), for tables."""
        return "+".join(self.names)

    @property
    def key(self) -> str:
        """The ``retain bench`` item that trains exactly this hybrid (and names it in the evidence table)."""
        settings = "".join(f"@{name}.{k}={_scalar(v)}" for name, params in self.specs for k, v in params)
        return self.label + settings

    def params(self, name: str) -> dict[str, Any]:
        return next((dict(p) for n, p in self.specs if n == name), {})

    def strategy_list(self) -> list[dict[str, Any]]:
        """The ``strategies:`` entries of a run config."""
        return [{"name": name, **dict(params)} for name, params in self.specs]


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def hybrid(item: str, summary: str) -> Hybrid:
    """``'lora+lwf@lwf.anchor=general'`` -> a Hybrid (settings as ``strategy.key=value``)."""
    head, *settings = item.split("@")
    names = head.split("+")
    params: dict[str, dict[str, Any]] = {name: {} for name in names}
    for setting in settings:
        path, value = setting.split("=", 1)
        name, key = path.rsplit(".", 1)
        params[name][key] = value
    return Hybrid(tuple((name, tuple(params[name].items())) for name in names), summary)


CATALOGUE: tuple[Hybrid, ...] = (
    hybrid("lora", "LoRA alone: the cheapest start; limits how many weights move, not which functions change"),
    hybrid("lora+lwf@lwf.anchor=general@lwf.teacher=adapters_off",
           "LoRA + distillation on general text from the model with adapters off (no copy in memory)"),
    hybrid("lora+fip", "LoRA + functionally invariant paths: keeps output distributions on a general pool"),
    hybrid("lora+ewc-lora", "LoRA + EWC on the full update BA, with its Fisher; cheap, adapters only"),
    hybrid("lora+replay", "LoRA + a small share of stored general/past examples in every batch"),
    hybrid("lora+lwf+replay@lwf.anchor=general@lwf.teacher=adapters_off",
           "LoRA + distillation + a little rehearsal: the production hybrid"),
    hybrid("lora+synthetic-replay", "LoRA + rehearsal of examples the base model wrote itself (no real data kept)"),
    hybrid("lora+lwf+synthetic-replay@lwf.anchor=general@lwf.teacher=adapters_off",
           "LoRA + distillation + synthetic rehearsal: the production hybrid without stored data"),
    hybrid("prompt-tuning", "a soft prompt only; the base model is untouched"),
    hybrid("o-lora", "a fresh LoRA per task, orthogonal to earlier ones"),
    hybrid("progressive-prompts", "a new soft prompt per task, earlier ones frozen"),
    hybrid("full", "every weight trains: the most capacity, the most forgetting"),
    hybrid("full+lwf@lwf.anchor=general@lwf.teacher=copy",
           "full fine-tuning + distillation from a frozen copy of the original model"),
    hybrid("full+lwf@lwf.anchor=general@lwf.teacher=cached_topk",
           "full fine-tuning + distillation from the original's top-k outputs, cached on disk (no copy)"),
    hybrid("full+fip", "full fine-tuning + functionally invariant paths (holds one copy of the weights)"),
    hybrid("full+ewc", "full fine-tuning + diagonal-Fisher penalty (EWC)"),
    hybrid("full+importance", "full fine-tuning + element-wise importance penalty (one cheap pass)"),
    hybrid("full+replay", "full fine-tuning + a small share of stored examples in every batch"),
    hybrid("full+lwf+replay@lwf.anchor=general@lwf.teacher=copy",
           "full fine-tuning + distillation + a little rehearsal"),
    hybrid("lora@lora.init=milora", "LoRA started on each weight's minor singular directions (MiLoRA): "
           "the principal ones the model relies on stay in the frozen base"),
    hybrid("lora@lora.init=corda", "LoRA started on the directions general text uses least (CorDA, "
           "knowledge-preserving mode, calibrated on general text)"),
    hybrid("lora@lora.init=pissa", "LoRA started on each weight's principal singular directions (PiSSA): "
           "learns fastest of the adapters, and moves what the model relies on"),
    hybrid("osf", "orthogonal subspace fine-tuning: the top singular directions frozen, the rest trains "
           "orthogonal to them"),
    hybrid("lora+wise", "LoRA, then its update scaled back (WiSE-FT) by the alpha chosen on the select part"),
    hybrid("block-expansion", "new identity blocks train, every original weight frozen (LLaMA Pro)"),
    hybrid("full+mofo", "full fine-tuning that moves only the top share of each weight matrix by momentum per "
           "step (MoFO): closer to the base at no extra compute and no data"),
    hybrid("full+dft", "full fine-tuning with each token's loss weighted by the model's own probability (DFT)"),
    hybrid("full+replay+wise", "full fine-tuning + rehearsal, then interpolated toward the base (WiSE-FT) "
           "by the alpha chosen on the select part"),
    hybrid("full+replay+lwf@replay.mode=append@lwf.anchor=replay",
           "full fine-tuning + rehearsal distilled from the original on the replayed rows (DER)"),
    hybrid("full+lwf+replay+wise@lwf.anchor=general@lwf.teacher=copy",
           "full fine-tuning + distillation + rehearsal, then interpolated toward the base (WiSE-FT)"),
    hybrid("full+replay@replay.mode=append@replay.ratio=0.5",
           "joint training: every task row kept and one general row added per task row (twice the rows per step)"),
    hybrid("full+replay+lwf@replay.mode=append@replay.ratio=0.5@lwf.anchor=replay",
           "joint training distilled from the original on the general rows (DER at 1:1): the most general "
           "ability a full-weight hybrid kept on the benchmark, for less of the gain"),
)


def display_name(h: Hybrid, catalogue: tuple[Hybrid, ...] = CATALOGUE) -> str:
    """The label, plus the settings that tell it apart from catalogue entries with the same label
    (``full+lwf(teacher=cached_topk)``)."""
    twins = [o for o in catalogue if o.label == h.label and o.key != h.key]
    if not twins:
        return h.label
    mine = {(n, k, v) for n, params in h.specs for k, v in params}
    shared = set.intersection(*({(n, k, v) for n, params in o.specs for k, v in params} for o in twins))
    differ = sorted(mine - shared)
    return h.label + ("(" + ",".join(f"{k}={v}" for _, k, v in differ) + ")" if differ else "")


def find_hybrid(key: str, catalogue: tuple[Hybrid, ...] = CATALOGUE) -> Hybrid:
    """The catalogue entry with this key or label (the first one with that label)."""
    for entry in catalogue:
        if entry.key == key:
            return entry
    for entry in catalogue:
        if entry.label == key:
            return entry
    raise KeyError(key)


# --- facts ---------------------------------------------------------------------------------------


def uses_adapters(h: Hybrid) -> bool:
    """Trains adapters or soft prompts (peft) instead of the model's own weights."""
    return any(get_strategy_class(name).peft_wrapper for name in h.names)


def _members(h: Hybrid) -> list[tuple[type[Strategy], StrategyConfig]]:
    """Each strategy class of ``h`` with its config as the hybrid sets it (the rest at defaults)."""
    found = []
    for name in h.names:
        cls = get_strategy_class(name)
        found.append((cls, cls.Config.model_validate(h.params(name))))
    return found


def stores_real_data(h: Hybrid) -> bool:
    """Keeps real training examples, or (synthetic replay) real demonstrations taken from the data."""
    return any(cls.stores_real_data(config) for cls, config in _members(h))


def preserves_function(h: Hybrid) -> bool:
    return any(cls.preserves_function for cls in map(get_strategy_class, h.names))


def lwf_teacher(h: Hybrid) -> str | None:
    """Where lwf's teacher outputs come from in this hybrid (``auto`` resolved as lwf does)."""
    for cls, config in _members(h):
        if cls.name == "lwf":
            return cls.teacher_source(config, adapters=uses_adapters(h))  # type: ignore[attr-defined]
    return None


def holds_frozen_copy(h: Hybrid) -> bool:
    """Holds a second copy of the model's weights while training (lwf's ``copy`` teacher, fip's anchor
    when every weight trains)."""
    adapters = uses_adapters(h)
    return any(cls.holds_model_copy(config, adapters=adapters) for cls, config in _members(h))


def min_tasks(h: Hybrid) -> int:
    return max(get_strategy_class(name).min_tasks for name in h.names)


def memory_in_models(h: Hybrid) -> float:
    """Training memory in units of the model's weights (fp32 AdamW), a rough guide for the reasons:
    weights 1; full training adds gradients 1 + Adam moments 2; a frozen copy 1; a quadratic
    penalty over all weights 2 (anchor + importance). Adapters, prompts and their state count ~0."""
    adapters = uses_adapters(h)
    total = 1.0 if adapters else 4.0
    if holds_frozen_copy(h):
        total += 1.0
    if any(get_strategy_class(name).quadratic_state for name in h.names) and not adapters:
        total += 2.0
    return total


def extra_passes(h: Hybrid) -> float:
    """Extra work per step relative to plain training (one forward+backward = 1, one forward = 1/3), as
    each strategy declares it for its settings."""
    adapters = uses_adapters(h)
    return sum(cls.extra_passes(config, adapters=adapters) for cls, config in _members(h))
