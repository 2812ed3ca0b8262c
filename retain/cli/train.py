"""``retain train``: fine-tune over one task or a sequence, with checkpoints, resume and evaluation."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import List, Optional

import typer

from retain.cli.app import SetOption, app, command, console
from retain.errors import Interrupted


def resume_command(config: Path, sets: list[str], merge: bool) -> str:
    """The exact command that continues this run (what the user typed, plus --resume)."""
    parts = ["retain", "train", str(config)]
    for item in sets:
        parts += ["--set", item]
    if merge:
        parts.append("--merge")
    return shlex.join([*parts, "--resume"])


@app.command()
@command
def train(
    config: Path = typer.Argument(..., help="Run YAML: model, tasks, strategies, train, eval, output."),
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output.dir."),
    allow_changed_data: bool = typer.Option(
        False, "--allow-changed-data", help="With --resume: continue although an input file changed since the run started."
    ),
    merge: bool = typer.Option(False, "--merge", help="With adapters, also save the merged full model."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start again in an output.dir that holds an earlier run or other files (they are deleted)."
    ),
    allow_overlap: bool = typer.Option(
        False, "--allow-overlap", help="Train although training text overlaps the suite's texts (recorded in results.json)."
    ),
) -> None:
    """Fine-tune a model on one task or a sequence of tasks with the listed strategies."""
    from retain.train import finetune
    from retain.train.interrupt import TrainingInterrupted
    from retain.train.run import load_run_config

    overrides = list(set_ or [])
    if merge:
        overrides.append("output.merge=true")
    if allow_overlap:
        overrides.append("eval.allow_overlap=true")
    run_config = load_run_config(config, overrides)  # every config mistake, before any model loads
    observer = None
    if run_config.eval.suite:
        from retain.eval.runner import SuiteObserver

        observer = SuiteObserver.from_config(run_config, console=console)
    again = resume_command(config, list(set_ or []), merge)
    try:
        outcome = finetune(run_config, resume=resume, overwrite=overwrite, observer=observer, console=console,
                           allow_changed_data=allow_changed_data)
    except TrainingInterrupted as stop:
        raise Interrupted(f"{stop}; continue with: {again}", stop.signum) from None
    except KeyboardInterrupt as stop:
        raise Interrupted(f"the last checkpoint is kept; continue with: {again}", getattr(stop, "signum", signal.SIGINT)) from None
    if not outcome.is_main_process:
        return  # with several processes the main one reports and writes results.json
    console.print(f"[green]done[/]: model written to {outcome.final_dir}")
    if observer is not None:
        from retain.report.markdown import print_score_changes, print_summary

        results_path = observer.write_results(outcome)
        results = observer.results()
        print_summary(results, console)
        print_score_changes(results, console)
        console.print(f"results: {results_path}  (retain report {shlex.quote(str(results_path))} writes the HTML report)")
