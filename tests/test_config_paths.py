"""Relative paths in a run YAML start from the YAML's folder; ``--set`` values from the working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from retain.config import load_config, resolve_path

RUN = """
model: {name_or_path: ./base, tokenizer: Qwen/Qwen2.5-0.5B}
tasks:
  - {name: a, data: {path: data/a.jsonl}}
  - {name: b, data: {path: imdb}}
  - {name: c, data: {path: folder}}
strategies: [lora, {name: ewc, file: stats/fisher.safetensors, data: {path: general.jsonl}},
             {name: synthetic-replay, reuse_dir: sets, output_dir: out/sets}]
general_data: {path: general.jsonl}
eval: {suite: suite.yaml}
output: {dir: runs/x}
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    (work / "folder").mkdir(parents=True)
    (work / "run.yaml").write_text(RUN)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return work


def test_paths_in_the_yaml_resolve_against_its_folder(work: Path) -> None:
    config = load_config(work / "run.yaml")
    assert config.model.name_or_path == str(work / "base")
    assert config.model.tokenizer == "Qwen/Qwen2.5-0.5B"  # a hub id: nothing of that name beside the YAML
    assert [t.data.path for t in config.tasks] == [str(work / "data/a.jsonl"), "imdb", str(work / "folder")]
    assert config.general_data.path == str(work / "general.jsonl")
    assert config.eval.suite == str(work / "suite.yaml")
    assert config.output.dir == str(work / "runs/x")
    ewc, synthetic = config.strategies[1].params, config.strategies[2].params
    assert ewc["file"] == str(work / "stats/fisher.safetensors") and ewc["data"]["path"] == str(work / "general.jsonl")
    assert synthetic["reuse_dir"] == str(work / "sets") and synthetic["output_dir"] == str(work / "out/sets")


def test_set_values_stay_relative_to_the_working_directory(work: Path) -> None:
    config = load_config(work / "run.yaml", ["tasks[0].data.path=mine.jsonl", "output.dir=runs/new", "eval.suite=s.yaml"])
    assert config.tasks[0].data.path == "mine.jsonl"
    assert config.output.dir == "runs/new" and config.eval.suite == "s.yaml"
    assert config.tasks[1].data.path == "imdb"


def test_the_same_yaml_gives_the_same_paths_from_any_folder(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_config(work / "run.yaml")
    monkeypatch.chdir(work)
    assert load_config("run.yaml").model_dump() == first.model_dump()


def test_resolve_path_rules(tmp_path: Path) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert resolve_path("models/mine", tmp_path, "model") == str(tmp_path / "models/mine")  # exists beside the YAML
    assert resolve_path("org/name", tmp_path, "model") == "org/name"  # a hub id
    assert resolve_path("./org/name", tmp_path, "model") == str(tmp_path / "org/name")  # ./ means local
    assert resolve_path("x.csv", tmp_path, "data") == str(tmp_path / "x.csv")  # a data-file suffix means local
    assert resolve_path("/abs/x.jsonl", tmp_path, "data") == "/abs/x.jsonl"
    assert resolve_path("~/x.jsonl", tmp_path, "data") == "~/x.jsonl"
    assert resolve_path("runs/a/../b", tmp_path, "path") == str(tmp_path / "runs/b")
