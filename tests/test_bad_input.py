"""Bad input never prints a traceback: every row runs the real CLI on one mistake a user can make and
checks the exit code, that the error fits in a few lines, that it names the file / line / key, and
that no Python traceback is shown. Plus ``--debug`` (traceback shown) and a real bug (exit 70).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from retain.cli import app
from retain.errors import DataError, OutputError, environment_error, os_error_of
from retain.io import atomic_dir
from retain.models.tiny import char_tokenizer, tiny_model

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --------------------------------------------------------------------------------------------
# Shared models: a tiny base, another base of other sizes, and a LoRA adapter trained on the first


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bad-input-models")
    tokenizer = char_tokenizer()
    other = root / "other-base"
    tiny_model("llama", len(tokenizer), seed=1, hidden=16, layers=2, heads=4).save_pretrained(other)
    tokenizer.save_pretrained(other)
    adapter = root / "adapter"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(adapter)
    # the same adapter, recorded as trained on the other base: `retain eval` loads that base for it
    wrong = root / "adapter-on-other"
    lora.save_pretrained(wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    return {"base": tiny_model_dir, "other": other, "adapter": adapter, "adapter_on_other": wrong}


@dataclass
class Ctx:
    """What a row builds its command from: a scratch folder, the shared models, monkeypatch."""

    tmp: Path
    models: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def read_only(self, name: str) -> Path:
        read_only_folder(self.monkeypatch, self.tmp / name)
        return self.tmp / name

    @property
    def good_data(self) -> Path:
        return self.file("good.jsonl", "".join(json.dumps({"text": f"the cat sat on the mat {i}."}) + "\n" for i in range(12)))

    def train_config(
        self, data: Path | str | None = None, *, model: Path | str | None = None, out: Path | None = None,
        strategies: str = "[full]", suite: Path | None = None,
    ) -> Path:
        data = data if data is not None else self.good_data
        model = model if model is not None else self.models["base"]
        out = out if out is not None else self.tmp / "run"
        text = (
            f"model: {{name_or_path: '{model}'}}\n"
            f"tasks: [{{name: t, data: {{path: '{data}', max_length: 16}}}}]\n"
            f"strategies: {strategies}\n"
            "train: {steps_per_task: 2, batch_size: 2, progress: false, log_every: 1}\n"
            f"output: {{dir: '{out}'}}\n"
        )
        if suite is not None:
            text += f"eval: {{suite: '{suite}'}}\n"
        return self.file("run.yaml", text)

    def suite(self, data: Path | str) -> Path:
        return self.file("suite.yaml", f"tasks:\n  - {{name: general, type: loss, data: {{path: '{data}', max_length: 16}}}}\n")

    def results(self, content: str) -> Path:
        return self.file("results.json", content)


# --------------------------------------------------------------------------------------------
# Simulated file-system failures (tests run as root, where chmod 0o555 does not stop writes)


def _under(path: Any, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(folder)
    except TypeError:  # a file descriptor
        return False


class _FullDiskFile:
    """A file whose writes fail the way ``write(2)`` fails on a full disk: ENOSPC, no file name."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> "_FullDiskFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def _writing(mode: str) -> bool:
    return any(flag in mode for flag in "wax+")


