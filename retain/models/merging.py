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

The alpha sweep that scores these models against a suite lives in ``retain.eval.sweep``.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from retain.errors import ConfigError, ModelError
from retain.models.adapters import lora_layers

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


# --------------------------------------------------------------------------------------------
# WiSE-FT of full models


def interpolate(base: torch.Tensor, tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * base + alpha * tuned``, exact at alpha 0 and 1; integer tensors must agree."""
    if base.shape != tuned.shape:
        raise ModelError(f"cannot interpolate tensors of shapes {tuple(base.shape)} and {tuple(tuned.shape)}")
    if not tuned.is_floating_point():
        if not torch.equal(base, tuned.to(base.device)):
            raise ModelError("integer tensors (buffers) differ between the models; they cannot be interpolated")
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
        raise ModelError(
            "the models do not share an architecture: "
            + (f"only the tuned model has {missing[:3]} " if missing else "")
            + (f"only the base model has {extra[:3]}" if extra else "")
        )
    out = {}
    for key, value in tuned.items():
        try:
            out[key] = interpolate(base[key], value, alpha)
        except ModelError as err:
            raise ModelError(f"{key}: {err}") from None
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
    return [m for m in lora_layers(model).values() if adapter in m.lora_A]


def check_scalable(model: nn.Module, adapter: str = "default") -> None:
    """Only plain LoRA updates scale linearly with B; say what else is in the adapter otherwise."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ModelError("expected a peft model")
    config = model.peft_config[adapter]
    kind = getattr(config.peft_type, "value", str(config.peft_type))
    if kind != "LORA":
        raise ModelError(
            f"WiSE-FT of a {kind} adapter is not defined (there is no weight update to scale); use a LoRA adapter "
            "or a full fine-tuned model"
        )
    if getattr(config, "use_dora", False):
        raise ModelError("WiSE-FT of DoRA adapters is not supported (the magnitude vector is not a linear update)")
    if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
        raise ModelError(
            "this adapter also trains biases or whole modules (bias / modules_to_save), which scaling B does not "
            "interpolate; merge it into a full model first (retain train --merge) and interpolate that"
        )
    if not _lora_layers(model, adapter):
        raise ModelError(f"adapter '{adapter}' has no LoRA layer")


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
        raise ConfigError(f"unknown merge method '{method}'; choose one of {', '.join(MERGE_METHODS)}")
    if len(adapters) < 2:
        raise ConfigError("merging needs at least two adapters")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters")
    for adapter in adapters:
        check_scalable(model, adapter)
    ranks = [model.peft_config[a].r for a in adapters]
    extra = {"svd_rank": sum(ranks)} if method.endswith("_svd") else {}
    if method not in ("linear", "cat") and not method.endswith("_svd") and len(set(ranks)) > 1:
        raise ModelError(f"'{method}' needs adapters of one rank (got {ranks}); use '{method}_svd' or 'cat'")
    density_kw = {} if method in ("linear", "cat") else {"density": density}
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.add_weighted_adapter(list(adapters), weights, name, combination_type=method, **density_kw, **extra)
    model.set_adapter(name)
    for adapter in adapters:
        model.delete_adapter(adapter)
    return model
