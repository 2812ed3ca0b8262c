"""What a scenario provides: a base model, a task sequence, a general pool and an eval suite."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from retain.config import DataConfig, TaskConfig
from retain.errors import ConfigError
from retain.eval.suite import SuiteConfig


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


Builder = Callable[..., Scenario]


def _builders() -> dict[str, Builder]:
    from retain.scenarios.stories_contracts import build_stories_contracts
    from retain.scenarios.synthetic import build_synthetic

    return {"synthetic": build_synthetic, "stories-contracts": build_stories_contracts}


def scenario_names() -> list[str]:
    return sorted(_builders())


def get_scenario(name: str, **options: Any) -> Scenario:
    builders = _builders()
    if name not in builders:
        raise ConfigError(f"unknown scenario '{name}'. Available: {', '.join(sorted(builders))}")
    return builders[name](**options)


def default_data_dir() -> Path | None:
    """``../shared/data`` beside the current directory or the package checkout, or RETAIN_DATA_DIR."""
    import os

    candidates = []
    if os.environ.get("RETAIN_DATA_DIR"):
        candidates.append(Path(os.environ["RETAIN_DATA_DIR"]))
    candidates += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)
