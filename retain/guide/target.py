"""What ``retain tune`` trains: a user's run YAML or a built-in scenario, one trial config at a time.

Both become the same thing: a base run config (model, tasks, general data, train settings), the eval
suite that scores every trial, and the user's own strategy settings (a trial keeps ``r: 16`` for lora if
the user's run set it, and changes only the hybrid and its strengths).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retain.config import RunConfig, load_config_dict
from retain.errors import ConfigError
from retain.eval.suite import SuiteConfig, load_suite
from retain.guide.catalogue import Hybrid
from retain.guide.space import fill_from_run, strategy_specs
from retain.strategies.registry import validate_run_config


@dataclass
class TuneTarget:
    name: str
    scenario: str | None
    base: dict[str, Any]
    suite: SuiteConfig
    own: dict[str, dict[str, Any]] = field(default_factory=dict)
    general_texts: list[str] = field(default_factory=list)
    source: Path | None = None
    #: the run YAML's ``constraints:`` (recorded by ``retain recommend``): a tune never searches outside them
    constraints: dict[str, str] | None = None

    @property
    def task_count(self) -> int:
        return len(self.base["tasks"])

    def trial_data(
        self, h: Hybrid, values: dict[str, float], out_dir: Path, steps: int | None, every: int, seed: int | None = None
    ) -> dict[str, Any]:
        """The run config (as a dict) of one trial: the hybrid with these strengths, its own folder, no
        checkpoints but the task ends, intermediate evals every ``every`` steps (0: none); ``seed``
        replaces ``train.seed`` (a confirmation's fresh seed)."""
        data = copy.deepcopy(self.base)
        if seed is not None:
            data["train"]["seed"] = seed
        data["strategies"] = fill_from_run(strategy_specs(h, values, self.own), self.general_texts)
        if steps is not None:
            data["train"]["steps_per_task"] = steps
            for task in data["tasks"]:
                task["steps"] = None
        data["train"]["progress"] = False
        data["eval"] = {**data.get("eval", {}), "every_n_steps": every, "suite": None}
        data["checkpoint"] = {"every": 0, "keep": 1}
        data["output"] = {**data.get("output", {}), "dir": str(out_dir), "save_per_task": False, "merge": False}
        return data

    def trial_config(
        self, h: Hybrid, values: dict[str, float], out_dir: Path, steps: int | None, every: int, seed: int | None = None
    ) -> RunConfig:
        source = f"tune trial of {h.key}"
        config = load_config_dict(self.trial_data(h, values, out_dir, steps, every, seed), source=source)
        validate_run_config(config, source)
        return config

    def problems(self, h: Hybrid) -> str | None:
        """Why this hybrid cannot run on this target (a missing general_data, ...), or None."""
        try:
            self.trial_config(h, {}, Path("unused"), None, 0)
        except ConfigError as err:
            return str(err).split(": ", 1)[-1]
        return None

    def best_data(
        self, strategies: list[dict[str, Any]], steps: int | None, folder: Path, seed: int | None = None
    ) -> dict[str, Any]:
        """A complete run config for ``retain train``: the trial's strategies, budget and seed, the
        target's own eval, checkpoint and output settings (a scenario's suite is written next to best.yaml)."""
        data = copy.deepcopy(self.base)
        data["strategies"] = strategies
        if seed is not None:
            data["train"]["seed"] = seed
        if steps is not None:
            data["train"]["steps_per_task"] = steps
            for task in data["tasks"]:
                task["steps"] = None
        data["train"]["progress"] = True
        if self.scenario is not None:
            data["eval"] = {**data.get("eval", {}), "suite": str((folder / "suite.yaml").resolve())}
            data["output"] = {**data.get("output", {}), "dir": str((folder / "best-run").resolve()), "save_per_task": False}
        else:
            data["output"] = {**data.get("output", {}), "dir": str(data["output"]["dir"]).rstrip("/") + "-tuned"}
        return data

    def write_suite(self, folder: Path) -> None:
        """A scenario's suite as a YAML beside best.yaml (absolute data paths), so best.yaml is complete."""
        from retain.io import atomic_write_text

        if self.scenario is not None:
            atomic_write_text(folder / "suite.yaml", yaml.safe_dump(self.suite.model_dump(mode="json"), sort_keys=False))


def _texts(config: RunConfig) -> list[str]:
    """A few general texts (for synthetic-replay prompts); none when the run has no general_data."""
    if config.general_data is None:
        return []
    from retain.data.records import load_records

    records = load_records(config.general_data)[:64]
    field_name = config.general_data.text_field
    return [str(r.get(field_name, "")) for r in records if r.get(field_name)]


def load_target(target: str, *, data_dir: Path | None = None, seed: int | None = None) -> TuneTarget:
    """A run YAML (a path that exists) or a scenario name. ``seed`` replaces the YAML's ``train.seed``
    only when given (None keeps it, so a tune trains as the run would); a scenario's default is 0."""
    from retain.scenarios.base import get_scenario, scenario_names

    path = Path(target)
    if path.is_file():
        from retain.train.run import load_run_config

        config = load_run_config(path)
        if not config.eval.suite:
            raise ConfigError(
                f"{path}: retain tune scores every trial with the run's eval suite; set eval.suite "
                "(a suite with a bounded score for the task and for general ability)"
            )
        base = config.model_dump(mode="json")
        if seed is not None:
            base["train"]["seed"] = seed
        own = {spec.name: spec.params for spec in config.strategies}
        recorded = None if config.constraints is None else config.constraints.model_dump()
        return TuneTarget(name=str(path), scenario=None, base=base, suite=load_suite(config.eval.suite), own=own,
                          general_texts=_texts(config), source=path.resolve(), constraints=recorded)
    if target not in scenario_names():
        raise ConfigError(
            f"retain tune: {target!r} is neither a run YAML nor a scenario ({', '.join(scenario_names())})"
        )
    from retain.scenarios.bench import build_run_config

    scenario = get_scenario(target, data_dir=data_dir)
    config = build_run_config(scenario, "full", Path("unused"), steps=None, seed=0 if seed is None else seed, shared={},
                              train_overrides={}, overrides=[], progress=False)
    return TuneTarget(name=target, scenario=scenario.name, base=config.model_dump(mode="json"), suite=scenario.suite,
                      general_texts=_texts(config))
