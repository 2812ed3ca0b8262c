"""The search space of ``retain tune``, read from the strategies themselves.

Every strategy with a strength knob declares it (:class:`~retain.strategies.base.Strength`: the config
key, its sensible range, whether to search it in log space); its default is the strategy's own config
default. The same type is what the budget moves and the report labels. Nothing here repeats a range or a default, so when a strategy is retuned the search follows.
A parameter is named ``<strategy>.<key>`` and shared by every hybrid containing that strategy, so what
one trial learns about lwf's alpha informs the next hybrid with lwf.
"""

from __future__ import annotations

from typing import Any

from retain.guide.catalogue import Hybrid
from retain.strategies.base import Strength
from retain.strategies.registry import get_strategy_class


def knob(strategy: str) -> Strength | None:
    """The strategy's declared strength bound to its name and config default (clipped into the range), or None."""
    return Strength.of(get_strategy_class(strategy))


def knobs(h: Hybrid) -> list[Strength]:
    """The strengths a trial of ``h`` searches: those its fixed settings leave free."""
    found = []
    for name in h.names:
        k = knob(name)
        if k is not None and k.key not in h.params(name):
            found.append(k)
    return found


def all_knobs(hybrids: list[Hybrid]) -> dict[str, Strength]:
    """Every knob of every hybrid, by name (one per strategy)."""
    return {k.label: k for h in hybrids for k in knobs(h)}


def default_values(h: Hybrid) -> dict[str, float]:
    return {k.label: k.default for k in knobs(h)}


def strategy_specs(
    h: Hybrid, values: dict[str, float], own: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The ``strategies:`` list of a trial: the user's own settings for a strategy (``own``), then the
    hybrid's fixed settings, then the searched strengths (``values`` by knob name)."""
    specs = []
    for name in h.names:
        spec: dict[str, Any] = {"name": name, **(own or {}).get(name, {}), **h.params(name)}
        k = knob(name)
        if k is not None and k.label in values:
            spec[k.key] = float(values[k.label])
        specs.append(spec)
    return specs


def general_prompts(texts: list[str], count: int = 8, words: int = 4) -> list[str]:
    """Openings of general texts (their first ``words`` words), as prompts for the base model to continue."""
    prompts = []
    for text in texts:
        opening = " ".join(str(text).split()[:words])
        if opening and opening not in prompts:
            prompts.append(opening)
        if len(prompts) == count:
            break
    return prompts


def fill_from_run(specs: list[dict[str, Any]], general_texts: list[str]) -> list[dict[str, Any]]:
    """Give synthetic-replay something to write from when the user's run did not: openings of the general
    text as prompts (never the task's own examples, which would keep real data)."""
    filled = []
    for spec in specs:
        spec = dict(spec)
        if spec["name"] == "synthetic-replay" and not (
            spec.get("prompts") or spec.get("tasks") or spec.get("demonstrations_from_data")
        ):
            prompts = general_prompts(general_texts)
            if prompts:
                spec["prompts"] = prompts
        filled.append(spec)
    return filled
