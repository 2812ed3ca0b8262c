"""``retain import-llama2c``: a llama2.c checkpoint + tokenizer as a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import typer

from retain.cli.app import app, command, console


@app.command("import-llama2c")
@command
def import_llama2c_command(
    checkpoint: Path = typer.Argument(..., help="llama2.c checkpoint (.bin), e.g. stories260K.bin."),
    tokenizer: Path = typer.Argument(..., help="llama2.c tokenizer (.bin), e.g. tok512.bin."),
    out: Path = typer.Option(..., "--out", help="Output directory for the Hugging Face model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Convert a llama2.c checkpoint + tokenizer into a standard Hugging Face model directory."""
    from retain.models.llama2c import import_llama2c

    path = import_llama2c(checkpoint, tokenizer, out, overwrite=overwrite)
    console.print(f"[green]imported[/] into {path}")
