"""Load a causal LM and its tokenizer from a local directory or a hub id, or an adapter directory.

Every failure to load is a :class:`~retain.errors.ModelError` that names the model (and, for an
adapter, the adapter and the base it was put on), never a transformers or peft traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retain.config import ModelConfig, QuantizationConfig
from retain.data.collate import ensure_pad_token
from retain.errors import ConfigError, ModelError, RetainError

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
    """``err`` on one line: its lines joined (a library's "from one of:" list is not cut after the colon)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): it exists, starts like a path, or has several folders."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


#: Files one of which a local tokenizer folder holds (fast, sentencepiece, BPE and WordPiece tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def unreadable_path(path: Path) -> Path | None:
    """``path``, or a file directly in it, that this user may not read; None when all can be read.

    Libraries report an unreadable model file as a missing one ("No such file or directory"), which
    sends the user looking in the wrong place: a permission problem must be named as one.
    """
    try:
        if not path.exists():
            return None
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            return path
        return next((f for f in sorted(path.iterdir()) if f.is_file() and not os.access(f, os.R_OK)), None) if path.is_dir() else None
    except PermissionError:
        return path


def _explain_load_error(name: str, err: BaseException, what: str = "model") -> ModelError:
    local = Path(name).expanduser()
    hint = f"point model.name_or_path (or the command's {what} argument) at a model directory or hub id"
    denied = unreadable_path(local)
    if denied is not None:
        return ModelError(f"cannot load the {what} {name}: permission denied reading {denied}",
                          hint="ask its owner to make it readable (chmod -R a+rX), or copy it where you can read it")
    if what == "tokenizer" and local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        return ModelError(
            f"cannot load the tokenizer: {name} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)})",
            hint="copy the tokenizer files of its base model into that folder, or set model.tokenizer to the base model",
        )
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


def check_quantization(quantization: QuantizationConfig | None, where: str = "model.quantization") -> None:
    """Refuse quantization where bitsandbytes cannot run it: no CUDA device, or bitsandbytes not installed.

    Checked before any weights load, so the mistake costs seconds rather than a download.
    """
    if quantization is None:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{where}: bitsandbytes quantization needs a CUDA device and none is available here",
            hint=f"remove {where} to train in full precision (model.dtype: bfloat16 halves memory), or run on a GPU",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{where} needs the bitsandbytes package", hint="pip install bitsandbytes") from None


def check_quantized_training(config: ModelConfig, *, trains_adapters: bool) -> None:
    """A quantized base only trains through adapters (QLoRA): its weights are frozen integer blocks."""
    if config.quantization is None:
        return
    if not trains_adapters:
        raise ConfigError(
            "model.quantization: a quantized model trains only through adapters, and no strategy adds any",
            hint="list lora (or o-lora, prompt-tuning, progressive-prompts) in strategies, or remove model.quantization",
        )
    check_quantization(config.quantization)


def bnb_config(quantization: QuantizationConfig) -> Any:
    """The transformers ``BitsAndBytesConfig`` for a quantization section."""
    from transformers import BitsAndBytesConfig

    if quantization.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=_DTYPES[quantization.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
        bnb_4bit_quant_storage=getattr(torch, quantization.bnb_4bit_quant_storage),
    )


def prepare_for_training(model: nn.Module, config: ModelConfig, *, gradient_checkpointing: bool) -> nn.Module:
    """Before strategies wrap the model: peft's k-bit preparation for a quantized model (norms in fp32,
    input gradients on), and gradient checkpointing without re-entrant autograd (which also works for
    frozen inputs, so full and adapter training behave alike)."""
    if config.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
        enable = getattr(model, "activation_checkpointing_enable", None)  # the transformers 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing and getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    return model


def load_model(config: ModelConfig) -> tuple[nn.Module, Any]:
    """Model + tokenizer for training. ``trust_remote_code`` stays off unless the config turns it on."""
    from transformers import AutoModelForCausalLM

    check_quantization(config.quantization)
    extra: dict[str, Any] = {}
    if config.quantization is not None:
        extra = {"quantization_config": bnb_config(config.quantization), "device_map": {"": torch.cuda.current_device()}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            config.name_or_path,
            dtype=_DTYPES[config.dtype],
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            **extra,
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
