"""``retain eval``: score one model, hub id or adapter directory on a suite, with no training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from retain.cli.app import SetOption, app, command, console
from retain.errors import ModelError


def refuse_run_folder(path: Path) -> None:
    """A training run folder is not a model: name the model folders inside it instead."""
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return
    inside = [p for p in (path / "final", path / "final" / "merged") if p.is_dir()]
    inside += sorted(p for p in (path / "tasks").glob("*") if p.is_dir())
    if (path / "checkpoints").is_dir() or inside:
        suggestion = inside[0] if inside else path / "final"
        raise ModelError(
            f"{path} is a training run folder, not a model; evaluate the model it wrote: {suggestion}",
            hint=f"retain eval {suggestion} --suite ... ({path}/final is the final model, {path}/tasks/ one per task)",
        )


@app.command("eval")
@command
def eval_command(
    model: str = typer.Argument(..., help="Model directory, hub id, or adapter directory."),
    suite: Path = typer.Option(..., "--suite", help="Suite YAML listing the evaluations."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the scores as JSON here."),
    batch_size: int = typer.Option(16, help="Evaluation batch size."),
    task: Optional[str] = typer.Option(
        None, "--task", help="Score this task's prompt or adapter from MODEL's retain_tasks.json (name or index)."
    ),
    set_: Optional[List[str]] = SetOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Score one model or adapter directory on a suite, with no training."""
    from rich.table import Table

    from retain.eval.suite import evaluate_suite, load_suite
    from retain.io import atomic_write_text, prepare_output
    from retain.models.tasks import load_task_model

    refuse_run_folder(Path(model))
    suite_config = load_suite(suite, list(set_ or []))
    if out is not None:  # a bad --out fails before the model loads, not after the evaluation
        inputs = [model, suite, *(p for entry in suite_config.tasks for p in entry.input_files().values())]
        prepare_output(out, overwrite=overwrite, inputs=inputs, kind="file")
    loaded, tokenizer = load_task_model(model, task)
    scores = evaluate_suite(loaded, tokenizer, suite_config, batch_size)
    title = f"{model} (task {task})" if task is not None else model
    table = Table(title=f"{title} on {suite}")
    for column in ("eval", "metric", "value", "better", "role", "n"):
        table.add_column(column)
    for key, score in scores.items():
        better = "higher" if score.higher_is_better else "lower"
        table.add_row(key, score.metric, f"{score.value:.4f}", better, score.role, str(score.n))
    console.print(table)
    if out is not None:
        payload = {k: json.loads(v.model_dump_json()) for k, v in scores.items()}
        atomic_write_text(out, json.dumps({"model": model, "task": task, "suite": str(suite), "scores": payload}, indent=2))
        console.print(f"scores: {out}")
