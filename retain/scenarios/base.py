"""What a scenario provides: a base model, a task sequence, a general pool and an eval suite."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from retain.config import DataConfig, TaskConfig
from retain.eval.suite import SuiteConfig
from retain.registry import Registry


@dataclass
class Scenario:
    """Everything a benchmark needs to compare strategies from the same start.

    ``general_data`` is the pool strategies may replay or anchor on; it is disjoint from every text
    the suite scores (each scenario documents its split).
    """

    name: str
    base_model: str
    tasks: list[TaskConfig]
    suite: SuiteConfig
    general_data: DataConfig | None
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    inputs: list[str] = field(default_factory=list)  # data folders it reads: a bench --out must not touch them
    threads: int | None = None  # CPU threads to train and evaluate on (None: torch's default); fixed => same numbers


Builder = Callable[..., Scenario]

#: Scenario builders by name. Each scenario module registers its builder with ``@register_scenario``;
#: the modules are imported on the first read, so this module never imports them (they import it).
SCENARIOS: Registry[Builder] = Registry("scenario", package="retain.scenarios", exclude={"base", "bench"})


def register_scenario(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make a builder (keyword options -> ``Scenario``) available as ``name``."""
    return SCENARIOS.register(name)


def scenario_names() -> list[str]:
    return SCENARIOS.names()


def get_scenario(name: str, **options: Any) -> Scenario:
    return SCENARIOS.get(name)(**options)


def default_data_dir() -> Path | None:
    """``../shared/data`` beside the current directory or the package checkout, or RETAIN_DATA_DIR."""
    import os

    candidates = []
    if os.environ.get("RETAIN_DATA_DIR"):
        candidates.append(Path(os.environ["RETAIN_DATA_DIR"]))
    candidates += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)
