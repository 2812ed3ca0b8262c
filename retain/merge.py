"""Weight interpolation (WiSE-FT) and adapter merging (TIES, DARE), and the alpha sweep that finds how
much of a fine-tuning update to keep.

* **WiSE-FT** (Wortsman et al. 2022): ``theta_alpha = (1 - alpha) theta_base + alpha theta_tuned``. Alpha 0
  is the base model, 1 the fine-tuned one; in between, a model often keeps most of the new skill and
  most of the general one. Written as ``(1 - a) * x + a * y`` (not ``x + a (y - x)``) so that both ends
  are exact: alpha 0 returns the base weights bit for bit, alpha 1 the tuned ones.
* **LoRA**: the same interpolation is ``W + alpha * Delta W``, done by scaling every ``lora_B`` by alpha
  (``Delta W = s B A``); the result is still a small adapter.
* **Several adapters**: combined with peft's ``add_weighted_adapter`` (``peft.utils.merge_utils``):
  ``ties``, ``dare_ties``, ``dare_linear``, ``magnitude_prune``, ``linear`` act on the A and B factors
  separately (peft's fast approximation); the ``*_svd`` variants act on ``Delta W = B A`` itself, the task
  vectors of the TIES/DARE papers, and factor the result back by SVD (here at the sum of the ranks, so
  nothing is truncated); ``cat`` is the exact sum of the updates. DARE's random drops use a seed.
* **Alpha sweep**: evaluate a grid of alphas with a callback and name the largest alpha whose forgetting,
  ``1 - general(alpha) / general(0)`` (the general-suite drop the CI gate bounds for one task), stays
  within a budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from retain.report.schema import Results, Score, StepRecord, StrategyRun
from retain.report.summary import build_run, general_score, primary_task_score

MERGE_METHODS = (
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_ties_svd",
    "dare_linear",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
    "linear",
    "cat",
)
SWEEP_NAME = "wise-ft"


# --------------------------------------------------------------------------------------------
# WiSE-FT of full models


def interpolate(base: torch.Tensor, tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * base + alpha * tuned``, exact at alpha 0 and 1; integer tensors must agree."""
    if base.shape != tuned.shape:
        raise ValueError(f"cannot interpolate tensors of shapes {tuple(base.shape)} and {tuple(tuned.shape)}")
    if not tuned.is_floating_point():
        if not torch.equal(base, tuned.to(base.device)):
            raise ValueError("integer tensors (buffers) differ between the models; they cannot be interpolated")
        return tuned.clone()
    if alpha == 0.0:
        return base.to(tuned.dtype).clone()
    if alpha == 1.0:
        return tuned.clone()
    mixed = (1.0 - alpha) * base.to(torch.float32) + alpha * tuned.to(torch.float32)
    return mixed.to(tuned.dtype)


