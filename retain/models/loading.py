"""Load a causal LM and its tokenizer from a local directory or a hub id, or an adapter directory.

Every failure to load is a :class:`~retain.errors.ModelError` that names the model (and, for an
adapter, the adapter and the base it was put on), never a transformers or peft traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retain.config import ModelConfig
from retain.data.collate import ensure_pad_token
from retain.errors import ModelError, RetainError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers, peft and safetensors raise for files that are missing, damaged or mismatched."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover - safetensors always comes with transformers
        pass
    return errors


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): it exists, starts like a path, or has several folders."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _explain_load_error(name: str, err: BaseException, what: str = "model") -> ModelError:
    local = Path(name).expanduser()
    hint = f"point model.name_or_path (or the command's {what} argument) at a model directory or hub id"
    if _looks_local(name) and not local.exists():
        return ModelError(f"cannot load the {what}: {name} does not exist", hint=hint)
    if local.is_dir() and what == "model" and not (local / "config.json").exists():
        return ModelError(f"cannot load the {what}: {name} has no config.json, so it is not a Hugging Face model folder", hint=hint)
    where = "" if _looks_local(name) else " (a hub id: check the spelling and your network)"
    return ModelError(f"cannot load the {what} {name}{where}: {_first_line(err)}", hint=hint)


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except _load_errors() as err:
        raise _explain_load_error(name_or_path, err, "tokenizer") from err
    return ensure_pad_token(tokenizer)


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
    except RetainError:
        raise
    except _load_errors() as err:
        raise _explain_load_error(config.name_or_path, err) from err
    tokenizer = load_tokenizer(
        config.tokenizer or config.name_or_path,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )
    return model, tokenizer


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_name(adapter: str | Path) -> str:
    """The base model recorded in an adapter's ``adapter_config.json`` (``base_model_name_or_path``)."""
    config_path = Path(adapter) / "adapter_config.json"
    try:
        recorded = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"{config_path}: not a readable adapter config ({_first_line(err)})") from None
    if not isinstance(recorded, str) or not recorded:
        raise ModelError(
            f"{config_path}: no base_model_name_or_path, so the adapter's base model is unknown",
            hint="set base_model_name_or_path in adapter_config.json to the model the adapter was trained on",
        )
    return recorded


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
                            r"the shape in current model is (.+?)\.?$", re.MULTILINE)


def _adapter_mismatch(adapter: str, base: str, err: BaseException) -> ModelError:
    """peft reports a wrong base as dozens of size-mismatch lines; one line names the adapter, the base and the first."""
    match = _SIZE_MISMATCH.search(str(err))
    if match:
        name, theirs, ours = match.groups()
        detail = f"shapes do not fit, e.g. {name}: {theirs} in the adapter, {ours} on this base"
    else:
        detail = _first_line(err)
    try:
        recorded = adapter_base_name(adapter)
    except ModelError:
        recorded = None
    hint = (
        f"the adapter records base '{recorded}'; pass the base model it was trained on"
        if recorded and recorded != base
        else "pass the base model the adapter was trained on"
    )
    return ModelError(f"cannot apply the adapter {adapter} to the base model {base}: {detail}", hint=hint)


def apply_adapter(model: nn.Module, adapter: str | Path, base: str, adapter_name: str = "default") -> nn.Module:
    """``model`` (the base, or a peft model already holding adapters) with the adapter at ``adapter`` loaded.

    A base the adapter does not fit (other sizes, missing target modules) raises a ``ModelError``
    naming both, instead of peft's size-mismatch listing.
    """
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name)
    except RetainError:
        raise
    except _load_errors() as err:
        raise _adapter_mismatch(str(adapter), str(base), err) from err


def load_any(path: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """A full model directory, a hub id, or a peft adapter directory (its base model is loaded first)."""
    if is_adapter_dir(path):
        base_name = adapter_base_name(path)
        base, _ = load_model(ModelConfig(name_or_path=base_name, dtype=dtype, trust_remote_code=trust_remote_code))
        model = apply_adapter(base, path, base_name)
        tokenizer_dir = path if (Path(path) / "tokenizer_config.json").exists() else base_name
        return model, load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    return load_model(ModelConfig(name_or_path=path, dtype=dtype, trust_remote_code=trust_remote_code))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
