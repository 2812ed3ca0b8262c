"""Compare strategies on one scenario: same base model, seed, data order and step budget for each.

Strategy items: ``full``, ``lora+lwf+stm`` (a hybrid), and per-item parameters after ``@``:
``full+ewc@ewc.lambda_=100`` (``strategy.param=value``, or ``param=value`` for every strategy of the
item that has that parameter). Settings shared by all items come from a YAML file (``--config``:
``strategies: {ewc: {lambda_: 100}}`` and ``train: {...}``) or ``--set strategies.ewc.lambda_=100`` /
``--set train.lr=1e-3``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from retain.config import load_config_dict, parse_override, parse_value, read_yaml, resolve_relative_paths
from retain.errors import ConfigError, GateError, RetainError
from retain.io_lock import writing_to
from retain.models.runtime import torch_threads
from retain.eval.budget import budget_problems
from retain.eval.overlap import overlap_guard
from retain.io import SAFE_NAME_MAX, check_safe_name, empty_folder, folder_entries, inside, prepare_output, refuse_inputs
from retain.results.aggregate import aggregate_seeds
from retain.results.schema import Results, StrategyRun
from retain.scenarios.base import Scenario, get_scenario
from retain.strategies.registry import get_strategy_class, validate_run_config


def parse_item(item: str) -> list[dict[str, Any]]:
    """``'full+ewc@ewc.lambda_=100'`` -> ``[{'name': 'full'}, {'name': 'ewc', 'lambda_': 100}]``."""
    head, *assignments = item.strip().split("@")
    specs: list[dict[str, Any]] = [{"name": n.strip()} for n in head.split("+") if n.strip()]
    if not specs:
        raise ConfigError(f"strategy item '{item}' names no strategy")
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"strategy item '{item}': '@{assignment}' should be @strategy.param=value")
        key, raw = assignment.split("=", 1)
        value = parse_value(raw)
        strategy, _, param = key.rpartition(".")
        targets = [s for s in specs if s["name"] == strategy] if strategy else [
            s for s in specs if param in get_strategy_class(s["name"]).Config.model_fields
        ]
        if not targets:
            raise ConfigError(f"strategy item '{item}': no strategy in it takes '{key}'")
        for spec in targets:
            spec[param] = value
    return specs


def _split_sets(sets: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``strategies.<name>.<param>=v`` go to every run using that strategy; the rest are config overrides."""
    per_strategy: dict[str, dict[str, Any]] = {}
    others = []
    for item in sets:
        parts, value = parse_override(item)
        if parts[0] == "strategies" and len(parts) == 3 and isinstance(parts[1], str):
            per_strategy.setdefault(parts[1], {})[str(parts[2])] = value
        else:
            others.append(item)
    return per_strategy, others


def read_bench_config(path: Path) -> dict[str, Any]:
    """A ``--config`` YAML (``strategies: {name: {param: v}}``, ``train: {...}``); strategy paths (``data``,
    ``file``, ``reuse_dir``, ``output_dir``) resolve against its folder, as in a run YAML."""
    path = Path(path)
    data = read_yaml(path, "bench config") or {}
    strategies = data.get("strategies") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(strategies or {}, dict) or not isinstance(data.get("train") or {}, dict):
        raise ConfigError(f"{path}: expected a mapping with strategies: {{name: {{param: value}}}} and train: {{...}}")
    specs = [{"name": name, **params} for name, params in (strategies or {}).items() if isinstance(params, dict)]
    resolve_relative_paths({"strategies": specs}, path.absolute().parent)
    data["strategies"] = {spec.pop("name"): spec for spec in specs}
    return data