def interpolate_state_dicts(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Key-by-key WiSE-FT of two state dicts of the same architecture; a mismatch names the key."""
    missing, extra = sorted(set(tuned) - set(base)), sorted(set(base) - set(tuned))
    if missing or extra:
        raise ValueError(
            "the models do not share an architecture: "
            + (f"only the tuned model has {missing[:3]} " if missing else "")
            + (f"only the base model has {extra[:3]}" if extra else "")
        )
    out = {}
    for key, value in tuned.items():
        try:
            out[key] = interpolate(base[key], value, alpha)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    return out


class FullInterpolator:
    """Sets a working copy of the tuned model to any alpha; keeps both endpoints' weights (on CPU)."""

    def __init__(self, base: nn.Module, tuned: nn.Module) -> None:
        self.base_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
        self.tuned_state = {k: v.detach().cpu().clone() for k, v in tuned.state_dict().items()}
        interpolate_state_dicts(self.base_state, self.tuned_state, 0.5)  # fail early on a mismatch
        self.model = tuned

    def at(self, alpha: float) -> nn.Module:
        self.model.load_state_dict(interpolate_state_dicts(self.base_state, self.tuned_state, alpha))
        return self.model


def wise_ft(base: nn.Module, tuned: nn.Module, alpha: float) -> nn.Module:
    """A new model, ``(1 - alpha) base + alpha tuned``; both inputs are left unchanged."""
    model = copy.deepcopy(tuned)
    model.load_state_dict(interpolate_state_dicts(base.state_dict(), tuned.state_dict(), alpha))
    return model


# --------------------------------------------------------------------------------------------
# Adapters


def _lora_layers(model: nn.Module, adapter: str) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def check_scalable(model: nn.Module, adapter: str = "default") -> None:
    """Only plain LoRA updates scale linearly with B; say what else is in the adapter otherwise."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError("expected a peft model")
    config = model.peft_config[adapter]
    kind = getattr(config.peft_type, "value", str(config.peft_type))
    if kind != "LORA":
        raise ValueError(
            f"WiSE-FT of a {kind} adapter is not defined (there is no weight update to scale); use a LoRA adapter "
            "or a full fine-tuned model"
        )
    if getattr(config, "use_dora", False):
        raise ValueError("WiSE-FT of DoRA adapters is not supported (the magnitude vector is not a linear update)")
    if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
        raise ValueError(
            "this adapter also trains biases or whole modules (bias / modules_to_save), which scaling B does not "
            "interpolate; merge it into a full model first (retain train --merge) and interpolate that"
        )
    if not _lora_layers(model, adapter):
        raise ValueError(f"adapter '{adapter}' has no LoRA layer")


class AdapterScaler:
    """Scales a LoRA adapter's update to ``alpha * Delta W`` in place by setting ``B = alpha * B_tuned``."""

    def __init__(self, model: nn.Module, adapter: str = "default") -> None:
        check_scalable(model, adapter)
        self.model = model
        self.adapter = adapter
        self.layers = _lora_layers(model, adapter)
        self.original = [layer.lora_B[adapter].weight.detach().clone() for layer in self.layers]

    def at(self, alpha: float) -> nn.Module:
        with torch.no_grad():
            for layer, b in zip(self.layers, self.original):
                weight = layer.lora_B[self.adapter].weight
                weight.copy_(b if alpha == 1.0 else (alpha * b.float()).to(b.dtype))
        return self.model


def merge_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    method: str = "ties_svd",
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    seed: int = 0,
    name: str = "merged",
) -> nn.Module:
    """Add adapter ``name`` combining the loaded ``adapters`` of a peft model and make it the only one.

    ``weights`` default to 1 each; ``density`` is the share of entries TIES/DARE keep.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{method}'; choose one of {', '.join(MERGE_METHODS)}")
    if len(adapters) < 2:
        raise ValueError("merging needs at least two adapters")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    for adapter in adapters:
        check_scalable(model, adapter)
    ranks = [model.peft_config[a].r for a in adapters]
    extra = {"svd_rank": sum(ranks)} if method.endswith("_svd") else {}
    if method not in ("linear", "cat") and not method.endswith("_svd") and len(set(ranks)) > 1:
        raise ValueError(f"'{method}' needs adapters of one rank (got {ranks}); use '{method}_svd' or 'cat'")
    density_kw = {} if method in ("linear", "cat") else {"density": density}
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.add_weighted_adapter(list(adapters), weights, name, combination_type=method, **density_kw, **extra)
    model.set_adapter(name)
    for adapter in adapters:
        model.delete_adapter(adapter)
    return model


# --------------------------------------------------------------------------------------------
# Sweep


@dataclass
class SweepPoint:
    alpha: float
    scores: dict[str, Score]
    general: float | None = None  # mean bounded general score (higher is better)
    new_task: float | None = None  # mean primary score of the trained tasks
    forgetting: float | None = None  # 1 - general / general at alpha 0


@dataclass
class SweepResult:
    points: list[SweepPoint]
    max_forgetting: float | None = None
    best_alpha: float | None = None  # largest alpha within the budget (None: no budget or none fits)
    task_names: list[str] = field(default_factory=list)


def parse_alphas(text: str) -> list[float] | None:
    """``"0.5"`` -> None (a single alpha, see float(text)); ``"sweep"`` -> 0, 0.1, ..., 1; ``"0,0.5,1"`` -> list."""
    text = text.strip().lower()
    if text == "sweep":
        return [round(i / 10, 10) for i in range(11)]
    if text.startswith("sweep:"):
        text = text[len("sweep:") :]
    elif "," not in text:
        return None
    values = sorted({float(v) for v in text.split(",") if v.strip()})
    if not values:
        raise ValueError("an alpha sweep needs at least one value")
    return values


def task_names_of(scores: Mapping[str, Score]) -> list[str]:
    """Training tasks the suite measures (role task), in first-seen order."""
    names: list[str] = []
    for score in scores.values():
        if score.role == "task" and score.train_task and score.train_task not in names:
            names.append(score.train_task)
    return names


def _new_task_score(scores: Mapping[str, Score], tasks: Sequence[str]) -> float | None:
    record = StepRecord(index=0, scores=dict(scores))
    values = [v for v in (primary_task_score(record, t) for t in tasks) if v is not None]
    return sum(values) / len(values) if values else None


def alpha_sweep(
    alphas: Iterable[float],
    evaluate: Callable[[float], Mapping[str, Score]],
    max_forgetting: float | None = None,
) -> SweepResult:
    """Evaluate every alpha (0 is added: it is the reference) and pick the largest one whose forgetting
    ``1 - general(alpha) / general(0)`` is at most ``max_forgetting``.

    Forgetting is None where the suite has no bounded general score (nothing to bound), and 0 where the
    base model's general score is 0.
    """
    grid = sorted({0.0, *(float(a) for a in alphas)})
    if any(a < 0 for a in grid):
        raise ValueError(f"alphas must be >= 0, got {grid}")
    points = [SweepPoint(alpha=a, scores=dict(evaluate(a))) for a in grid]
    tasks = task_names_of(points[0].scores)
    reference = general_score(StepRecord(index=0, scores=points[0].scores))
    for point in points:
        point.general = general_score(StepRecord(index=0, scores=point.scores))
        point.new_task = _new_task_score(point.scores, tasks)
        if reference is None or point.general is None or math.isnan(point.general):
            continue
        # a base scoring 0 on a bounded score has nothing to lose: no alpha forgets
        point.forgetting = 1.0 - point.general / reference if reference > 0 else 0.0
    best = None
    if max_forgetting is not None:
        fitting = [p.alpha for p in points if p.forgetting is not None and p.forgetting <= max_forgetting]
        best = max(fitting) if fitting else None
    return SweepResult(points, max_forgetting, best, tasks)


def sweep_results(result: SweepResult, base_model: str, tuned: str) -> Results:
    """The sweep as a results file: one run ``wise-ft@alpha=<a>`` per alpha (base record + merged record),
    which the report plots as new-task score and retention against alpha."""
    tasks = result.task_names or [tuned]
    base = result.points[0]
    runs: list[StrategyRun] = []
    for point in result.points:
        records = [
            StepRecord(index=0, scores=base.scores),
            StepRecord(index=len(tasks), task=tasks[-1], scores=point.scores),
        ]
        runs.append(
            build_run(f"{SWEEP_NAME}@alpha={point.alpha:g}", tasks, records, config={"alpha": point.alpha, "tuned": tuned})
        )
    return Results(base_model=base_model, scenario="wise-ft sweep", runs=runs)
