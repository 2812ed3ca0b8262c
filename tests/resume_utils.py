"""Kill-and-resume check shared by the strategy tests: SIGKILL a training subprocess after its first
checkpoint, resume it, and compare the final weights with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from retain.config import load_config
from retain.train import finetune


def write_config(path: Path, model_dir: Path, data: Path, out: Path, strategies: list, steps: int, **extra: Any) -> Path:
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
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = Path(run_dir) / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def kill_after_first_checkpoint(config: Path, run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "retain", "train", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((run_dir / "checkpoints").glob("step-*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()


def assert_kill_resume_matches(tmp_path: Path, model_dir: Path, data: Path, strategies: list, steps: int = 60, **extra: Any) -> float:
    """Run uninterrupted in-process, then kill+resume in subprocesses; returns the max abs weight difference."""
    reference = write_config(tmp_path / "ref.yaml", model_dir, data, tmp_path / "ref", strategies, steps, **extra)
    finetune(load_config(reference))
    killed_dir = tmp_path / "killed"
    killed = write_config(tmp_path / "killed.yaml", model_dir, data, killed_dir, strategies, steps, **extra)
    kill_after_first_checkpoint(killed, killed_dir)
    resumed = subprocess.run(
        [sys.executable, "-m", "retain", "train", str(killed), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    expected, got = final_weights(tmp_path / "ref"), final_weights(killed_dir)
    assert expected.keys() == got.keys()
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    return worst
