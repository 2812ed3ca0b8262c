"""``retain train``: fine-tune over one task or a sequence, with checkpoints, resume and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retain.cli.app import SetOption, app, command, console
from retain.io import ensure_dir


@app.command()
@command
def train(
    config: Path = typer.Argument(..., help="Run YAML: model, tasks, strategies, train, eval, output."),
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output.dir."),
    merge: bool = typer.Option(False, "--merge", help="With adapters, also save the merged full model."),
) -> None:
    """Fine-tune a model on one task or a sequence of tasks with the listed strategies."""
    from retain.train import finetune
    from retain.train.run import load_run_config

    overrides = list(set_ or [])
    if merge:
        overrides.append("output.merge=true")
    run_config = load_run_config(config, overrides)  # every config mistake, before any model loads
    ensure_dir(run_config.output.dir, "create output.dir")  # a file in the way or no permission: fail now
    observer = None
    if run_config.eval.suite:
        from retain.eval.runner import SuiteObserver

        observer = SuiteObserver.from_config(run_config)
    outcome = finetune(run_config, resume=resume, observer=observer, console=console)
    console.print(f"[green]done[/]: model written to {outcome.final_dir}")
    if observer is not None:
        results_path = observer.write_results(outcome)
        console.print(f"results: {results_path}")
