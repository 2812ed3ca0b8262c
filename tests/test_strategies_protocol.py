"""The strategy protocol: every hook is called in order, hybrids compose, incompatible pairs are refused."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from conftest import run_config

from retain.errors import ConfigError
from retain.strategies import Hybrid, Strategy, StrategyConfig, build_strategies, register_strategy
from retain.strategies.registry import _REGISTRY, available_strategies, build_strategy
from retain.train import finetune


class RecorderConfig(StrategyConfig):
    weight: float = 0.5


class Recorder(Strategy):
    """Uses every hook and records the calls, so the loop's hook order is checked end to end."""

    Config = RecorderConfig
    calls: ClassVar[list[str]] = []

    def setup(self, model, ctx):
        self.calls.append("setup")
        self.seen_batches = 0
        return model

    def before_task(self, task, ctx):
        self.calls.append(f"before_task:{task.name}")

    def transform_batch(self, batch, ctx):
        self.calls.append("transform_batch")
        self.seen_batches += 1
        return {**batch, "labels": batch["labels"].clone()}

    def extra_losses(self, outputs, batch, ctx):
        self.calls.append("extra_losses")
        return {"zero": outputs.logits.sum() * 0.0 + self.config.weight}

    def after_backward(self, model, ctx):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "gradients must exist after backward"
        self.calls.append("after_backward")

    def after_step(self, model, ctx):
        self.calls.append("after_step")

    def after_task(self, task, ctx):
        self.calls.append(f"after_task:{task.name}")

    def state_dict(self) -> dict[str, Any]:
        return {"seen": torch.tensor(self.seen_batches), "note": "ok"}

    def load_state_dict(self, state, ctx) -> None:
        self.seen_batches = int(state["seen"])


@pytest.fixture
def recorder():
    register_strategy("test-recorder")(Recorder)
    Recorder.calls = []
    yield Recorder
    _REGISTRY.pop("test-recorder", None)


def test_every_hook_called_in_order(recorder, tiny_model_dir, text_file, tmp_path):
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full", {"name": "test-recorder", "weight": 0.25}], steps=3)
    config.tasks.append(config.tasks[0].model_copy(update={"name": "t2"}))
    finetune(config)
    calls = Recorder.calls
    assert calls[0] == "setup"
    assert calls[1] == "before_task:t1"
    step = ["transform_batch", "extra_losses", "after_backward", "after_step"]
    assert calls[2:14] == step * 3
    assert calls[14] == "after_task:t1"
    assert calls[15] == "before_task:t2"
    assert calls[-1] == "after_task:t2"
    assert calls.count("after_step") == 6
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert rows and all("loss/test-recorder/zero" in row and "loss" in row for row in rows)
    assert rows[0]["loss/test-recorder/zero"] == pytest.approx(0.25)


def test_named_loss_terms_are_prefixed_and_summed(recorder, tiny_model_dir, text_file, tmp_path):
    strategies = build_strategies(run_config(str(tiny_model_dir), text_file, tmp_path / "r", ["full", "test-recorder"]).strategies)
    hybrid = Hybrid(strategies)

    class Out:
        logits = torch.ones(2, 2)

    terms = hybrid.extra_losses(Out(), {}, None)
    assert list(terms) == ["test-recorder/zero"]
    assert terms["test-recorder/zero"].item() == pytest.approx(0.5)


def test_hybrid_of_two_trains_lora_and_keeps_base(recorder, tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", "lora+test-recorder", steps=4)
    outcome = finetune(config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = outcome.model.get_base_model()
    base_state = {k: v for k, v in base.state_dict().items()}
    for name, value in tuned.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(value, base_state[key]), f"base weight {key} changed under LoRA"
    assert "setup" in Recorder.calls and Recorder.calls.count("after_step") == 4


def test_incompatible_pair_refused_with_clear_message():
    with pytest.raises(ConfigError, match="'full' and 'lora' both decide which parameters train"):
        build_strategies([_spec("full"), _spec("lora")])


def test_duplicate_and_unknown_strategies_refused():
    with pytest.raises(ConfigError, match="listed twice"):
        build_strategies([_spec("lora"), _spec("lora")])
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        build_strategy("lroa", {})


def test_strategy_params_validated_with_key_path():
    with pytest.raises(ConfigError, match=r"unknown key 'strategies\[0\].rank'; did you mean 'r'"):
        build_strategies([_spec("lora", rank=4)])
    with pytest.raises(ConfigError, match=r"strategies\[0\].r"):
        build_strategies([_spec("lora", r=0)])


def test_builtin_baselines_registered():
    assert {"full", "freeze", "lora", "prompt-tuning"} <= set(available_strategies())


def _spec(name: str, **params):
    from retain.config import StrategySpec

    return StrategySpec(name=name, **params)
