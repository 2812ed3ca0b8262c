"""``retain importance compute``: weight statistics computed once, reused by ewc / ewc-lora / importance runs.

    retain importance compute --model M --data general.jsonl --method ewc --out F.safetensors

Then point a strategy at it: ``strategies: [full, {name: ewc, file: F.safetensors}]``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from retain.cli.app import command, console
from retain.errors import ConfigError
from retain.io import prepare_output

ESTIMATORS = ("sampled", "empirical", "empirical_batch")

importance_app = typer.Typer(
    help="Compute EWC Fisher or element-wise importance once and save it for later runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@importance_app.callback()
def importance_group() -> None:
    """Weight statistics (EWC Fisher, element-wise importance) saved to reuse across runs."""


@importance_app.command()
@command
def compute(
    model: str = typer.Option(..., "--model", help="Model directory or hub id (the statistics are tied to its weights)."),
    data: Path = typer.Option(..., "--data", help="General text (jsonl/txt/csv/...) representative of what must be kept."),
    method: str = typer.Option("ewc", "--method", help="ewc (diagonal Fisher) or importance (SI path integral)."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    estimator: str = typer.Option("sampled", "--estimator", help="ewc: sampled | empirical | empirical_batch."),
    samples: int = typer.Option(1, "--samples", help="ewc sampled: label draws per example."),
    max_examples: int = typer.Option(128, "--max-examples", help="Examples used (seeded subset)."),
    max_length: int = typer.Option(256, "--max-length", help="Tokens per example."),
    batch_size: int = typer.Option(8, "--batch-size", help="Batch size."),
    lr: float = typer.Option(1e-4, "--lr", help="importance: learning rate of the pass (use the fine-tuning lr)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="importance: optimizer steps (default one pass)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="importance: adamw (the training optimizer) or sgd."),
    xi: float = typer.Option(1e-3, "--xi", help="importance: SI damping."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subset and of sampled labels."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype at load time."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Compute statistics of every weight of MODEL over DATA and write them (no text) to OUT."""
    path, seconds, count = compute_importance(
        model=model, data=data, method=method, out=out, estimator=estimator, samples=samples,
        max_examples=max_examples, max_length=max_length, batch_size=batch_size, lr=lr, steps=steps,
        xi=xi, seed=seed, dtype=dtype, overwrite=overwrite, optimizer=optimizer,
    )
    console.print(f"[green]wrote[/] {path} ({method}, {count} examples/steps, {seconds:.1f}s)")


def compute_importance(
    *,
    model: str,
    data: Path,
    method: str,
    out: Path,
    estimator: str = "sampled",
    samples: int = 1,
    max_examples: int = 128,
    max_length: int = 256,
    batch_size: int = 8,
    lr: float = 1e-4,
    steps: int | None = None,
    xi: float = 1e-3,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    optimizer: str = "adamw",
) -> tuple[Path, float, int]:
    """The library form of the command: returns (path, seconds, examples or steps)."""
    from accelerate import Accelerator

    from retain.config import DataConfig, ModelConfig
    from retain.data import build_task_data, collate
    from retain.data.sampling import estimate_subset
    from retain.models.loading import load_model
    from retain.stats.files import save_importance
    from retain.stats.fisher import diagonal_fisher
    from retain.stats.path_integral import path_integral_importance

    if method not in ("ewc", "importance"):
        raise ConfigError(f"--method must be ewc or importance, got '{method}'")
    if method == "importance" and optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"--optimizer must be adamw or sgd, got '{optimizer}'")
    if method == "ewc" and estimator not in ESTIMATORS:
        raise ConfigError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got '{estimator}'")
    # a bad or taken --out fails before the model loads and the statistics are computed
    prepare_output(out, overwrite=overwrite, inputs=[model, data], kind="file")
    accelerator = Accelerator()
    network, tokenizer = load_model(ModelConfig(name_or_path=model, dtype=dtype))  # type: ignore[arg-type]
    network.to(accelerator.device)
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    examples = build_task_data(DataConfig(path=str(data), max_length=max_length), tokenizer, seed=seed).train
    examples = estimate_subset(examples, max_examples, seed)
    pad_id = tokenizer.pad_token_id
    params = {n: p for n, p in network.named_parameters()}
    start = time.perf_counter()
    if method == "ewc":
        stats, count = diagonal_fisher(
            network, params, examples, lambda items: collate(items, pad_id), estimator=estimator,  # type: ignore[arg-type]
            samples=samples, seed=seed, batch_size=batch_size, accelerator=accelerator,
        )
        extra = {"max_length": max_length, "normalize": "token"}
    else:
        stats, count = path_integral_importance(
            network, params, examples, lambda items: collate(items, pad_id), lr=lr, batch_size=batch_size,
            steps=steps, xi=xi, accelerator=accelerator, optimizer=optimizer,  # type: ignore[arg-type]
        )
        estimator, samples = "si_general_pass", 0
        extra = {"lr": lr, "steps": count, "xi": xi, "batch_size": batch_size, "max_length": max_length, "optimizer": optimizer}
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        save_importance(
            out, stats, model=network, method=method, estimator=estimator, samples=samples, examples=examples, extra=extra
        )
    accelerator.wait_for_everyone()
    return Path(out), seconds, count
