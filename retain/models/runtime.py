"""Where a model runs and in which mode: one rule for devices and one for evaluation mode."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from retain.models.adapters import is_peft_model


def model_device(model: nn.Module) -> torch.device:
    """Where inputs must go: the input embeddings' device (the first parameter's as a fallback)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except NotImplementedError:
        embeddings = None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Compute on ``threads`` CPU threads inside the block (None: leave torch's setting).

    A float32 sum split over more threads adds in another order; on a tiny model that is enough to
    flip a greedy answer, so a run meant to reproduce published numbers fixes its thread count.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def eval_mode(model: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """Dropout off (LoRA dropout included), gradients off unless ``no_grad=False``; afterwards every
    module gets back its own previous training flag (a submodule a strategy keeps in eval mode stays so).

    ``torch.no_grad`` rather than ``inference_mode``: tensors a model caches during an inference-mode
    forward (rotary tables, ...) would break a later training step.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that trains, by name (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def reference_forward(model: nn.Module, adapters_off: bool = False) -> Iterator[nn.Module]:
    """:func:`eval_mode` with no gradients and (optionally) PEFT adapters disabled: the model as a
    deterministic reference whose outputs never enter the autograd graph."""
    disable = model.disable_adapter() if adapters_off and is_peft_model(model) else contextlib.nullcontext()
    with eval_mode(model), disable:
        yield model


def align_to_inputs(logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Logits of the input positions only: PEFT prompt tuning prepends virtual-token positions."""
    return logits[:, -seq_len:] if logits.shape[1] > seq_len else logits


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy that never trains: no gradients, evaluation mode."""
    teacher = copy.deepcopy(model)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()
