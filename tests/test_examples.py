"""examples/trl_sft.py runs end to end offline on a tiny local model: TRL's SFTTrainer with lora+lwf (as a
user runs it, in a subprocess) and transformers' Trainer with full+ewc; each writes results.json with the
base and after-task rows, report.html and final/, and scores only text it held out of training."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retain.results.schema import Results

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "trl_sft.py"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    data, general = tmp_path / "contracts.jsonl", tmp_path / "general.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Clause {i}: the licensee shall", "completion": f" pay {i} dollars."})
                            + "\n" for i in range(40)))
    general.write_text("".join(json.dumps({"text": f"Once upon a time a dog ran in the park {i} times."}) + "\n"
                               for i in range(40)))
    return data, general


def _check_outputs(out: Path, strategies: str) -> None:
    results = Results.load(out / "results.json")
    run = results.runs[0]
    assert run.name == strategies and run.task_names == ["contracts"]
    assert [r.index for r in run.records] == [0, 1]  # the base model and after the task
    assert {"general_loss", "general_acc", "contracts_acc", "contracts_loss"} <= set(run.records[1].scores)
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "final" / "tokenizer_config.json").is_file()
    train = (out / "data" / "contracts.train.jsonl").read_text()
    for line in (out / "data" / "contracts.heldout.jsonl").read_text().splitlines():  # scored text never trained
        clause = json.loads(line)["text"].split(":")[0]
        assert f'"{clause}:' not in train


def test_trl_example_runs_end_to_end(tiny_model_dir, files, tmp_path):
    pytest.importorskip("trl")
    data, general = files
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", str(tiny_model_dir), "--data", str(data), "--general", str(general),
         "--strategies", "lora,lwf", "--steps", "3", "--max-length", "48", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"results: {out / 'results.json'}" in done.stdout
    _check_outputs(out, "lora+lwf")
    assert json.loads((out / "final" / "retain_tasks.json").read_text())["tasks"][0]["name"] == "contracts"


def test_example_with_the_transformers_trainer(tiny_model_dir, files, tmp_path):
    spec = importlib.util.spec_from_file_location("trl_sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data, general = files
    out = tmp_path / "out"
    written = module.main(["--model", str(tiny_model_dir), "--data", str(data), "--general", str(general),
                           "--strategies", "full,ewc", "--steps", "2", "--max-length", "48", "--trainer", "hf",
                           "--out", str(out)])
    assert written["results"] == out / "results.json"
    _check_outputs(out, "full+ewc")