def read_only_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` refuses new entries with EACCES, as a ``chmod 0o555`` folder does for a normal user."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)  # the real thing where it works (not root); the patches below where it does not
    denied = lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))  # noqa: E731
    real_mkdir, real_open, real_os_open = os.mkdir, builtins.open, os.open

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if _under(path, folder) and Path(os.path.abspath(path)) != folder:
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if _under(path, folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if _under(file, folder) and _writing(mode):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def full_disk(monkeypatch: pytest.MonkeyPatch, folder: Path, only: str | None = None) -> None:
    """Files under ``folder`` (named ``only``, if given) open, but every write to them fails with ENOSPC."""
    real_open = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        hit = _under(file, folder) and _writing(mode) and (only is None or Path(os.fspath(file)).name == only)
        return _FullDiskFile(handle) if hit else handle

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


# --------------------------------------------------------------------------------------------
# The table

Args = list[Any]


@dataclass
class Row:
    """``build(ctx)`` returns the CLI arguments; ``expect`` are substrings the error must contain
    (``{tmp}`` is the row's scratch folder); ``subprocess`` runs ``python -m retain`` instead."""

    build: Callable[[Ctx], Args]
    expect: list[str]
    code: int = 2
    subprocess: dict[str, Any] = field(default_factory=dict)


def _train_on(name: str, content: str | bytes) -> Callable[[Ctx], Args]:
    return lambda c: ["train", c.train_config(c.file(name, content))]


def _read_only_run(c: Ctx) -> Args:
    return ["train", c.train_config(out=c.read_only("locked") / "run")]


def _full_disk_run(c: Ctx) -> Args:
    full_disk(c.monkeypatch, c.tmp / "full")
    return ["train", c.train_config(out=c.tmp / "full" / "run")]


def _full_disk_while_training(c: Ctx) -> Args:
    """The disk fills up after the run started: the first write that fails is a training-log line."""
    full_disk(c.monkeypatch, c.tmp / "run", only="train_log.jsonl")
    return ["train", c.train_config()]


def _symlink_loop(c: Ctx) -> Path:
    (c.tmp / "loop1.jsonl").symlink_to(c.tmp / "loop2.jsonl")
    (c.tmp / "loop2.jsonl").symlink_to(c.tmp / "loop1.jsonl")
    return c.tmp / "loop1.jsonl"


def _unreadable_folder(c: Ctx) -> Path:
    """A data folder with a subfolder this user may not list (os.access answers as for another account:
    tests run as root)."""
    c.file("data/a.jsonl", '{"text": "a"}\n')
    private = c.folder("data/private")
    real_access = os.access
    c.monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != private and real_access(p, mode, **kw))
    return c.tmp / "data"


def _without_tokenizer(c: Ctx) -> Path:
    folder = c.folder("no-tokenizer")
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((c.models["base"] / name).read_bytes())
    return folder


def _import_args(c: Ctx, checkpoint: bytes | None = b"\0" * 8, tokenizer: bytes | None = b"\0" * 8, out: str = "imported") -> Args:
    ck = c.file("model.bin", checkpoint) if checkpoint is not None else c.tmp / "missing.bin"
    tok = c.file("tok.bin", tokenizer) if tokenizer is not None else c.tmp / "missing-tok.bin"
    return ["import-llama2c", ck, tok, "--out", c.tmp / out]


def _importance(
    c: Ctx, *extra: Any, data: Path | None = None, model: Path | str | None = None, out: Path | None = None
) -> Args:
    return [
        "importance", "compute", "--model", model or c.models["base"], "--data", data or c.good_data,
        "--out", out or c.tmp / "fisher.safetensors", "--max-examples", "4", "--max-length", "16", *extra,
    ]


GOOD_RESULTS = json.dumps({"schema_version": "1.0", "base_model": "m", "runs": []})

ROWS: dict[str, Any] = {
    # ---- data files given to `retain train`
    "train-empty-file": Row(_train_on("empty.jsonl", ""), ["{tmp}/empty.jsonl", "no records"]),
    "train-malformed-jsonl": Row(_train_on("bad.jsonl", '{"text": "a"}\n{"text": \n'), ["{tmp}/bad.jsonl:2", "malformed JSON"]),
    "train-missing-field": Row(_train_on("gap.jsonl", '{"text": "a"}\n{"body": "b"}\n'), ["{tmp}/gap.jsonl:2", "missing field 'text'", "data.text_field"]),
    "train-non-utf8": Row(_train_on("latin.jsonl", b'{"text": "caf\xe9"}\n'), ["{tmp}/latin.jsonl", "UTF-8"]),
    "train-non-utf8-csv": Row(_train_on("latin.csv", b"text\ncaf\xe9\n"), ["{tmp}/latin.csv", "UTF-8"]),
    "train-csv-other-columns": Row(_train_on("cols.csv", "body,label\nhello,1\nworld,2\n"), ["{tmp}/cols.csv:2", "body, label", "data.text_field"]),
    "train-messages-not-a-list": Row(_train_on("chat.jsonl", '{"messages": "hi"}\n'), ["{tmp}/chat.jsonl:1", "'messages' must be a list"]),
    "train-fake-parquet": Row(_train_on("fake.parquet", "not parquet at all"), ["{tmp}/fake.parquet", "Parquet"]),
    "train-empty-folder": Row(lambda c: ["train", c.train_config(c.folder("empty"))], ["{tmp}/empty", "no data files"]),
    "train-data-not-found": Row(lambda c: ["train", c.train_config(c.tmp / "nope.jsonl")], ["{tmp}/nope.jsonl", "data.path"]),
    "train-data-symlink-loop": Row(lambda c: ["train", c.train_config(_symlink_loop(c))], ["{tmp}/loop1.jsonl", "symbolic link loop"]),
    "train-data-folder-unreadable": Row(
        lambda c: ["train", c.train_config(_unreadable_folder(c))], ["{tmp}/data/private", "cannot read the folder", "permission denied"]
    ),
    "train-set-bad-value": Row(
        lambda c: ["train", c.train_config(model=c.tmp / "no-model"), "--set", "train.lr=abc"],
        ["invalid --set value", "--set train.lr=abc: 'train.lr'"],
    ),
    "train-model-without-tokenizer": Row(
        lambda c: ["train", c.train_config(model=_without_tokenizer(c))], ["no tokenizer files", "tokenizer.json", "model.tokenizer"]
    ),
    "train-suite-names-missing-file": Row(
        lambda c: ["train", c.train_config(suite=c.suite(c.tmp / "gone.jsonl"))], ["{tmp}/gone.jsonl"]
    ),
    # ---- config mistakes: refused before any model is loaded (the model path points nowhere)
    "train-unknown-strategy": Row(
        lambda c: ["train", c.train_config(model=c.tmp / "no-model", strategies="[fulll]")], ["{tmp}/run.yaml", "unknown strategy 'fulll'"]
    ),
    "train-bad-strategy-key": Row(
        lambda c: ["train", c.train_config(model=c.tmp / "no-model", strategies="[{name: lora, rr: 4}]")], ["{tmp}/run.yaml", "rr"]
    ),
    "train-config-not-found": Row(lambda c: ["train", c.tmp / "nope.yaml"], ["{tmp}/nope.yaml", "not found"]),
    "train-duplicate-yaml-key": Row(
        lambda c: ["train", c.file("run.yaml", c.train_config(model=c.tmp / "no-model").read_text() + "train: {batch_size: 8}\n")],
        ["{tmp}/run.yaml", "key 'train' appears twice (lines 4 and 6)"],
    ),
    "train-duplicate-nested-yaml-key": Row(
        lambda c: ["train", c.file("run.yaml", "model: {name_or_path: x}\ntasks:\n  - name: t\n    data: {path: a.jsonl}\n    name: u\n")],
        ["{tmp}/run.yaml", "key 'name' appears twice (lines 3 and 5)"],
    ),
    "train-task-name-climbs-out": Row(
        lambda c: ["train", c.train_config(model=c.tmp / "no-model"), "--set", "tasks[0].name=../../victim"],
        ["'tasks[0].name'", "path separator"],
    ),
    "train-task-name-nested": Row(
        lambda c: ["train", c.train_config(model=c.tmp / "no-model"), "--set", "tasks[0].name=legal/contracts"],
        ["'tasks[0].name'", "folder name"],
    ),
    "train-task-name-hidden": Row(
        lambda c: ["train", c.train_config(model=c.tmp / "no-model"), "--set", "tasks[0].name=.."], ["'tasks[0].name'", "starts with a dot"]
    ),
    "train-task-names-repeated": Row(
        lambda c: ["train", c.train_config(model=c.tmp / "no-model"), "--set", "tasks[1]={name: t, data: {path: x.jsonl}}"],
        ["tasks[0].name and tasks[1].name are both 't'"],
    ),
    "train-model-not-found": Row(lambda c: ["train", c.train_config(model=c.tmp / "no-model")], ["{tmp}/no-model does not exist"]),
    # ---- the output folder
    "train-output-under-a-file": Row(
        lambda c: ["train", c.train_config(out=c.file("taken", "x") / "run")], ["{tmp}/taken is a file, not a folder"]
    ),
    "train-output-read-only": Row(_read_only_run, ["{tmp}/locked/run", "permission denied"]),
    "train-disk-full": Row(_full_disk_run, ["{tmp}/full/run/inputs.json", "no space left"]),  # the first file a run writes
    "train-disk-full-while-training": Row(_full_disk_while_training, ["{tmp}/run/train_log.jsonl", "no space left"]),
    "train-file-size-limit": Row(
        lambda c: ["train", c.train_config()], ["{tmp}/run", "file too large"],
        subprocess={"fsize": 48 * 1024},
    ),
    # ---- retain eval
    "eval-suite-names-missing-file": Row(lambda c: ["eval", c.models["base"], "--suite", c.suite(c.tmp / "gone.jsonl")], ["{tmp}/gone.jsonl"]),
    "eval-suite-duplicate-key": Row(
        lambda c: ["eval", c.models["base"], "--suite", c.file("suite.yaml", f"tasks: []\ntasks:\n  - {{name: g, type: loss, data: {{path: '{c.good_data}'}}}}\n")],
        ["{tmp}/suite.yaml", "key 'tasks' appears twice (lines 1 and 2)"],
    ),
    "eval-suite-duplicate-eval-name": Row(
        lambda c: ["eval", c.models["base"], "--suite", c.file("suite.yaml", "".join(
            f"  - {{name: g, type: loss, data: {{path: '{c.good_data}'}}}}\n" for _ in range(2)).join(["tasks:\n", ""]))],
        ["{tmp}/suite.yaml", "tasks[0].name and tasks[1].name are both 'g'"],
    ),
    "eval-suite-empty-choices": Row(
        lambda c: ["eval", c.models["base"], "--suite", c.file("suite.yaml", f"tasks:\n  - {{name: q, type: multiple_choice, data: {{path: '{c.good_data}'}}, choices: []}}\n")],
        ["{tmp}/suite.yaml", "tasks[0].choices", "the choices list is empty"],
    ),
    "eval-suite-not-found": Row(lambda c: ["eval", c.models["base"], "--suite", c.tmp / "nope.yaml"], ["{tmp}/nope.yaml"]),
    "eval-suite-not-yaml": Row(lambda c: ["eval", c.models["base"], "--suite", c.file("suite.yaml", "tasks: [\n")], ["{tmp}/suite.yaml"]),
    "eval-suite-unknown-key": Row(
        lambda c: ["eval", c.models["base"], "--suite", c.file("suite.yaml", "tasks:\n  - {name: g, type: loss, dta: {path: x.jsonl}}\n")],
        ["{tmp}/suite.yaml", "dta"],
    ),
    "eval-model-not-found": Row(lambda c: ["eval", c.tmp / "no-model", "--suite", c.suite(c.good_data)], ["{tmp}/no-model"]),
    "eval-folder-is-no-model": Row(
        lambda c: ["eval", c.file("notes/readme.txt", "hi").parent, "--suite", c.suite(c.good_data)], ["{tmp}/notes", "no config.json"]
    ),
    "eval-adapter-on-wrong-base": Row(
        lambda c: ["eval", c.models["adapter_on_other"], "--suite", c.suite(c.good_data)],
        ["adapter-on-other", "other-base", "shapes do not fit"],
    ),
    "eval-out-read-only": Row(
        lambda c: ["eval", c.models["base"], "--suite", c.suite(c.good_data), "--out", c.read_only("locked") / "s.json"],
        ["{tmp}/locked", "permission denied"],
    ),
    "eval-out-under-a-file": Row(
        lambda c: ["eval", c.models["base"], "--suite", c.suite(c.good_data), "--out", c.file("taken", "x") / "s.json"],
        ["{tmp}/taken is a file, not a folder"],
    ),
    # ---- retain merge
    "merge-adapter-on-wrong-base": Row(
        lambda c: ["merge", c.models["other"], c.models["adapter"], "--out", c.tmp / "merged"],
        ["adapter", "other-base", "shapes do not fit"],
    ),
    "merge-full-model-on-wrong-base": Row(
        lambda c: ["merge", c.models["other"], c.models["base"], "--out", c.tmp / "merged"], ["other-base", "cannot interpolate"]
    ),
    "merge-tuned-not-found": Row(lambda c: ["merge", c.models["base"], c.tmp / "no-model", "--out", c.tmp / "m"], ["{tmp}/no-model"]),
    "merge-bad-alpha": Row(lambda c: ["merge", c.models["base"], c.models["adapter"], "--alpha", "lots", "--out", c.tmp / "m"], ["--alpha", "lots"]),
    "merge-unknown-method": Row(lambda c: ["merge", c.models["base"], c.models["adapter"], "--method", "avg", "--out", c.tmp / "m"], ["--method", "avg"]),
    "merge-sweep-without-suite": Row(lambda c: ["merge", c.models["base"], c.models["adapter"], "--alpha", "sweep", "--out", c.tmp / "m"], ["--suite"]),
    "merge-out-under-a-file": Row(
        lambda c: ["merge", c.models["base"], c.models["adapter"], "--out", c.file("taken", "x") / "m"], ["{tmp}/taken is a file, not a folder"]
    ),
    # ---- retain report / gate
    "report-not-found": Row(lambda c: ["report", c.tmp / "nope.json"], ["{tmp}/nope.json", "not found"]),
    "report-not-json": Row(lambda c: ["report", c.results("{{")], ["{tmp}/results.json", "not a JSON results file"]),
    "report-wrong-schema": Row(lambda c: ["report", c.results('{"schema_version": "1.0", "runs": 3}')], ["{tmp}/results.json", "base_model"]),
    "report-newer-major-version": Row(lambda c: ["report", c.results('{"schema_version": "2.0"}')], ["{tmp}/results.json", "'2.0'"]),
    "report-out-under-a-file": Row(
        lambda c: ["report", c.results(GOOD_RESULTS), "--out", c.file("taken", "x") / "r.html"], ["{tmp}/taken is a file, not a folder"]
    ),
    "gate-not-found": Row(lambda c: ["gate", c.tmp / "nope.json", "--max-forgetting", "0.1"], ["{tmp}/nope.json"]),
    "gate-not-json": Row(lambda c: ["gate", c.results("\xff not json")], ["{tmp}/results.json", "not a JSON results file"]),
    "gate-wrong-schema": Row(lambda c: ["gate", c.results("[1, 2]")], ["{tmp}/results.json", "JSON object"]),
    "gate-tune-trials-file": Row(
        lambda c: ["gate", c.file("tune/trials.json", '{"tune": {}, "best": null, "trials": []}'), "--min-new-task", "0.5"],
        ["{tmp}/tune/trials.json is the trials file of retain tune", "results.json", "{tmp}/tune/best.yaml"],
    ),
    # ---- retain import-llama2c
    "import-checkpoint-not-found": Row(lambda c: _import_args(c, checkpoint=None), ["{tmp}/missing.bin", "not found"]),
    "import-tokenizer-not-found": Row(lambda c: _import_args(c, tokenizer=None), ["{tmp}/missing-tok.bin", "not found"]),
    "import-checkpoint-too-small": Row(lambda c: _import_args(c, checkpoint=b"abc"), ["{tmp}/model.bin", "too small"]),
    "import-checkpoint-bad-header": Row(lambda c: _import_args(c, checkpoint=b"\0" * 64), ["{tmp}/model.bin", "invalid llama2.c header"]),
    "import-out-not-empty": Row(
        lambda c: _import_args(c, out=c.file("imported/keep.txt", "mine").parent.name), ["{tmp}/imported", "--overwrite"]
    ),
    # ---- retain importance compute
    "importance-unknown-method": Row(lambda c: _importance(c, "--method", "fisher"), ["--method", "fisher"]),
    "importance-unknown-estimator": Row(lambda c: _importance(c, "--estimator", "exact"), ["--estimator", "exact"]),
    "importance-malformed-data": Row(lambda c: _importance(c, data=c.file("bad.jsonl", "{nope\n")), ["{tmp}/bad.jsonl:1", "malformed JSON"]),
    "importance-model-not-found": Row(lambda c: _importance(c, model=c.tmp / "no-model"), ["{tmp}/no-model"]),
    "importance-out-under-a-file": Row(
        lambda c: _importance(c, out=c.file("taken", "x") / "f.safetensors"), ["{tmp}/taken is a file, not a folder"]
    ),
}


def _run_subprocess(args: Args, tmp: Path, fsize: int | None) -> tuple[int, str]:
    """``python -m retain ...`` with this tree first on the path, optionally under a file-size limit
    (CPython ignores SIGXFSZ, so an oversized write fails with EFBIG instead of killing the process)."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "RETAIN_DEBUG": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "retain", *map(str, args)], cwd=tmp, env=env, capture_output=True, text=True,
        preexec_fn=limit, timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETAIN_DEBUG", raising=False)


def _params() -> list[Any]:
    """One pytest param per row; a row wrapped in ``pytest.param`` keeps its marks (xfail)."""
    return [
        pytest.param(name, marks=row.marks, id=name) if hasattr(row, "marks") else pytest.param(name, id=name)
        for name, row in ROWS.items()
    ]


@pytest.mark.parametrize("name", _params())
def test_bad_input_gives_one_clean_error(name: str, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = ROWS[name]
    row: Row = entry.values[0] if hasattr(entry, "values") else entry
    monkeypatch.chdir(tmp_path)  # an unexpected crash would write its traceback file here
    args = row.build(Ctx(tmp_path, models, monkeypatch))
    if row.subprocess:
        code, output = _run_subprocess(args, tmp_path, row.subprocess.get("fsize"))
        error_lines = [line for line in output.splitlines() if line.startswith(("error:", "hint:")) or "Traceback" in line]
    else:
        result = runner.invoke(app, [str(a) for a in args], env={"RETAIN_DEBUG": ""})
        code, output = result.exit_code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        error_lines = result.stderr.strip().splitlines()
    assert code == row.code, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert 1 <= len(error_lines) <= 3, output
    assert error_lines[0].startswith("error: "), output
    for expected in row.expect:
        assert expected.format(tmp=tmp_path) in output, output
    assert not list(tmp_path.glob("retain-crash-*.log"))


# --------------------------------------------------------------------------------------------
# Around the table


def test_train_refuses_a_bad_strategy_without_loading_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Config mistakes surface before the (possibly minutes-long) model load, not after it."""
    import retain.models.loading as loading

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(loading, "load_model", never)
    ctx = Ctx(tmp_path, {"base": tmp_path / "nowhere"}, monkeypatch)
    for strategies, expected in (("[ful]", "unknown strategy 'ful'"), ("[full, {name: ewc, lamda: 3}]", "lamda")):
        result = runner.invoke(app, ["train", str(ctx.train_config(strategies=strategies))], env={"RETAIN_DEBUG": ""})
        assert result.exit_code == 2, result.output
        assert expected in result.output and "nowhere" not in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, output = _run_subprocess(["--debug", "report", tmp_path / "nope.json"], tmp_path, None)
    assert code != 0
    assert "Traceback" in output and "DataError" in output and "nope.json" in output


def test_a_bug_is_one_line_exit_70_and_a_traceback_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retain.results import schema

    def broken(cls: Any, path: Any) -> None:
        return 1 / 0

    monkeypatch.setattr(schema.Results, "load", classmethod(broken))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path / "results.json")], env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 70
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" in lines[0] and "ZeroDivisionError" in lines[0], result.output
    assert "Traceback" not in result.output
    (crash,) = tmp_path.glob("retain-crash-*.log")
    assert str(crash) in lines[0]
    text = crash.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "broken" in text


def test_an_unwrapped_full_disk_is_reported_as_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net in the CLI: an OSError of the machine that a write path forgot to wrap is no bug."""
    from retain.results import schema

    def full(cls: Any, path: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "log.jsonl"))

    monkeypatch.setattr(schema.Results, "load", classmethod(full))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path / "results.json")], env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 2
    assert f"error: cannot write {tmp_path / 'log.jsonl'}: no space left" in result.output
    assert not list(tmp_path.glob("retain-crash-*.log"))


def test_library_write_errors_are_recognised() -> None:
    from safetensors import SafetensorError

    wrapped = os_error_of(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"))
    assert wrapped is not None and wrapped.errno == errno.EFBIG
    assert os_error_of(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")) is not None
    assert os_error_of(RuntimeError("shape mismatch")) is None
    assert os_error_of(DataError("x.jsonl: [Errno 2] quoted in a message")) is None
    assert environment_error(ValueError("nothing to do with files")) is None


def test_atomic_dir_names_the_folder_when_a_library_write_fails(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    target = tmp_path / "model"
    with pytest.raises(OutputError, match=rf"cannot write {target}: no space left") as caught:
        with atomic_dir(target) as staging:
            (staging / "partial").write_text("x")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.hint and "free space" in caught.value.hint
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == []
