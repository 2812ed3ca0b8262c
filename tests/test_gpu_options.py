"""GPU options on a CPU machine: quantization is refused before any model loads; gradient checkpointing
trains to the same losses and weights as plain backward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retain.config import load_config_dict
from retain.errors import ConfigError
from retain.train import finetune

REPO = Path(__file__).resolve().parents[1]


def _config(model_dir: Path, data: Path, out: Path, strategies, **extra) -> dict:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "t1", "data": {"path": str(data), "max_length": 32}}],
        "strategies": strategies,
        "train": {"steps_per_task": 4, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1},
        "output": {"dir": str(out)},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_quantization_needs_exactly_one_width(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of load_in_4bit or load_in_8bit"):
        load_config_dict(_config(tiny_model_dir, text_file, tmp_path / "r", ["lora"], model__quantization={}))
    with pytest.raises(ConfigError, match="model.quantization.bnb_4bit_quant_typ"):
        load_config_dict(_config(tiny_model_dir, text_file, tmp_path / "r", ["lora"],
                                 model__quantization={"load_in_4bit": True, "bnb_4bit_quant_typ": "nf4"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_quantization_is_refused_without_cuda_before_the_model_loads(tiny_model_dir, text_file, tmp_path):
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    config = load_config_dict(_config("/no/such/model", text_file, tmp_path / "r", ["lora"], model__quantization=quant))
    with pytest.raises(ConfigError, match="needs a CUDA device") as err:
        finetune(config)  # the model path does not exist: the refusal comes first
    assert "model.quantization" in str(err.value) and err.value.hint
    assert not (tmp_path / "r").exists()  # nothing was written either


def test_quantization_needs_an_adapter_strategy(tiny_model_dir, text_file, tmp_path):
    config = load_config_dict(_config(tiny_model_dir, text_file, tmp_path / "r", ["full"],
                                      model__quantization={"load_in_4bit": True}))
    with pytest.raises(ConfigError, match="trains only through adapters"):
        finetune(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_reports_the_quantization_refusal_in_one_line(tiny_model_dir, text_file, tmp_path):
    import yaml

    config = _config(tiny_model_dir, text_file, tmp_path / "r", ["lora"], model__quantization={"load_in_4bit": True})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "retain", "train", str(path)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 2
    assert "model.quantization: bitsandbytes quantization needs a CUDA device" in done.stderr


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategies", [["full"], ["lora"]], ids=["full", "lora"])
def test_gradient_checkpointing_trains_like_plain_backward(tiny_model_dir, text_file, tmp_path, strategies):
    plain = finetune(load_config_dict(_config(tiny_model_dir, text_file, tmp_path / "plain", strategies)))
    checkpointed = finetune(load_config_dict(_config(tiny_model_dir, text_file, tmp_path / "gc", strategies,
                                                     train__gradient_checkpointing=True)))
    base = checkpointed.model.get_base_model() if hasattr(checkpointed.model, "get_base_model") else checkpointed.model
    assert base.is_activation_checkpointing and not base.config.use_cache
    assert not plain.model.is_activation_checkpointing
    got, expected = _losses(tmp_path / "gc"), _losses(tmp_path / "plain")
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    assert got[-1] < got[0]  # it trained
    plain_weights = dict(plain.model.named_parameters())
    diff = max((p - plain_weights[n]).abs().max().item() for n, p in checkpointed.model.named_parameters())
    assert diff < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_exits_cleanly_without_cuda():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "no CUDA device on this machine" in done.stdout
