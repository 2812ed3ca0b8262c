"""``retain train`` as a user runs it: a YAML in another folder with relative paths, one truncation
warning, a small-data warning, a progress bar while the suite is scored, the bench's before/after
tables at the end; then ``retain eval`` on the run folder and ``retain gate`` without a bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retain.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("train-cli")
    work = root / "work"
    (work / "data").mkdir(parents=True)
    rows = [{"prompt": "the quick brown fox jumps over the lazy dog " * 2, "completion": f" {i}"} for i in range(5)]
    (work / "data" / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "data" / "general.jsonl").write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}."}) + "\n" for i in range(8)))
    (work / "suite.yaml").write_text(
        "tasks:\n"
        "  - {name: general, type: loss, data: {path: data/general.jsonl, max_length: 16}, max_examples: 2}\n"
        "  - {name: task_acc, type: next_token_accuracy, role: task, train_task: t, data: {path: data/general.jsonl, max_length: 16}, max_examples: 2}\n"
    )
    (work / "run.yaml").write_text(
        f"model: {{name_or_path: '{tiny_model_dir}'}}\n"
        "tasks: [{name: t, data: {path: data/pc.jsonl, max_length: 16}}]\n"
        "train: {steps_per_task: 2, batch_size: 8, progress: true, log_every: 1}\n"
        "eval: {suite: suite.yaml}\n"
        "output: {dir: runs/x}\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RETAIN_CACHE_DIR", str(root / "cache"))  # a fresh cache: the base model is scored here
        patch.chdir(root)  # the parent folder: every relative path in run.yaml must still be found
        result = runner.invoke(app, ["train", "work/run.yaml"], env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 0, result.output
    return work, result.output


def test_relative_paths_in_the_yaml_start_from_its_folder(trained: tuple[Path, str]) -> None:
    work, _ = trained
    assert (work / "runs" / "x" / "final" / "config.json").is_file()
    assert (work / "runs" / "x" / "results.json").is_file()


def test_the_truncation_warning_is_printed_once(trained: tuple[Path, str]) -> None:
    _, output = trained
    assert output.count("longer than data.max_length") == 1, output
    assert "UserWarning" not in output and "5 of 5 examples" in output


def test_batch_size_larger_than_the_data_warns_once(trained: tuple[Path, str]) -> None:
    _, output = trained
    assert output.count("fewer than train.batch_size") == 1 and "5 training examples" in output


def test_scoring_shows_progress_and_the_run_ends_with_the_bench_tables(trained: tuple[Path, str]) -> None:
    _, output = trained
    assert "scoring the base model" in output and "scoring after task 't'" in output
    assert "scores: base -> after the last task" in output and "general (loss ↓)" in output
    assert "retention" in output  # the summary table's header
    assert output.index("done") < output.index("scores: base -> after the last task")


def test_eval_of_a_run_folder_points_at_its_final_model(trained: tuple[Path, str]) -> None:
    work, _ = trained
    run = work / "runs" / "x"
    result = runner.invoke(app, ["eval", str(run), "--suite", str(work / "suite.yaml")], env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 2
    assert f"{run} is a training run folder, not a model; evaluate the model it wrote: {run / 'final'}" in result.output


def test_gate_without_a_bound_is_refused(trained: tuple[Path, str]) -> None:
    work, _ = trained
    result = runner.invoke(app, ["gate", str(work / "runs" / "x" / "results.json")], env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 2 and "no bound given" in result.output and "PASS" not in result.output
    bounded = runner.invoke(app, ["gate", str(work / "runs" / "x" / "results.json"), "--min-new-task", "0"])
    assert bounded.exit_code == 0 and "PASS" in bounded.output
