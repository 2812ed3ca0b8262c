"""Per-task inference: final/ holds each task's prompt stack or adapter with a manifest, and loading a task's
choice gives exactly the model as it was at that task's end (logits recorded during training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import retain
from retain.config import load_config_dict
from retain.errors import ConfigError
from retain.models.tasks import MANIFEST, task_dir
from retain.eval.participant import GO_ON, Decision, Participant
from retain.eval.suite import SuiteConfig
from retain.train import finetune

PROBE = torch.tensor([[1, 20, 30, 40, 50, 60, 9, 12], [1, 33, 34, 35, 36, 37, 38, 39]])


class LogitsAtTaskEnd(Participant):
    """A run observer that records the model's logits on PROBE at the end of every task (the only point
    it needs: the others are the base's no-ops)."""

    suite = SuiteConfig(tasks=[])

    def __init__(self) -> None:
        self.logits: dict[str, torch.Tensor] = {}

    def set_budget(self, budget) -> None:
        pass

    def record_warnings(self, warnings) -> None:
        pass

    def on_task_end(self, model, ctx, task, stats) -> Decision:
        unwrapped = ctx.unwrapped_model
        flags = unwrapped.training
        unwrapped.eval()
        with torch.no_grad():
            self.logits[task.name] = unwrapped(input_ids=PROBE).logits[:, -PROBE.shape[1]:].clone()
        unwrapped.train(flags)
        return GO_ON


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROBE).logits[:, -PROBE.shape[1]:]


def _two_tasks(model_dir: Path, folder: Path, strategy: dict) -> dict:
    text, pc = folder / "text.jsonl", folder / "pc.jsonl"
    text.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}."}) + "\n" for i in range(30)))
    pc.write_text("".join(json.dumps({"prompt": f"q{i}: add {i} {i + 1} =", "completion": f" {2 * i + 1}"}) + "\n"
                          for i in range(30)))
    return {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "first", "data": {"path": str(text), "max_length": 24}},
                  {"name": "second", "data": {"path": str(pc), "max_length": 24}}],
        "strategies": [strategy],
        "train": {"steps_per_task": 5, "batch_size": 4, "lr": 0.1, "progress": False},
        "output": {"dir": str(folder / "run")},
    }


@pytest.fixture(scope="module", params=[
    {"name": "progressive-prompts", "num_virtual_tokens": 3},
    {"name": "o-lora", "r": 2},
    {"name": "lora", "r": 2},
], ids=["progressive-prompts", "o-lora", "lora"])
def per_task_run(request, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param["name"])
    observer = LogitsAtTaskEnd()
    outcome = finetune(load_config_dict(_two_tasks(tiny_model_dir, folder, request.param)), observer=observer)
    return outcome, observer, request.param["name"]


def test_manifest_lists_each_task_with_its_folder(per_task_run):
    outcome, _, name = per_task_run
    manifest = json.loads((outcome.final_dir / MANIFEST).read_text())
    kinds = {"progressive-prompts": "prompt_stack", "o-lora": "adapter_stack", "lora": "adapter"}
    assert manifest["kind"] == kinds[name]
    assert [(e["name"], e["folder"]) for e in manifest["tasks"]] == [("first", "tasks/00-first"), ("second", "tasks/01-second")]
    for entry in manifest["tasks"]:
        assert (outcome.final_dir / entry["folder"] / "adapter_config.json").is_file()


def test_each_task_choice_is_the_model_at_that_task_end(per_task_run):
    outcome, observer, _ = per_task_run
    first, _ = retain.load(outcome.final_dir, task="first")
    second, _ = retain.load(outcome.final_dir, task="second")
    got_first, got_second = _logits(first), _logits(second)
    torch.testing.assert_close(got_first, observer.logits["first"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_second, observer.logits["second"], rtol=0, atol=1e-5)
    assert (got_first - got_second).abs().max() > 1e-3  # the two tasks' choices are different models
    # the per-task folder retain train writes under run_dir/tasks/ is the same model
    per_task_dir, _ = retain.load(outcome.run_dir / "tasks" / "00-first")
    torch.testing.assert_close(_logits(per_task_dir), got_first, rtol=0, atol=0)
    # without --task: the final model (all tasks), which is the second task's end
    final, _ = retain.load(outcome.final_dir)
    torch.testing.assert_close(_logits(final), got_second, rtol=0, atol=1e-6)


def test_task_by_index_and_unknown_task(per_task_run):
    outcome, _, _ = per_task_run
    assert task_dir(outcome.final_dir, "1") == outcome.final_dir / "tasks" / "01-second"
    with pytest.raises(ConfigError, match="first, second"):
        task_dir(outcome.final_dir, "third")


def test_full_weight_runs_have_no_manifest(tiny_model_dir, tmp_path):
    config = _two_tasks(tiny_model_dir, tmp_path, "full")
    config["train"]["steps_per_task"] = 1
    outcome = finetune(load_config_dict(config))
    assert not (outcome.final_dir / MANIFEST).exists()
    with pytest.raises(ConfigError, match="no retain_tasks.json"):
        retain.load(outcome.final_dir, task="first")


def test_cli_generate_and_eval_pick_a_task(per_task_run, tmp_path):
    outcome, _, name = per_task_run
    if name != "progressive-prompts":
        pytest.skip("one CLI round trip is enough")
    from typer.testing import CliRunner

    from retain.cli import app

    runner = CliRunner()
    outputs = []
    for task in ("first", "second"):
        done = runner.invoke(app, ["generate", str(outcome.final_dir), "--task", task, "--max-new-tokens", "12",
                                   "the cat", "a"])
        assert done.exit_code == 0, done.output
        outputs.append(done.stdout)
    assert outputs[0] != outputs[1]  # two tasks' prompts continue the same text differently

    eval_file = tmp_path / "held.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"a dog ran in the park {i}."}) + "\n" for i in range(8)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks:\n  - {{name: held, type: loss, data: {{path: {eval_file}, max_length: 24}}}}\n")
    scores = []
    for task in ("first", "second"):
        out = tmp_path / f"{task}.json"
        done = runner.invoke(app, ["eval", str(outcome.final_dir), "--suite", str(suite), "--task", task,
                                   "--out", str(out)])
        assert done.exit_code == 0, done.output
        payload = json.loads(out.read_text())
        assert payload["task"] == task
        scores.append(payload["scores"]["held"]["value"])
    assert scores[0] != scores[1]
    done = runner.invoke(app, ["generate", str(outcome.final_dir), "--task", "third", "x"])
    assert done.exit_code == 2 and "no such task" in done.output
