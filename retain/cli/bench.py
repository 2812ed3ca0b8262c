"""``retain bench`` and ``retain demo``: every strategy from the same base, seed, data order and budget."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retain.cli.app import SetOption, app, command, console


@app.command()
@command
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where results.json and report.html go."),
    steps: int = typer.Option(150, help="Fine-tuning steps per strategy."),
    strategies: str = typer.Option(
        "full,lora,full+replay@replay.ratio=0.25,full+lwf@lwf.anchor=general",
        help="Comma-separated strategies; hybrids with '+', parameters with '@strategy.param=value'.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the contents of a non-empty --out."),
) -> None:
    """Offline demo: pretrain a tiny model on synthetic general skills, fine-tune on a specialist skill,
    and compare how much each strategy forgets."""
    from retain.scenarios.bench import run_bench

    run_bench("synthetic", strategies.split(","), out=out, steps=steps, console=console, overwrite=overwrite)
    console.print("Open the report in a browser; `retain bench stories-contracts` runs the same comparison on real data.")


@app.command()
@command
def bench(
    scenario: str = typer.Argument("stories-contracts", help="Scenario: stories-contracts or synthetic."),
    strategies: str = typer.Option("full,lora", help="Comma-separated items; hybrids with '+', params with '@s.p=v'."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per task (default: the scenario's)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Output folder: results.json, report.html, runs/."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with strategies: {name: {param: v}} and train: {...}."),
    set_: Optional[List[str]] = SetOption,
    quick: bool = typer.Option(False, "--quick", help="Tiny budget and eval (about a minute), for smoke tests."),
    seed: int = typer.Option(0, help="Seed shared by every strategy."),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2: every strategy once per seed; mean and interval."
    ),
    resume: bool = typer.Option(False, "--resume", help="Keep the runs an earlier bench into --out finished."),
    allow_overlap: bool = typer.Option(
        False, "--allow-overlap", help="Train although training text overlaps the suite's texts (recorded in results.json)."
    ),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with stories260k, legalbench-cuad, ..."),
    shakespeare: bool = typer.Option(False, "--shakespeare", help="Add Shakespeare as a second task."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the contents of a non-empty --out."),
) -> None:
    """Train several strategies from the same base with the same seed and budget; compare them."""
    from retain.scenarios.bench import run_bench

    run_bench(
        scenario, strategies.split(","), out=out, steps=steps,
        sets=[*(set_ or []), *(["eval.allow_overlap=true"] if allow_overlap else [])], config_file=config,
        quick=quick, seed=seed, data_dir=data_dir, with_shakespeare=shakespeare, console=console, overwrite=overwrite,
        seeds=parse_seeds(seeds) if seeds is not None else None, resume=resume,
    )


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a clear error for anything else."""
    from retain.errors import ConfigError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. --seeds 0,1,2") from None
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"--seeds {text!r}: give distinct seeds, e.g. --seeds 0,1,2")
    return values
