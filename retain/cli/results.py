"""``retain report`` and ``retain gate``: read a results.json, show it, or refuse a model on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from retain.cli.app import app, command, console, err_console
from retain.errors import EXIT_GATE, ConfigError
from retain.io import first_missing_folder, prepare_output


def refuse_tune_file(path: Path, command: str) -> None:
    """``trials.json`` of ``retain tune`` is no results.json; say which file the command reads instead of
    "schema_version '<missing>'"."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # Results.load names what is wrong with it
    if isinstance(data, dict) and "tune" in data and "trials" in data and "schema_version" not in data:
        raise ConfigError(
            f"{path} is the trials file of retain tune, not a results.json; retain {command} reads the results.json "
            "that retain train (with eval.suite), bench, demo or merge --alpha sweep write",
            hint=f"train the best trial (retain train {path.with_name('best.yaml')}) and pass its "
            "<output.dir>/results.json, or a trial's trials/NNNN/results.json",
        )


@app.command()
@command
def report(
    results: Path = typer.Argument(..., help="results.json written by train, bench or demo."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="HTML file (default: report.html beside results, rewritten each time)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Write a self-contained HTML report and print the markdown summary."""
    from retain.report.html import write_report
    from retain.report.markdown import summary_table_markdown
    from retain.results.schema import Results

    refuse_tune_file(results, "report")
    loaded = Results.load(results)
    target = out or results.with_name("report.html")
    created = first_missing_folder(target.parent)
    # the default report.html is this results file's own derived page; a file named with --out is the user's
    prepare_output(target, overwrite=overwrite or out is None, inputs=[results], kind="file")
    if created is not None:
        console.print(f"created the folder {created} for the report")
    write_report(loaded, target)
    typer.echo(summary_table_markdown(loaded))
    console.print(f"report: {target}")


@app.command()
@command
def gate(
    results: Path = typer.Argument(..., help="results.json to check."),
    max_forgetting: Optional[float] = typer.Option(None, help="Upper bound on forgetting (general drop for one task)."),
    min_new_task: Optional[float] = typer.Option(None, help="Lower bound on the new task's score."),
    min_general_retention: Optional[float] = typer.Option(None, help="Lower bound on general retention."),
    max_kl: Optional[float] = typer.Option(None, help="Upper bound on KL(base || model) on the probes."),
    strategy: Optional[str] = typer.Option(None, help="Check only this strategy run."),
    confidence: float = typer.Option(
        0.95, "--confidence", min=0.0, max=0.999,
        help="A bound holds only if the worse end of the value's interval at this level meets it; 0: point estimates.",
    ),
) -> None:
    """Exit 1 naming each violated bound, so a pipeline can refuse a model that forgot too much."""
    from retain.report.gate import check_gate
    from retain.results.schema import Results

    refuse_tune_file(results, "gate")
    loaded = Results.load(results)
    if all(bound is None for bound in (max_forgetting, min_new_task, min_general_retention, max_kl)):
        raise ConfigError(
            f"retain gate {results}: no bound given, so there is nothing to check (a gate without bounds would always pass)",
            hint="pass --max-forgetting, --min-new-task, --min-general-retention and/or --max-kl",
        )
    violations = check_gate(
        loaded, max_forgetting=max_forgetting, min_new_task=min_new_task,
        min_general_retention=min_general_retention, max_kl=max_kl, strategy=strategy, confidence=confidence,
    )
    if violations:
        for violation in violations:
            err_console.print(f"[bold red]FAIL[/] {violation}")
        raise typer.Exit(EXIT_GATE)
    console.print("[green]PASS[/] every bound holds")
