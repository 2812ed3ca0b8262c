"""Ctrl-C during training: the step finishes, a checkpoint of it is written, the run stops with one line
saying where and the exact command that continues it (exit 130), and that command ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_config

from retain.models.tiny import char_tokenizer, tiny_model
from retain.strategies import Strategy
from retain.strategies.registry import available_strategies, register_strategy
from retain.train import checkpoint as ckpt
from retain.train import finetune
from retain.train.interrupt import TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]


class _CtrlC(Strategy):
    """Sends SIGINT to this process during the chosen step (as a user's Ctrl-C would arrive mid-step)."""

    at: int | None = None

    def extra_losses(self, outputs, batch, ctx):
        if ctx.step_in_task == _CtrlC.at:
            os.kill(os.getpid(), signal.SIGINT)
        return {}


def _tiny():
    tokenizer = char_tokenizer()
    return tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4), tokenizer


def test_ctrl_c_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(text_file: Path, tmp_path: Path) -> None:
    if "test-ctrl-c" not in available_strategies():
        register_strategy("test-ctrl-c")(_CtrlC)
    strategies = ["full", "test-ctrl-c"]
    reference = finetune(run_config("tiny", text_file, tmp_path / "ref", strategies, steps=8), model=_tiny()[0], tokenizer=_tiny()[1])

    _CtrlC.at = 2  # during the third step
    config = run_config("tiny", text_file, tmp_path / "run", strategies, steps=8)
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a background job
    try:
        with pytest.raises(TrainingInterrupted) as raised:
            finetune(config, model=_tiny()[0], tokenizer=_tiny()[1])
    finally:
        _CtrlC.at = None
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is removed again
    stop = raised.value
    assert "task 't1' (1 of 1), after step 3 of 8 (global step 3)" in str(stop)
    assert stop.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000003-task00"
    assert ckpt.load_checkpoint(stop.checkpoint).position.step_in_task == 3
    assert not (tmp_path / "run" / "final").exists()

    resumed = finetune(config, resume=True, model=_tiny()[0], tokenizer=_tiny()[1])
    expected, got = dict(reference.model.named_parameters()), dict(resumed.model.named_parameters())
    assert max((expected[n] - got[n]).abs().max().item() for n in expected) <= 1e-6


def test_the_cli_exits_130_with_where_it_stopped_and_the_resume_command(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "my run.yaml"  # a space: the printed command must quote it
    config.write_text(
        f"model: {{name_or_path: '{tiny_model_dir}'}}\ntasks: [{{name: t, data: {{path: '{text_file}', max_length: 16}}}}]\n"
        f"train: {{steps_per_task: 3000, batch_size: 2, progress: false, log_every: 1}}\noutput: {{dir: '{run_dir}'}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RETAIN_DEBUG": ""}
    command = [sys.executable, "-m", "retain", "train", str(config), "--set", "train.lr=0.002"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    line = lines[0]
    steps = [json.loads(row)["step"] for row in log.read_text().splitlines()]
    assert f"after step {steps[-1]} of 3000 (global step {steps[-1]})" in line
    assert f"checkpoints/step-{steps[-1]:08d}-task00" in line
    again = line.split("continue with: ", 1)[1]
    assert shlex.split(again) == ["retain", "train", str(config), "--set", "train.lr=0.002", "--resume"]

    # the printed command continues the run (3000 steps is long: end it after the resume message)
    resumed = subprocess.Popen([sys.executable, "-m", "retain", *shlex.split(again)[1:]],  # `retain` as `python -m retain`
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(log.read_text().splitlines()) <= len(steps):
        time.sleep(0.05)
    resumed.send_signal(signal.SIGINT)
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, output[-2000:]
    assert f"after step {steps[-1]} of 3000" in output  # "resuming from ...: task 't' (1 of 1), after step k ..."
    rows = [json.loads(row)["step"] for row in log.read_text().splitlines()]
    assert rows[len(steps)] == steps[-1] + 1  # it went on from the next step
