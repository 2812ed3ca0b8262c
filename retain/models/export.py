"""Model directories ``from_pretrained`` loads: a full model, or a peft adapter (+ ``merged/``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from retain.errors import ConfigError
from retain.io import atomic_dir
from retain.models.adapters import is_peft_model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model with the adapters folded in; the training model is left untouched."""
    if not is_peft_model(model):
        return model
    if not hasattr(model.base_model, "merge_and_unload"):
        raise ConfigError(f"output.merge: {model.peft_type} adapters cannot be merged into the weights")
    return copy.deepcopy(model).merge_and_unload()


def save_model_dir(
    model: nn.Module, tokenizer: Any, out_dir: Path, *, merge: bool = False, as_full_model: bool = False
) -> Path:
    """Write ``out_dir`` atomically: the full model, or a peft adapter (+ ``merged/`` with ``merge``).

    ``as_full_model`` saves adapters folded into the weights as the main directory: needed when a
    strategy merged earlier tasks' adapters into the base weights, so the adapter alone is not the model.
    """
    with atomic_dir(Path(out_dir)) as tmp:
        if as_full_model and is_peft_model(model):
            merged_copy(model).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            return Path(out_dir)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if merge and is_peft_model(model):
            merged_copy(model).save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")
    return Path(out_dir)
