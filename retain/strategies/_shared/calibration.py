"""What the weight-statistics strategies share: where statistics come from, how they are stored,
and how stored tensors are matched to the live trainable weights (``ewc``, ``ewc-lora``, ``l2``,
``importance``)."""

from __future__ import annotations

import time
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from pydantic import Field
from torch import Tensor

from retain.config import DataConfig, RunConfig
from retain.errors import StateError
from retain.models.sharding import is_dtensor, shard_like
from retain.stats.fisher import Estimator
from retain.strategies.base import StrategyConfig, has_general_text

Source = Literal["auto", "general", "previous_task", "both"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CalibrationConfig(StrategyConfig):
    """Where statistics come from and how they are estimated (shared by ewc and ewc-lora)."""

    source: Source = Field(
        "auto",
        description="general | previous_task | both; auto = both when general text or a file is set, else previous_task.",
    )
    data: DataConfig | None = Field(None, description="Calibration text; default: the run's general_data.")
    file: str | None = Field(None, description="Importance file with the general statistics (replaces computing them).")
    estimator: Estimator = Field("sampled", description="sampled | empirical (per example) | empirical_batch.")
    samples: int = Field(1, gt=0, description="Label draws per example for the sampled estimator.")
    max_examples: int = Field(128, gt=0, description="Examples per Fisher estimate (seeded subset).")
    batch_size: int = Field(8, gt=0, description="Batch size of the estimate (per-example results do not depend on it).")
    state_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of stored statistics.")
    seed: int | None = Field(None, description="Seed of the example subsets and sampled labels; default: train.seed.")


def resolve_source(config: CalibrationConfig, run: RunConfig) -> str:
    """``general`` / ``previous_task`` / ``both``: what ``auto`` means for this run (``both`` when general
    text or a file is configured, else ``previous_task``)."""
    if config.source != "auto":
        return config.source
    return "both" if has_general_text(config.data, run) or config.file is not None else "previous_task"


def calibration_requirements(config: CalibrationConfig, run: RunConfig, where: str) -> list[str]:
    """A general source needs text (or a file); a source of finished tasks only needs a second task."""
    source = resolve_source(config, run)
    if source in ("general", "both") and not (has_general_text(config.data, run) or config.file is not None):
        return [
            f"source: {source} needs general text: set general_data (e.g. general_data: {{path: general.jsonl}}), "
            f"{where}.data or {where}.file; or set {where}.source: previous_task"
        ]
    if source == "previous_task" and len(run.tasks) < 2:
        return [
            f"source: previous_task estimates the Fisher on finished tasks, and this run has one task, so the "
            f"penalty would never apply. Set general_data (or {where}.data / {where}.file) to keep the base "
            "model's knowledge, or add a task"
        ]
    return []


def detached_copy(params: dict[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    return {n: p.detach().clone() if dtype is None else p.detach().to(dtype).clone() for n, p in params.items()}


def on_device(tensors: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Move stored tensors next to the live parameters (state is loaded on the CPU); a whole tensor
    meeting a sharded parameter (a checkpoint of another process count) is cut as the parameter is."""
    out = {}
    for n, t in tensors.items():
        if is_dtensor(like[n]) and not is_dtensor(t):
            out[n] = shard_like(t, like[n])
        elif not is_dtensor(like[n]) and is_dtensor(t):
            out[n] = t.full_tensor().to(like[n].device)
        else:
            out[n] = t if t.device == like[n].device else t.to(like[n].device)
    return out


def check_same_parameters(stored: dict[str, Tensor], live: dict[str, Tensor], who: str) -> None:
    if set(stored) != set(live):
        extra = sorted(set(live) - set(stored))[:3]
        gone = sorted(set(stored) - set(live))[:3]
        raise StateError(
            f"{who}: the trainable weights changed since the statistics were computed "
            f"(new: {extra}, missing: {gone}); list the strategies in the same order on resume."
        )



def estimate_logged(
    estimate: Callable[..., tuple[dict[str, Tensor], int]],
    targets: Mapping[str, Any],
    examples: Sequence[Any],
    ctx: Any,
    who: str,
    config: Any,
    seed: int,
) -> dict[str, Tensor]:
    """Run a Fisher estimator (``diagonal_fisher`` or ``lora_delta_fisher``) with a strategy's settings,
    logging its cost (seconds, examples) into the run log."""
    start = time.perf_counter()
    fisher, count = estimate(
        ctx.unwrapped_model,
        targets,
        examples,
        ctx.collate,
        estimator=config.estimator,
        samples=config.samples,
        seed=seed,
        batch_size=config.batch_size,
        accelerator=ctx.accelerator,
    )
    ctx.log(f"{who}/fisher_seconds", time.perf_counter() - start)
    ctx.log(f"{who}/fisher_examples", count)
    return fisher

