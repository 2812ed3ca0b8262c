"""Load a causal LM and its tokenizer from a local directory or a hub id, or an adapter directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retain.config import ModelConfig
from retain.data.collate import ensure_pad_token
from retain.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return ensure_pad_token(tokenizer)


def _explain_load_error(name: str, err: Exception) -> ConfigError:
    local = Path(name)
    if local.exists() and not (local / "config.json").exists():
        hint = f"'{name}' exists but has no config.json: point model.name_or_path at a Hugging Face model directory"
    elif not local.exists() and ("/" not in name or name.startswith((".", "/"))):
        hint = f"'{name}' is not a local directory; if it is a hub id, check the spelling and your network"
    else:
        hint = f"could not load '{name}' (local directory or hub id); check the path, the id and your network"
    return ConfigError(f"model.name_or_path: {hint}. ({type(err).__name__}: {err})")


def load_model(config: ModelConfig) -> tuple[nn.Module, Any]:
    """Model + tokenizer for training. ``trust_remote_code`` stays off unless the config turns it on."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            config.name_or_path,
            dtype=_DTYPES[config.dtype],
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
        )
        tokenizer = load_tokenizer(
            config.tokenizer or config.name_or_path,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise _explain_load_error(config.name_or_path, err) from err
    return model, tokenizer


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_any(path: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """A full model directory, a hub id, or a peft adapter directory (its base model is loaded first)."""
    if is_adapter_dir(path):
        from peft import PeftModel

        base_name = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, _ = load_model(ModelConfig(name_or_path=base_name, dtype=dtype, trust_remote_code=trust_remote_code))
        model = PeftModel.from_pretrained(base, path)
        tokenizer_dir = path if (Path(path) / "tokenizer_config.json").exists() else base_name
        return model, load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    return load_model(ModelConfig(name_or_path=path, dtype=dtype, trust_remote_code=trust_remote_code))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