def run_directory_name(item: str) -> str:
    """The folder name of a bench item's run (``full+ewc@ewc.lambda_=100`` -> ``full_ewc_ewc.lambda_100``):
    a safe name (``retain.io.unsafe_name_problem``); a long item keeps its start and a hash of the whole."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.strip()).lstrip(".") or "item"
    if len(name) > SAFE_NAME_MAX:
        name = f"{name[: SAFE_NAME_MAX - 13]}-{hashlib.sha256(item.encode()).hexdigest()[:12]}"
    return check_safe_name(name)


def build_run_config(
    scenario: Scenario,
    item: str,
    out: Path,
    *,
    steps: int | None,
    seed: int,
    shared: dict[str, dict[str, Any]],
    train_overrides: dict[str, Any],
    overrides: list[str],
    progress: bool,
    seed_folder: bool = False,
) -> Any:
    specs = [{**shared.get(s["name"], {}), **s} for s in parse_item(item)]
    train = {**scenario.train, **train_overrides, "seed": seed, "progress": progress}
    if steps is not None:
        train["steps_per_task"] = steps
    data = {
        "model": {"name_or_path": scenario.base_model},
        "tasks": [t.model_dump(mode="json") for t in scenario.tasks],
        "strategies": specs,
        "general_data": scenario.general_data.model_dump(mode="json") if scenario.general_data else None,
        "train": train,
        "checkpoint": {"every": 0},
        "output": {"dir": str(inside(out, "runs", run_directory_name(item), *([f"seed-{seed}"] if seed_folder else []))),
                   "save_per_task": False},
    }
    source = f"bench item '{item}'"
    config = load_config_dict(data, overrides, source=source)
    validate_run_config(config, source)
    if config.budget is not None:  # --set budget.min_general_retention=0.95: measured on the scenario's suite
        problems = budget_problems(config.budget, scenario.suite, [t.name for t in config.tasks], f"the {scenario.name} suite")
        if problems:
            raise ConfigError(f"invalid config in {source}:\n  " + "\n  ".join(problems))
    return config


BENCH_OUTPUTS = frozenset({"results.json", "report.html", "runs"})


def holds_only_earlier_results(out: Path, scenario: str) -> bool:
    """Whether ``out`` holds nothing but what an earlier bench of the same scenario wrote there, so that
    running the same command again (the README's ``retain demo``) replaces its own results while any
    folder with something else in it still needs ``--overwrite``."""
    if not out.is_dir() or not (out / "results.json").is_file():
        return False
    if not {p.name for p in folder_entries(out)} <= BENCH_OUTPUTS:
        return False
    try:
        return Results.load(out / "results.json").scenario == scenario
    except RetainError:
        return False


def _finished_run(config: Any) -> StrategyRun | None:
    """The run an earlier bench finished in ``config.output.dir`` with exactly this config, else None."""
    path = Path(config.output.dir) / "results.json"
    if not path.is_file():
        return None
    try:
        run = Results.load(path).runs[0]
    except (RetainError, IndexError):
        return None
    return run if run.config == config.model_dump(mode="json") else None


def _interrupted_run(config: Any) -> bool:
    """``config.output.dir`` holds checkpoints of an unfinished run of exactly this config (an earlier bench
    was stopped in it): it is resumed, not trained again."""
    from retain.train.checkpoint import latest_checkpoint

    run_dir = Path(config.output.dir)
    if not (run_dir / "config.yaml").is_file() or latest_checkpoint(run_dir) is None:
        return False
    try:
        return read_yaml(run_dir / "config.yaml", "run config") == config.model_dump(mode="json")
    except RetainError:
        return False


def run_bench(
    scenario: str | Scenario,
    strategies: list[str],
    *,
    out: Path,
    steps: int | None = None,
    sets: list[str] | None = None,
    config_file: Path | None = None,
    quick: bool = False,
    seed: int = 0,
    data_dir: Path | None = None,
    with_shakespeare: bool = False,
    console: Console | None = None,
    progress: bool = True,
    overwrite: bool = False,
    seeds: list[int] | None = None,
    resume: bool = False,
) -> Results:
    """Train every strategy item from the same base; write out/results.json and out/report.html.

    ``out`` must be new or empty unless ``overwrite`` (then its contents are replaced); it may never be,
    hold or be inside the scenario's data, its prepared files, the base model or the ``--config`` file.
    ``seeds``: train every item once per seed (the same data order per seed across items) into
    ``runs/<item>/seed-<s>``, and add each item's mean and interval over seeds and report items.
    ``resume``: keep the runs of an earlier call into ``out`` that finished with the same config.
    """
    console = console or Console()
    out = Path(out)
    early_inputs = [str(p) for p in (data_dir, config_file) if p is not None]
    refuse_inputs(out, early_inputs, "--out")  # before the scenario is prepared
    if isinstance(scenario, str):
        scenario = get_scenario(scenario, data_dir=data_dir, quick=quick, with_shakespeare=with_shakespeare)
    file_settings = read_bench_config(config_file) if config_file else {}
    shared, overrides = _split_sets(list(sets or []))
    for name, params in (file_settings.get("strategies") or {}).items():
        shared[name] = {**params, **shared.get(name, {})}
    items = [s.strip() for s in strategies if s.strip()]
    folders = [run_directory_name(item) for item in items]
    repeated = sorted({f for f in folders if folders.count(f) > 1})
    if repeated:
        raise ConfigError(f"strategy items share a run folder name ({', '.join(repeated)}): list each item once")
    seeds = list(seeds) if seeds else [seed]
    configs: dict[tuple[str, int], Any] = {
        (item, s): build_run_config(
            scenario, item, out, steps=steps, seed=s, shared=shared, train_overrides=file_settings.get("train") or {},
            overrides=overrides, progress=progress, seed_folder=len(seeds) > 1,
        )
        for item in items
        for s in seeds
    }  # every item validated before the first one trains
    for config in configs.values():  # and no item trains on text the suite scores (before any training)
        overlap_guard(config, scenario.suite, allow=config.eval.allow_overlap)
    inputs = [*early_inputs, *scenario.inputs, scenario.base_model]
    with writing_to(out, f"retain bench {scenario.name}", inputs=inputs), torch_threads(scenario.threads):
        return _train_items(scenario, configs, out, inputs=inputs, seeds=seeds, console=console, progress=progress,
                            overwrite=overwrite, resume=resume)


def _train_items(
    scenario: Scenario, configs: dict[tuple[str, int], Any], out: Path, *, inputs: list[str], seeds: list[int],
    console: Console, progress: bool, overwrite: bool, resume: bool,
) -> Results:
    """Train the validated items into ``out`` (whose lock the caller holds); results, report and tables."""
    from retain.eval.runner import SuiteObserver
    from retain.report.html import write_report
    from retain.report.markdown import print_budget, print_score_changes, print_summary
    from retain.train import finetune

    if resume and holds_only_earlier_results(out, scenario.name):
        console.print(f"resuming the {scenario.name} bench in {out}: finished runs with the same config are kept")
    elif not overwrite and holds_only_earlier_results(out, scenario.name):
        console.print(f"replacing the earlier {scenario.name} results in {out} (a folder this command wrote)")
        overwrite = True
    resuming = resume and holds_only_earlier_results(out, scenario.name)
    prepare_output(out, overwrite=overwrite or resuming, inputs=inputs)
    if overwrite and not resuming:
        empty_folder(out)
    runs: list[StrategyRun] = []
    results = Results(scenario=scenario.name, base_model=scenario.base_model, runs=runs)
    stopped: list[str] = []
    for (item, s), config in configs.items():
        label = item if len(seeds) == 1 else f"{item} (seed {s})"
        finished = _finished_run(config) if resuming else None
        if finished is not None:
            console.print(f"[bold]{scenario.name}[/]: kept the finished run of [cyan]{label}[/]")
            runs.append(finished)
            continue
        console.print(f"[bold]{scenario.name}[/]: training [cyan]{label}[/] for {config.train.steps_per_task} steps/task")
        run_dir = Path(config.output.dir)
        observer = SuiteObserver(
            scenario.suite, name=item, run_dir=run_dir, config=config.model_dump(mode="json"),
            batch_size=config.eval.batch_size, progress=progress, console=console,
        )
        picks_up = resuming and _interrupted_run(config)  # a killed bench continues the run it was in
        try:
            finetune(config, observer=observer, console=console, overwrite=resuming and not picks_up, resume=picks_up)
        except GateError as err:  # a budget with on_exhausted: stop ended this item; the others still run
            console.print(f"[red]{label}[/]: {err}", highlight=False)
            stopped.append(label)
        runs.append(observer.strategy_run())
        results = Results(scenario=scenario.name, base_model=scenario.base_model, runs=runs)
        results.save(out / "results.json")
    results = Results(scenario=scenario.name, base_model=scenario.base_model, runs=runs,
                      aggregates=aggregate_seeds(runs) if len(seeds) > 1 else [])
    results.save(out / "results.json")
    write_report(results, out / "report.html")
    print_summary(results, console)
    print_score_changes(results, console)
    print_budget(results, console)
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.html'}")
    if stopped:
        raise GateError(f"the forgetting budget stopped {', '.join(stopped)} (on_exhausted: stop); their kept points are "
                        f"in {out / 'results.json'}")
    return results
