"""A training process killed with SIGKILL resumes and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from retain.config import ConfigError, load_config
from retain.train import finetune


def _write_config(path: Path, model_dir: Path, data: Path, out: Path, strategies: list, steps: int) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [
            {"name": "first", "data": {"path": str(data), "max_length": 32}},
            {"name": "second", "data": {"path": str(data), "max_length": 16}},
        ],
        "strategies": strategies,
        "train": {"steps_per_task": steps, "batch_size": 4, "lr": 3e-3, "progress": False, "warmup_steps": 3},
        "checkpoint": {"every": 5, "keep": 2},
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def _kill_after_first_checkpoint(config: Path, run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "retain.cli", "train", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((run_dir / "checkpoints").glob("step-*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()


@pytest.mark.parametrize("strategies", [["full"], [{"name": "lora", "r": 4, "dropout": 0.1}]], ids=["full", "lora"])
def test_sigkill_then_resume_matches_uninterrupted(strategies, tiny_model_dir, text_file, tmp_path):
    steps = 60
    reference_cfg = _write_config(tmp_path / "ref.yaml", tiny_model_dir, text_file, tmp_path / "ref", strategies, steps)
    finetune(load_config(reference_cfg))

    killed_dir = tmp_path / "killed"
    killed_cfg = _write_config(tmp_path / "killed.yaml", tiny_model_dir, text_file, killed_dir, strategies, steps)
    _kill_after_first_checkpoint(killed_cfg, killed_dir)
    resumed = subprocess.run(
        [sys.executable, "-m", "retain.cli", "train", str(killed_cfg), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    expected, got = _final_weights(tmp_path / "ref"), _final_weights(killed_dir)
    assert expected.keys() == got.keys()
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6
    moved = max((expected[k].float() - load_file(str(tiny_model_dir / "model.safetensors")).get(k, expected[k]).float()).abs().max().item() for k in expected)
    assert moved > 0 or "lora" in str(strategies)


def test_existing_run_dir_needs_resume_flag(tiny_model_dir, text_file, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tiny_model_dir, text_file, tmp_path / "run", ["full"], 4)
    finetune(load_config(cfg))
    with pytest.raises(ConfigError, match="--resume"):
        finetune(load_config(cfg))


def test_resume_refuses_a_changed_config(tiny_model_dir, text_file, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tiny_model_dir, text_file, tmp_path / "run", ["full"], 4)
    finetune(load_config(cfg))
    with pytest.raises(ConfigError, match="config differs"):
        finetune(load_config(cfg, ["train.lr=0.5"]), resume=True)
