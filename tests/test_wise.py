"""WiSE-FT as a finishing step: the rule that picks alpha on the select part, the interpolation it
applies, and a run whose final weights are base + alpha (tuned - base) with the alpha the rule names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from retain.config import DataConfig, load_config_dict
from retain.errors import ConfigError
from retain.eval.runner import SuiteObserver
from retain.eval.suite import SuiteConfig
from retain.eval.tasks import NextTokenAccuracyEval
from retain.strategies.registry import validate_run_config
from retain.strategies.wise import WiseConfig, choose_alpha, gain_shares, interpolate_into
from retain.train import finetune


def test_gain_shares_by_hand():
    # base 0.4, alpha 1 reaches 0.8: gain 0.4; 0.6 is half of it, 0.75 is 7/8
    assert gain_shares([0.6, 0.75, 0.8], 0.4) == pytest.approx([0.5, 0.875, 1.0])
    assert gain_shares([0.3, 0.2], 0.4) == [1.0, 1.0]  # alpha 1 gained nothing: nothing to keep


def test_choose_alpha_by_hand():
    alphas, general, new = [0.5, 0.75, 1.0], [0.9, 0.85, 0.8], [0.6, 0.75, 0.8]
    assert choose_alpha(alphas, general, new, 0.4, 0.8) == 0.75  # 0.5 keeps only half the gain
    assert choose_alpha(alphas, general, new, 0.4, 0.9) == 1.0  # only alpha 1 keeps 90%
    assert choose_alpha(alphas, general, new, 0.4, 0.5) == 0.5  # every alpha qualifies: the best general
    assert choose_alpha(alphas, [0.9, 0.9, 0.8], new, 0.4, 0.5) == 0.75  # a tie goes to the larger alpha
    assert choose_alpha(alphas, [0.7, 0.75, 0.8], new, 0.4, 0.5) == 1.0  # interpolating lost general ability


def test_grid_always_holds_one_and_refuses_alphas_outside():
    assert WiseConfig(alphas=[0.7, 0.5]).alphas == [0.5, 0.7, 1.0]
    with pytest.raises(ValueError):
        WiseConfig(alphas=[1.5])


def test_interpolate_into_by_hand():
    model = nn.Linear(2, 1, bias=False)
    base = {"weight": torch.tensor([[1.0, 2.0]])}
    tuned = {"weight": torch.tensor([[3.0, -2.0]])}
    interpolate_into(model, base, tuned, 0.25)  # 0.75 * base + 0.25 * tuned
    assert torch.allclose(model.weight, torch.tensor([[1.5, 1.0]]))
    interpolate_into(model, base, tuned, 0.0)
    assert torch.equal(model.weight, base["weight"])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wise-data")

    def write(name: str, rows: list[str]) -> Path:
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        return path

    return {
        "task": write("task", [f"contracts shall be governed by the laws of delaware #{i}" for i in range(24)]),
        "general_eval": write("general_eval", [f"a dog ran in the park {i} times." for i in range(24)]),
        "task_eval": write("task_eval", [f"the licensee may not assign this agreement #{i}" for i in range(24)]),
    }


def config_for(model_dir: Path, files: dict[str, Path], out: Path, strategies: list):
    return load_config_dict({
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "t1", "data": {"path": str(files["task"]), "max_length": 32}}],
        "strategies": strategies,
        "train": {"steps_per_task": 6, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 2},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out), "save_per_task": False},
    })


def suite_of(files: dict[str, Path]) -> SuiteConfig:
    return SuiteConfig(tasks=[
        NextTokenAccuracyEval(name="general_acc", data=DataConfig(path=str(files["general_eval"]), max_length=32)),
        NextTokenAccuracyEval(name="task_acc", role="task", train_task="t1",
                              data=DataConfig(path=str(files["task_eval"]), max_length=32)),
    ])


def test_run_applies_the_alpha_the_rule_picks_on_the_select_part(tiny_model_dir, files, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = finetune(config_for(tiny_model_dir, files, tmp_path / "plain", ["full"]))
    config = config_for(tiny_model_dir, files, tmp_path / "wise", ["full", {"name": "wise", "alphas": [0.25, 0.5, 0.75],
                                                                            "min_gain_share": 0.5}])
    observer = SuiteObserver(suite_of(files), name="full+wise", run_dir=tmp_path / "wise", batch_size=8)
    outcome = finetune(config, observer=observer)

    [row] = json.loads((tmp_path / "wise" / "wise.json").read_text())
    grid = row["grid"][1:]
    assert [p["alpha"] for p in grid] == [0.25, 0.5, 0.75, 1.0]
    expected = choose_alpha([p["alpha"] for p in grid], [p["general"] for p in grid], [p["new_task"] for p in grid],
                            row["grid"][0]["new_task"], 0.5)
    assert row["alpha"] == expected
    # the run's final weights: the base and the plain fine-tune (same seed, same steps), mixed at that alpha
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    tuned, got = plain.model.state_dict(), outcome.model.state_dict()
    for key in base:
        want = (1 - expected) * base[key].float() + expected * tuned[key].float()
        assert torch.allclose(got[key].float(), want, atol=1e-5), key
    # the select part chose; the report part scored the model wise left
    report = observer.strategy_run().records[-1].scores["general_acc"]
    assert report.part == "report"


def test_lora_adapter_is_scaled_and_no_suite_needs_a_fixed_alpha(tiny_model_dir, files, tmp_path):
    lora = {"name": "lora", "r": 2, "dropout": 0.0}
    plain = finetune(config_for(tiny_model_dir, files, tmp_path / "plain", [lora]))
    half = finetune(config_for(tiny_model_dir, files, tmp_path / "half", [lora, {"name": "wise", "alpha": 0.5}]))
    b_plain = {k: v for k, v in plain.model.state_dict().items() if "lora_B" in k}
    b_half = {k: v for k, v in half.model.state_dict().items() if "lora_B" in k}
    assert b_plain and all(torch.allclose(b_half[k], 0.5 * b_plain[k], atol=1e-6) for k in b_plain)
    with pytest.raises(ConfigError, match="no eval suite"):
        finetune(config_for(tiny_model_dir, files, tmp_path / "none", ["full", "wise"]))


def test_wise_listed_before_a_wrapper_is_refused(tiny_model_dir, files, tmp_path):
    with pytest.raises(ConfigError, match="list it after lora"):
        validate_run_config(config_for(tiny_model_dir, files, tmp_path / "o", ["wise", "lora"]))
    with pytest.raises(ConfigError, match="has no update to scale"):
        validate_run_config(config_for(tiny_model_dir, files, tmp_path / "o", ["prompt-tuning", "wise"]))
    with pytest.raises(ConfigError, match="folds the update into the base"):
        validate_run_config(config_for(tiny_model_dir, files, tmp_path / "o", [{"name": "lora", "r": 2}, "ewc-lora", "wise"]))
