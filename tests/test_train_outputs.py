"""Filesystem failures in the run folder become OutputError naming the path and the cause, and a
checkpoint save that fails midway leaves no half checkpoint for --resume to pick."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import run_config

import retain.train.checkpoint as ckpt
from retain.errors import OutputError
from retain.train import finetune


def test_output_dir_under_a_regular_file(tiny_model_dir, text_file, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"not-a-folder/run: .*not-a-folder is a file, not a folder"):
        finetune(run_config(str(tiny_model_dir), text_file, blocker / "run", ["full"], steps=2))
    with pytest.raises(OutputError, match=r"not-a-folder.*a file, not a folder"):
        finetune(run_config(str(tiny_model_dir), text_file, blocker, ["full"], steps=2))


def test_output_dir_in_a_read_only_place(tiny_model_dir, text_file, tmp_path, monkeypatch):
    read_only = tmp_path / "mounted-read-only"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # root ignores permission bits, so the file system says no instead
        if str(path).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OutputError, match=r"mounted-read-only/run.*read-only file system") as raised:
        finetune(run_config(str(tiny_model_dir), text_file, read_only / "run", ["full"], steps=2))
    assert raised.value.hint and "output.dir" in raised.value.hint


def test_train_log_that_cannot_be_appended(tiny_model_dir, text_file, tmp_path):
    (tmp_path / "run" / "train_log.jsonl").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}\n")  # a run folder (a run that stopped before its first checkpoint)
    with pytest.raises(OutputError, match=r"append to .*train_log.jsonl: the path is a folder, not a file"):
        finetune(run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full"], steps=2))


def test_disk_full_mid_checkpoint_keeps_the_last_complete_one(tiny_model_dir, text_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    config = run_config(str(tiny_model_dir), text_file, run_dir, ["full"], steps=6)
    config.checkpoint.every, config.checkpoint.keep = 2, 3
    real_save_file = ckpt.save_file
    saves: list[str] = []

    def save_file(tensors, filename, *args, **kwargs):
        saves.append(os.path.basename(filename))
        if saves.count("rng.safetensors") == 2:  # the second checkpoint, after its weights were written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(OutputError, match=r"step-00000004-task00: no space left on the device") as raised:
        finetune(config)
    assert "--resume" in (raised.value.hint or "")
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == ["step-00000002-task00"], left  # no temporary folder, no half checkpoint
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None and ckpt.load_checkpoint(latest).position.step_in_task == 2

    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed: resume finishes the run
    outcome = finetune(config, resume=True)
    assert outcome.task_stats[0].steps == 4 and (outcome.final_dir / "config.json").is_file()


_SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, sys
from pathlib import Path
import torch
from retain.errors import OutputError
from retain.train import checkpoint as ckpt

limit, run_dir = int(sys.argv[1]), Path(sys.argv[2])
model = torch.nn.Linear(256, 256)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 256)).sum().backward()
optimizer.step()
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ: EFBIG
try:
    ckpt.save_checkpoint(run_dir, position=ckpt.Position(0, 1, 1, True), model=model, full_weights=True,
                         optimizer=optimizer, scheduler=None, strategy_state={})
except OutputError as err:
    print("OutputError:", err)
"""


@pytest.mark.parametrize("limit, writer", [(100_000, "safetensors"), (400_000, "torch.save")])
def test_real_write_failures_of_both_writers_become_output_errors(limit, writer, tmp_path):
    """Weights (257 kB) fail under 100 kB; under 400 kB they fit and the optimizer state (514 kB) fails."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_FILE_SIZE_LIMIT, str(limit), str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OutputError: cannot write" in result.stdout and "step-00000001-task00: file too large" in result.stdout
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
