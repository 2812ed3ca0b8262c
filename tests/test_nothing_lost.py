"""Nothing lost, second round (issue 20): names that become paths, one writer per run folder, SIGTERM,
permissions, resume fingerprints. Each rule is checked through the real CLI (``python -m retain``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retain.cli import app
from retain.errors import OutputError
from retain.io import inside

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def retain(*args: object, cwd: Path) -> Ran:
    """The real CLI (``retain ...`` as typed, in ``cwd``), run in this process: no second torch import.
    Signals and several processes need a real subprocess (see the tests of item 3)."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], env={"RETAIN_DEBUG": ""})
    finally:
        os.chdir(previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


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


# --------------------------------------------------------------------------------------------
# 2. One writer per run folder


def _dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_second_train_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    import socket

    from retain.io_lock import LOCK_FILE, FolderLock

    config = write_run(tmp_path, tiny_model_dir, text_file)
    run_dir = tmp_path / "runs" / "v"
    with FolderLock(run_dir, "retain train"):  # a live writer (this process)
        refused = retain("train", config, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert f"is in use by retain train (pid {os.getpid()} on {socket.gethostname()}, started " in refused.stderr
    assert not (run_dir / "config.yaml").exists() and not (run_dir / LOCK_FILE).exists()

    (run_dir / LOCK_FILE).write_text(json.dumps({"command": "retain train", "pid": _dead_pid(), "host": socket.gethostname(),
                                                 "started": 0}))
    taken = retain("train", config, cwd=tmp_path)
    assert taken.returncode == 0, taken.stderr
    assert "warning:" in taken.stderr and "taking over the lock of retain train (pid" in taken.stderr, taken.stderr
    assert not (run_dir / LOCK_FILE).exists()  # released on exit
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')  # fails after the lock was taken
    failed = retain("train", config, "--set", "output.dir=runs/w", "--set", f"tasks[0].data.path={tmp_path / 'bad.jsonl'}", cwd=tmp_path)
    assert failed.returncode == 2 and "malformed JSON" in failed.stderr, failed.stderr
    assert (tmp_path / "runs" / "w" / "config.yaml").is_file() and not (tmp_path / "runs" / "w" / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    from retain.errors import StateError
    from retain.io_lock import LOCK_FILE, FolderLock

    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps({"command": "retain bench", "pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(StateError, match="in use by retain bench .pid 1 on elsewhere") as refused:
        FolderLock(tmp_path, "retain train").acquire()
    assert refused.value.hint and "delete" in refused.value.hint


def test_merge_and_bench_hold_their_out_folder(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from retain.config import DataConfig, TaskConfig
    from retain.errors import StateError
    from retain.eval.suite import SuiteConfig
    from retain.eval.tasks import LossEval
    from retain.io_lock import FolderLock
    from retain.scenarios.base import Scenario
    from retain.scenarios.bench import run_bench

    out = tmp_path / "merged"
    with FolderLock(out, "retain merge"):
        result = CliRunner().invoke(app, ["merge", str(tiny_model_dir), str(tiny_model_dir), "--out", str(out)],
                                    env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 2 and f"is in use by retain merge (pid {os.getpid()}" in result.output, result.output
    held = tmp_path / "held.jsonl"  # the overlap guard refuses scoring the training file itself
    held.write_text("".join(json.dumps({"text": f"a held-out line about a quiet river, number {i}."}) + "\n" for i in range(8)))
    scenario = Scenario(
        name="tiny", base_model=str(tiny_model_dir),
        tasks=[TaskConfig(name="t", data=DataConfig(path=str(text_file), max_length=16))],
        suite=SuiteConfig(tasks=[LossEval(name="g", data=DataConfig(path=str(held), max_length=16), max_examples=2)]),
        general_data=None, train={"steps_per_task": 1, "batch_size": 2},
    )
    with FolderLock(tmp_path / "bench", "retain bench tiny"), pytest.raises(StateError, match="in use by retain bench tiny"):
        run_bench(scenario, ["full"], out=tmp_path / "bench", progress=False)


# --------------------------------------------------------------------------------------------
# 3. SIGTERM (docker stop, Kubernetes, Slurm preemption) is Ctrl-C with exit 143


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_and_prints_the_resume_command(
    signum: int, code: int, word: str, tiny_model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    from retain.io_lock import LOCK_FILE

    config = write_run(tmp_path, tiny_model_dir, text_file, steps=100_000)
    run_dir = tmp_path / "runs" / "v"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RETAIN_DEBUG": ""}
    proc = subprocess.Popen([sys.executable, "-m", "retain", "train", str(config)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert "saving a checkpoint of the last completed step" in stdout, stdout
    (line,) = [line for line in stderr.splitlines() if line.startswith(word)]
    assert "Traceback" not in stderr and line.endswith(f"continue with: retain train {config} --resume"), line
    step = json.loads(log.read_text().splitlines()[-1])["step"]
    assert f"after step {step} of 100000" in line and (run_dir / "checkpoints" / f"step-{step:08d}-task00").is_dir()
    assert not (run_dir / LOCK_FILE).exists()


# --------------------------------------------------------------------------------------------
# 5. --resume refuses changed data


def test_resume_refuses_changed_data_unless_asked(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """The issue's reproduction: the data file was cut between the runs and the resume went on silently."""
    data = tmp_path / "data.jsonl"
    data.write_text(text_file.read_text())
    config = write_run(tmp_path, tiny_model_dir, data, steps=4, extra="checkpoint: {every: 2, keep: 3}\n")
    run_dir = tmp_path / "runs" / "v"
    assert retain("train", config, cwd=tmp_path).returncode == 0
    recorded = json.loads((run_dir / "inputs.json").read_text())["files"]
    assert list(recorded) == [str(data)]
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004-task01")  # as if killed after step 2
    data.write_text("".join(text_file.read_text().splitlines(keepends=True)[:30]))
    refused = retain("train", config, "--resume", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert f"error: --resume refused: {data} changed since the run in " in refused.stderr
    assert "--allow-changed-data" in refused.stderr
    allowed = retain("train", config, "--resume", "--allow-changed-data", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert f"warning: resuming on changed input data (--allow-changed-data): {data}" in allowed.stderr
    record = json.loads((run_dir / "inputs.json").read_text())
    assert record["files"][str(data)] != recorded[str(data)] and record["allowed_changes"][0]["files"] == [str(data)]


# --------------------------------------------------------------------------------------------
# 7. Written files get the permissions of the umask, not tempfile's 0600/0700


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*") if not p.name.startswith(".")}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_permissions_of_the_umask(umask: int, tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    config = write_run(tmp_path, tiny_model_dir, text_file)
    previous = os.umask(umask)
    try:
        done = retain("train", config, cwd=tmp_path)
    finally:
        os.umask(previous)
    assert done.returncode == 0, done.stderr
    modes = _modes(tmp_path / "runs" / "v")
    for name in ("final", "final/model.safetensors", "config.yaml", "inputs.json", "tasks/00-t", "tasks/00-t/config.json"):
        assert name in modes, sorted(modes)
    for name, mode in modes.items():
        is_dir = (tmp_path / "runs" / "v" / name).is_dir()
        assert mode == (0o777 if is_dir else 0o666) & ~umask, f"{name}: {oct(mode)}"


def test_a_model_that_cannot_be_read_is_named_as_a_permission_problem(tiny_model_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, where every file is readable: os.access answers as for another account."""

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    from transformers import AutoModelForCausalLM

    def load_fails(*args: object, **kwargs: object) -> None:  # what the issue saw for an unreadable file
        raise OSError(f"No such file or directory: {model / 'model.safetensors'}")

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).name != "model.safetensors" and real_access(p, mode, **kw))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_fails)
    result = CliRunner().invoke(app, ["generate", str(model), "hello"], env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 2, result.output
    assert f"permission denied reading {model / 'model.safetensors'}" in result.output, result.output



# --------------------------------------------------------------------------------------------
# 10. Smaller items, each as the issue reproduced it


def test_windows_longer_than_the_model_are_capped_with_a_warning(tiny_model_dir: Path, pc_file: Path, tmp_path: Path) -> None:
    """max_length: 100000 on a 256-token model; and a prompt/completion file with empty completions."""
    data = tmp_path / "pc.jsonl"
    rows = [json.loads(line) for line in pc_file.read_text().splitlines()]
    rows[:3] = [{**row, "completion": ""} for row in rows[:3]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_run(tmp_path, tiny_model_dir, data, steps=1)
    done = retain("train", config, "--set", "tasks[0].data.max_length=100000", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ("warning: tasks[0].data.max_length 100000 is longer than the model's context (256 tokens): capped at 256; "
            "set tasks[0].data.allow_longer_than_model: true to keep it") in done.stderr, done.stderr
    assert f"warning: {data}: 3 of 40 records have an empty 'completion'" in done.stderr, done.stderr
    kept = retain("train", config, "--set", "tasks[0].data.max_length=300", "--set", "tasks[0].data.allow_longer_than_model=true",
                  "--set", "output.dir=runs/w", cwd=tmp_path)
    assert kept.returncode == 0 and "capped" not in kept.stderr, kept.stderr


def test_small_cli_items(tiny_model_dir: Path, tmp_path: Path) -> None:
    from retain import __version__

    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"retain {__version__}"
    # a bad --set is blamed on the --set, not on the YAML that never held it
    config = tmp_path / "base.yaml"
    config.write_text("model: {name_or_path: m}\ntasks: [{name: t, data: {path: d.jsonl}}]\n")
    bad = runner.invoke(app, ["train", str(config), "--set", "train.lr=abc"], env={"RETAIN_DEBUG": ""})
    assert bad.exit_code == 2 and "--set train.lr=abc" in bad.output and "base.yaml" not in bad.output, bad.output
    # report --out into folders that do not exist yet: created, and said so
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"schema_version": "1.0", "base_model": "m", "runs": []}))
    report = runner.invoke(app, ["report", str(results), "--out", str(tmp_path / "a" / "b" / "r.html")])
    assert report.exit_code == 0 and f"created the folder {tmp_path / 'a'} for the report" in report.output, report.output
    # a merge that fails leaves no --out behind
    out = tmp_path / "merged"
    merge = runner.invoke(app, ["merge", str(tiny_model_dir), str(tiny_model_dir), "--method", "ties", "--out", str(out)],
                          env={"RETAIN_DEBUG": ""})
    assert merge.exit_code == 2 and "--method ties" in merge.output, merge.output
    assert not out.exists()


def test_sigterm_stops_two_processes_at_the_same_step(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its workers: both stop after the same step, the main one checkpoints it
    and releases the lock, each prints the resume command and exits 143. About 10 s on two cores."""
    from retain.io_lock import LOCK_FILE

    config = write_run(tmp_path, tiny_model_dir, text_file, steps=100_000)
    run_dir = tmp_path / "runs" / "v"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RETAIN_DEBUG": ""}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "retain", "train",
         str(config)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    assert launcher.poll() is None, launcher.communicate()[1][-3000:]
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith("terminated: stopped")]
    assert len(lines) == 2 and lines[0] == lines[1], stderr[-3000:]  # both processes, the same step
    step = json.loads(log.read_text().splitlines()[-1])["step"]
    assert f"after step {step} of 100000" in lines[0] and lines[0].endswith("--resume")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{step:08d}-task00"]
    assert not (run_dir / LOCK_FILE).exists()
