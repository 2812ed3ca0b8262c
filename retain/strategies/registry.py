"""Strategies registered by name; every module in this package is discovered, so a new method is
one new file with one ``@register_strategy`` line and no edit anywhere else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from pydantic import ValidationError

from retain.config import closest_name, use_strategy_path_keys
from retain.errors import ConfigError
from retain.registry import Registry

if TYPE_CHECKING:
    from retain.config import RunConfig, StrategySpec
    from retain.strategies.base import Strategy


def _take_name(name: str, cls: type["Strategy"]) -> None:
    """A strategy knows its registered name (results, errors and hybrids refer to it by that name), and
    the facts it declares must hold (as PEFT's ``register_peft_method`` checks a tuner's prefix)."""
    problems = cls.declaration_problems()
    if problems:
        raise TypeError(f"strategy '{name}' ({cls.__module__}): " + "; ".join(problems))
    cls.name = name


def strategy_path_keys(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input, output) path keys the strategy ``name`` declares; none for an unknown name (the config's
    validation names that mistake)."""
    cls = STRATEGIES.find(name)
    return (cls.input_path_keys, cls.output_path_keys) if cls is not None else ((), ())


#: Every strategy by name. The package's modules other than base, registry and compose (infrastructure)
#: are imported on the first read. ``_REGISTRY`` is the old name; tests ``pop`` their temporary strategies.
STRATEGIES: Registry[type["Strategy"]] = Registry(
    "strategy", package="retain.strategies", exclude={"base", "registry", "compose"}, validate=_take_name
)
_REGISTRY = STRATEGIES
use_strategy_path_keys(strategy_path_keys)  # the config resolves and protects the paths strategies declare

S = TypeVar("S", bound=type["Strategy"])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a strategy available by ``name`` in configs and on the CLI."""
    return STRATEGIES.register(name)  # type: ignore[return-value]  # returns the class it was given


def _discover() -> None:
    STRATEGIES.discover()


def available_strategies() -> list[str]:
    return STRATEGIES.names()


def get_strategy_class(name: str) -> type["Strategy"]:
    return STRATEGIES.get(name)


def build_strategy(name: str, params: dict[str, Any], where: str = "strategies") -> "Strategy":
    cls = get_strategy_class(name)
    try:
        config = cls.Config.model_validate(params)
    except ValidationError as err:
        problems = []
        valid = list(cls.Config.model_fields)
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                hint = closest_name(str(e["loc"][-1]), valid)
                problems.append(
                    f"unknown key '{where}.{key}'" + (f"; did you mean '{hint}'?" if hint else "")
                    + f"; valid keys for '{name}': {', '.join(valid) or '(none)'}"
                )
            else:
                problems.append(f"'{where}.{key}': {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"strategy '{name}':\n  " + "\n  ".join(problems)) from None
    return cls(config)


def build_strategies(specs: list["StrategySpec"]) -> list["Strategy"]:
    strategies = [build_strategy(s.name, s.params, f"strategies[{i}]") for i, s in enumerate(specs)]
    check_compatible(strategies)
    return strategies


def check_compatible(strategies: list["Strategy"]) -> None:
    """Refuse duplicates and pairs that both wrap the model without declaring they fit together."""
    names = [s.name for s in strategies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"strategy listed twice: {', '.join(dupes)}. List each strategy once.")
    wrappers = [s for s in strategies if s.wraps_model]
    for i, a in enumerate(wrappers):
        for b in wrappers[i + 1 :]:
            if b.name not in a.compatible_with and a.name not in b.compatible_with:
                raise ConfigError(
                    f"strategies '{a.name}' and '{b.name}' both decide which parameters train or wrap the "
                    f"model, and neither declares it works with the other. Keep one of them "
                    f"(e.g. '{a.name}+<regularizer>' or '{b.name}+<regularizer>')."
                )


def requirement_problems(strategies: list["Strategy"], config: "RunConfig") -> list[str]:
    """Every unmet need of every strategy in ``config`` (companions, tasks, text), one line each, prefixed
    with the strategy's key path, e.g. ``strategies[1] (lwf): anchor: general needs text: ...``."""
    names = [s.name for s in strategies]
    problems = []
    for index, strategy in enumerate(strategies):
        where = f"strategies[{index}]"
        found = []
        for needed in sorted(strategy.needs_strategies):
            if needed not in names:
                found.append(f"list it with {needed}, e.g. strategies: [{needed}, {strategy.name}]")
        if len(config.tasks) < strategy.min_tasks:
            found.append(
                f"it works across a sequence of tasks and needs at least {strategy.min_tasks}; this run has "
                f"{len(config.tasks)}. Add tasks, or use a single-task strategy"
            )
        found += strategy.requirements(config, where)
        problems += [f"{where} ({strategy.name}): {message}" for message in found]
    return problems


def check_requirements(strategies: list["Strategy"], config: "RunConfig") -> None:
    """Refuse the run with one error listing every unmet need (see ``requirement_problems``)."""
    problems = requirement_problems(strategies, config)
    if problems:
        raise ConfigError("strategies miss what they need:\n  " + "\n  ".join(problems))


def validate_run_config(config: "RunConfig", source: str = "the run config") -> list["Strategy"]:
    """Build the run's strategies from its config (parameters, compatibility) and check what each needs
    from the run (companion strategies, tasks, general text): every config mistake a strategy can see is
    refused here, before a model is loaded."""
    try:
        strategies = build_strategies(config.strategies)
        check_requirements(strategies, config)
        return strategies
    except ConfigError as err:
        raise ConfigError(f"invalid config in {source}: {err}", hint=err.hint) from None
