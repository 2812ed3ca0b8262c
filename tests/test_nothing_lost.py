"""Nothing lost, second round (issue 20): names that become paths, one writer per run folder, SIGTERM,
permissions, resume fingerprints. Each rule is checked through the real CLI (``python -m retain``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retain.errors import OutputError
from retain.io import inside

REPO = Path(__file__).resolve().parents[1]


def retain(*args: object, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m retain ...`` on this tree's code (not an installed copy)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RETAIN_DEBUG": "", **env}
    return subprocess.run([sys.executable, "-m", "retain", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def write_run(folder: Path, model: Path, data: Path, *, steps: int = 2, out: str = "runs/v", extra: str = "") -> Path:
    path = folder / "base.yaml"
    path.write_text(
        f"model: {{name_or_path: '{model}'}}\n"
        f"tasks: [{{name: t, data: {{path: '{data}', max_length: 16}}}}]\n"
        f"train: {{steps_per_task: {steps}, batch_size: 2, progress: false, log_every: 1}}\n"
        f"output: {{dir: '{out}'}}\n{extra}"
    )
    return path


# --------------------------------------------------------------------------------------------
# 1. Names that become paths


def test_a_task_name_cannot_write_outside_the_run_folder(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """The issue's reproduction: the task name climbed out of output.dir and replaced the user's folder."""
    work = tmp_path / "work" / "a" / "b"
    work.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("x")
    config = write_run(work, tiny_model_dir, text_file)
    done = retain("train", config, "--set", "tasks[0].name=../../../../../victim", "--set", "output.dir=runs/v", cwd=work)
    assert done.returncode == 2, done.stderr
    assert "'tasks[0].name'" in done.stderr and "path separator" in done.stderr, done.stderr
    assert (victim / "thesis.txt").read_text() == "x"
    assert not (work / "runs").exists()  # refused before anything was written
    nested = retain("train", config, "--set", "tasks[0].name=legal/contracts", cwd=work)
    assert nested.returncode == 2 and "'tasks[0].name'" in nested.stderr, nested.stderr


def test_paths_built_from_names_stay_inside_their_folder(tmp_path: Path) -> None:
    assert inside(tmp_path, "tasks", "00-t") == tmp_path / "tasks" / "00-t"
    for parts in (("..", "x"), ("tasks", "../../x"), ("/etc",), (".",)):
        with pytest.raises(OutputError, match="not inside"):
            inside(tmp_path, *parts)


def test_bench_items_become_safe_folder_names() -> None:
    from retain.io import unsafe_name_problem
    from retain.scenarios.bench import run_directory_name

    for item in ("full+replay@replay.ratio=0.25", "..", "../../x", "lora@r=4/../..", "full+" + "ewc" * 80):
        name = run_directory_name(item)
        assert unsafe_name_problem(name) is None, (item, name)
    assert run_directory_name("full+replay@replay.ratio=0.25") == "full_replay_replay.ratio_0.25"
