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
console = Console() if sys.stdout.isatty() else Console(width=220)
err_console = Console(stderr=True)


def _quiet_libraries() -> None:
    """Our own progress bar and tables are the output; silence the libraries' per-file bars and notices."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("accelerate").setLevel(logging.ERROR)


@app.callback()
def _root() -> None:
    """Fine-tune causal LMs on new skills without catastrophic forgetting, and measure what they still know."""
    _quiet_libraries()

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
    strategies: str = typer.Option(
        "full,lora,full+replay@replay.ratio=0.25,full+lwf@lwf.anchor=general",
        help="Comma-separated strategies; hybrids with '+', parameters with '@strategy.param=value'.",
    ),
) -> None:
    """Offline demo: pretrain a tiny model on synthetic general skills, fine-tune on a specialist skill,
    and compare how much each strategy forgets."""
    from retain.scenarios.bench import run_bench

    try:
        run_bench("synthetic", strategies.split(","), out=out, steps=steps, console=console)
        console.print("Open the report in a browser; `retain bench stories-contracts` runs the same comparison on real data.")
    except ConfigError as err:
        _fail(str(err))


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Model directory, hub id, or adapter directory."),
    suite: Path = typer.Option(..., "--suite", help="Suite YAML listing the evaluations."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the scores as JSON here."),
    batch_size: int = typer.Option(16, help="Evaluation batch size."),
    set_: Optional[List[str]] = SetOption,
) -> None:
    """Score one model or adapter directory on a suite, with no training."""
    import json

    from rich.table import Table

    from retain.eval.suite import evaluate_suite, load_suite
    from retain.models.loading import load_any

    try:
        suite_config = load_suite(suite, list(set_ or []))
        loaded, tokenizer = load_any(model)
    except ConfigError as err:
        _fail(str(err))
    scores = evaluate_suite(loaded, tokenizer, suite_config, batch_size)
    table = Table(title=f"{model} on {suite}")
    for column in ("eval", "metric", "value", "better", "role", "n"):
        table.add_column(column)
    for key, score in scores.items():
        better = "higher" if score.higher_is_better else "lower"
        table.add_row(key, score.metric, f"{score.value:.4f}", better, score.role, str(score.n))
    console.print(table)
    if out is not None:
        from retain.train.checkpoint import atomic_write_text

        payload = {k: json.loads(v.model_dump_json()) for k, v in scores.items()}
        atomic_write_text(out, json.dumps({"model": model, "suite": str(suite), "scores": payload}, indent=2))
        console.print(f"scores: {out}")


@app.command()
def report(
    results: Path = typer.Argument(..., help="results.json written by train, bench or demo."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default: report.html beside results)."),
) -> None:
    """Write a self-contained HTML report and print the markdown summary."""
    from retain.report.html import write_report
    from retain.report.markdown import summary_table_markdown
    from retain.report.schema import Results

    try:
        loaded = Results.load(results)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    target = out or results.with_name("report.html")
    write_report(loaded, target)
    typer.echo(summary_table_markdown(loaded))
    console.print(f"report: {target}")


@app.command()
def gate(
    results: Path = typer.Argument(..., help="results.json to check."),
    max_forgetting: Optional[float] = typer.Option(None, help="Upper bound on forgetting (general drop for one task)."),
    min_new_task: Optional[float] = typer.Option(None, help="Lower bound on the new task's score."),
    min_general_retention: Optional[float] = typer.Option(None, help="Lower bound on general retention."),
    max_kl: Optional[float] = typer.Option(None, help="Upper bound on KL(base || model) on the probes."),
    strategy: Optional[str] = typer.Option(None, help="Check only this strategy run."),
) -> None:
    """Exit 1 naming each violated bound, so a pipeline can refuse a model that forgot too much."""
    from retain.report.gate import check_gate
    from retain.report.schema import Results

    try:
        loaded = Results.load(results)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    violations = check_gate(
        loaded, max_forgetting=max_forgetting, min_new_task=min_new_task,
        min_general_retention=min_general_retention, max_kl=max_kl, strategy=strategy,
    )
    if violations:
        for violation in violations:
            err_console.print(f"[bold red]FAIL[/] {violation}")
        raise typer.Exit(1)
    console.print("[green]PASS[/] every bound holds")


@app.command()
def bench(
    scenario: str = typer.Argument("stories-contracts", help="Scenario: stories-contracts or synthetic."),
    strategies: str = typer.Option("full,lora", help="Comma-separated items; hybrids with '+', params with '@s.p=v'."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per task (default: the scenario's)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Output folder: results.json, report.html, runs/."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with strategies: {name: {param: v}} and train: {...}."),
    set_: Optional[List[str]] = SetOption,
    quick: bool = typer.Option(False, "--quick", help="Tiny budget and eval (about a minute), for smoke tests."),
    seed: int = typer.Option(0, help="Seed shared by every strategy."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with stories260k, legalbench-cuad, ..."),
    shakespeare: bool = typer.Option(False, "--shakespeare", help="Add Shakespeare as a second task."),
) -> None:
    """Train several strategies from the same base with the same seed and budget; compare them."""
    from retain.scenarios.bench import run_bench

    try:
        run_bench(
            scenario, strategies.split(","), out=out, steps=steps, sets=list(set_ or []), config_file=config,
            quick=quick, seed=seed, data_dir=data_dir, with_shakespeare=shakespeare, console=console,
        )
    except ConfigError as err:
        _fail(str(err))


def _mount_subcommands() -> None:
    from retain.importance_cli import importance_app
    from retain.merge_cli import merge_command

    app.command("merge")(merge_command)

    app.add_typer(importance_app, name="importance", help="Compute importance statistics (Fisher, SI) once and reuse them.")


_mount_subcommands()


def main() -> None:  # pragma: no cover - entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
