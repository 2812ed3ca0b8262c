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
    model: nn.Module, tokenizer: Any, out_dir: Path, *, merge: bool = False, as_full_model: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir`` atomically: the full model, or a peft adapter (+ ``merged/`` with ``merge``).

    ``as_full_model`` saves adapters folded into the weights as the main directory: needed when a
    strategy merged earlier tasks' adapters into the base weights, so the adapter alone is not the model.
    ``state_dict``: the whole weights of a sharded (FSDP2) model, gathered by the caller; the folder is
    the one the unsharded model would give (plain ``from_pretrained`` loads it).
    """
    if state_dict is not None:
        with atomic_dir(Path(out_dir)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            _unsharded_architecture(model, tmp / "config.json")
            tokenizer.save_pretrained(tmp)
        return Path(out_dir)
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


def _unsharded_architecture(model: nn.Module, config_path: Path) -> None:
    """FSDP2 renames a sharded model's class (``FSDPLlamaForCausalLM``); config.json names the model's own."""
    import json

    own = next((c.__name__ for c in type(model).__mro__[1:] if issubclass(c, nn.Module) and not c.__name__.startswith("FSDP")),
               None)
    if own is None or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if any(str(a).startswith("FSDP") for a in config.get("architectures") or []):
        config["architectures"] = [own]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
