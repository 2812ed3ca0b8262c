"""PEFT adapters, looked up one way everywhere: which model is wrapped, its LoRA layers, base names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

_ADAPTER_MARKERS = ("lora_", "prompt_encoder", "modules_to_save", "original_module")


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_prompt_learning(model: nn.Module) -> bool:
    """PEFT soft prompts (prompt tuning, p-tuning, prefix tuning): the base weights are never wrapped."""
    if not is_peft_model(model):
        return False
    return bool(model.peft_config[model.active_adapter].is_prompt_learning)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers by module name, in module order (linear, embedding and conv layers alike)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def linear_lora_layers(model: nn.Module, who: str) -> dict[str, nn.Module]:
    """Like :func:`lora_layers`, refusing any LoRA layer that is not on a linear map (``who`` names the caller)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from retain.errors import ConfigError

    layers = lora_layers(model)
    for name, module in layers.items():
        if not isinstance(module, LoraLinear):
            raise ConfigError(
                f"{who} supports LoRA on linear layers only; '{name}' is a {type(module).__name__}. "
                "Set lora.target_modules to linear layers."
            )
    return layers


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model: without peft's or DDP's wrapper prefix and ``base_layer`` hop."""
    for prefix in ("base_model.model.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def is_adapter_parameter(name: str) -> bool:
    return any(marker in name for marker in _ADAPTER_MARKERS)


def base_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The base model's parameters under canonical names (adapter tensors skipped)."""
    return {canonical_name(n): p for n, p in model.named_parameters() if not is_adapter_parameter(n)}


def minor_factors(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """MiLoRA (Wang et al. 2024, arXiv 2406.09044): the adapter starts on the ``r`` *smallest* singular
    triplets of ``W = U S V^T`` (out x in), and the base keeps the rest, so the model computes exactly
    what it did: ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, ``W_res = W - s B A`` with ``s`` the
    adapter's scaling (divided out as PEFT's PiSSA does, so that ``s B A`` is the minor component).
    Returns (A, B, W_res) in float32."""
    matrix = weight.detach().float()
    if not 0 < r <= min(matrix.shape):
        raise ValueError(f"MiLoRA needs 0 < r <= min{tuple(matrix.shape)}, got r={r}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # s descending: the minor ones are last
    root = torch.sqrt(s[-r:] / scaling)
    a = root[:, None] * vh[-r:]
    b = u[:, -r:] * root[None, :]
    return a, b, matrix - scaling * (b @ a)
