"""End to end: the bench on real data, results.json, the HTML report, the gate, and the CLI commands."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from retain.cli import app
from retain.errors import ConfigError
from retain.results.schema import Results
from retain.scenarios.bench import parse_item

runner = CliRunner()


def test_parse_item_hybrids_and_params():
    assert parse_item("lora") == [{"name": "lora"}]
    assert parse_item("full+freeze@freeze.top_layers=2") == [{"name": "full"}, {"name": "freeze", "top_layers": 2}]
    assert parse_item("lora@r=16") == [{"name": "lora", "r": 16}]
    with pytest.raises(ConfigError, match="no strategy in it takes"):
        parse_item("full@r=4")


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench")
    result = runner.invoke(
        app,
        ["bench", "stories-contracts", "--quick", "--strategies", "full,lora", "--steps", "12",
         "--set", "train.lr=3e-3", "--out", str(out), "--data-dir", str(data_dir)],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_bench_writes_results_report_and_table(quick_bench):
    out, output = quick_bench
    results = Results.load(out / "results.json")
    assert [r.name for r in results.runs] == ["full", "lora"]
    for run in results.runs:
        assert run.task_names == ["contracts"]
        assert [r.index for r in run.records] == [0, 1]
        assert len(run.matrix) == 2 and len(run.matrix[0]) == 1
        assert run.summary.new_task_score > run.summary.new_task_score_before  # learned something
        assert run.summary.general_retention is not None and run.summary.kl_from_base > 0
        assert run.config["train"]["steps_per_task"] == 12
        assert run.records[0].samples and run.records[1].samples
    # same base model, same seed: identical base rows
    assert results.runs[0].records[0].scores == results.runs[1].records[0].scores
    html = (out / "report.html").read_text()
    assert "<svg" in html and "https://" not in html.split("<body", 1)[1].split("</body>")[0].replace('xmlns', '')
    assert "full" in output and "lora" in output and "retention" in output


def test_gate_fails_a_run_that_forgot_and_passes_loose_bounds(quick_bench):
    out, _ = quick_bench
    results = json.loads((out / "results.json").read_text())
    full = results["runs"][0]["summary"]
    strict = runner.invoke(app, ["gate", str(out / "results.json"), "--min-general-retention", "0.99", "--strategy", "full"])
    assert strict.exit_code == 1
    assert "general retention" in strict.output and "full" in strict.output
    low, high = full["general_retention_interval"]
    assert low < full["general_retention"] < high
    loose = runner.invoke(app, ["gate", str(out / "results.json"), "--min-general-retention", str(low - 0.001), "--strategy", "full"])
    assert loose.exit_code == 0, loose.output
    between = ["gate", str(out / "results.json"), "--min-general-retention", str((low + full["general_retention"]) / 2),
               "--strategy", "full"]
    assert runner.invoke(app, between).exit_code == 1  # the point meets it, the interval's lower end does not
    assert runner.invoke(app, [*between, "--confidence", "0"]).exit_code == 0
    forgot = runner.invoke(app, ["gate", str(out / "results.json"), "--max-forgetting", "0.0"])
    assert forgot.exit_code == 1 and "general drop" in forgot.output and "max 0.000" in forgot.output


def test_report_command_rewrites_html_and_prints_markdown(quick_bench, tmp_path):
    out, _ = quick_bench
    target = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(out / "results.json"), "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert target.is_file() and "| full |" in result.output.replace("|  full", "| full")


def test_eval_command_scores_an_adapter_dir(quick_bench, tmp_path):
    out, _ = quick_bench
    suite = tmp_path / "suite.yaml"
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "Once upon a time, there was a little girl named Lily."}) + "\n")
    suite.write_text(f"tasks:\n  - name: story\n    type: loss\n    data: {{path: {data}}}\n")
    scores_file = tmp_path / "scores.json"
    result = runner.invoke(app, ["eval", str(out / "runs" / "lora" / "final"), "--suite", str(suite), "--out", str(scores_file)])
    assert result.exit_code == 0, result.output
    scores = json.loads(scores_file.read_text())["scores"]
    assert scores["story"]["metric"] == "loss" and scores["story"]["value"] > 0


def test_train_command_reports_config_errors(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {name_or_path: x}\ntasks: [{name: a, data: {path: a.jsonl}}]\ntrain: {lrr: 1}\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "did you mean 'lr'" in result.output


def test_train_with_suite_writes_results(tiny_model_dir, text_file, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"tasks:\n  - name: held\n    type: next_token_accuracy\n    role: task\n    train_task: t1\n"
        f"    data: {{path: {text_file}, max_length: 32}}\n    max_examples: 4\n"
        f"probe_prompts: ['the cat']\nsample_prompts: ['the']\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\ntasks: [{{name: t1, data: {{path: {text_file}, max_length: 32}}}}]\n"
        f"train: {{steps_per_task: 4, batch_size: 4, progress: false}}\neval: {{suite: {suite}}}\noutput: {{dir: {tmp_path / 'run'}}}\n"
    )
    refused = runner.invoke(app, ["train", str(config)])  # the eval scores the very file the task trains on
    assert refused.exit_code == 2 and "overlaps evaluation text" in refused.output
    assert f"tasks[0].data {text_file} shares 30 texts with eval 'held' ({text_file})" in refused.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    result = runner.invoke(app, ["train", str(config), "--allow-overlap"])
    assert result.exit_code == 0, result.output
    results = Results.load(tmp_path / "run" / "results.json")
    assert results.runs[0].matrix[1][0] is not None
    assert results.runs[0].warnings == [f"overlap allowed: tasks[0].data {text_file} shares 30 texts with eval 'held' ({text_file})"]
