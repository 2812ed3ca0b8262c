"""``retain generate``: greedy continuations from a model folder, or from one task's prompt or adapter."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retain.cli.app import app, command


@app.command("generate")
@command
def generate_command(
    model: Path = typer.Argument(..., help="Model folder (a run's final/ for --task), hub id, or adapter folder."),
    prompts: List[str] = typer.Argument(..., help="One or more prompts."),
    task: Optional[str] = typer.Option(None, "--task", help="Use this task's prompt or adapter (name or index)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Tokens to generate per prompt."),
) -> None:
    """Greedy continuations of the prompts; with --task, from that task's choice in final/retain_tasks.json."""
    from retain.eval.tasks.generate import generate_samples
    from retain.models.tasks import load_task_model

    loaded, tokenizer = load_task_model(str(model), task)
    for prompt, text in generate_samples(loaded, tokenizer, prompts, max_new_tokens).items():
        typer.echo(f"{prompt}{text}")
