"""The ``retain`` command line (typer). Each command is a thin shell over the library API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from retain.config import ConfigError

app = typer.Typer(
    help="Fine-tune causal LMs on new skills without catastrophic forgetting, and measure what they still know.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.lr=3e-4 (repeatable).")


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run YAML: model, tasks, strategies, train, eval, output."),
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output.dir."),
    merge: bool = typer.Option(False, "--merge", help="With adapters, also save the merged full model."),
) -> None:
    """Fine-tune a model on one task or a sequence of tasks with the listed strategies."""
    from retain.config import load_config
    from retain.train import NonFiniteLossError, finetune

    overrides = list(set_ or [])
    if merge:
        overrides.append("output.merge=true")
    try:
        run_config = load_config(config, overrides)
        observer = None
        if run_config.eval.suite:
            from retain.eval.runner import SuiteObserver

            observer = SuiteObserver.from_config(run_config)
        outcome = finetune(run_config, resume=resume, observer=observer, console=console)
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
    except NonFiniteLossError as err:
        _fail(str(err), code=3)
    console.print(f"[green]done[/]: model written to {outcome.final_dir}")
    if observer is not None:
        results_path = observer.write_results(outcome)
        console.print(f"results: {results_path}")


@app.command("import-llama2c")
def import_llama2c_command(
    checkpoint: Path = typer.Argument(..., help="llama2.c checkpoint (.bin), e.g. stories260K.bin."),
    tokenizer: Path = typer.Argument(..., help="llama2.c tokenizer (.bin), e.g. tok512.bin."),
    out: Path = typer.Option(..., "--out", help="Output directory for the Hugging Face model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Convert a llama2.c checkpoint + tokenizer into a standard Hugging Face model directory."""
    from retain.models.llama2c import import_llama2c

    try:
        path = import_llama2c(checkpoint, tokenizer, out, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(str(err))
    console.print(f"[green]imported[/] into {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where results.json and report.html go."),
    steps: int = typer.Option(150, help="Fine-tuning steps per strategy."),
    strategies: str = typer.Option("full,lora", help="Comma-separated strategies; hybrids with '+'."),
) -> None:
    """Offline demo: pretrain a tiny model on synthetic general skills, fine-tune on a specialist skill, show forgetting."""
    from retain.scenarios.bench import run_bench

    try:
        run_bench("synthetic", strategies.split(","), out=out, steps=steps, console=console)
    except ConfigError as err:
        _fail(str(err))


def main() -> None:  # pragma: no cover - entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
