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


# ---------------------------------------------------------------------------------------------
# Requirements: checked with the config, before any model or data loads


def _run(strategies, tasks: int = 1, general: bool = False, model: str = "no/such-model-dir"):
    from retain.config import load_config_dict

    data = {
        "model": {"name_or_path": model},
        "tasks": [{"name": f"t{i + 1}", "data": {"path": f"missing-{i}.jsonl"}} for i in range(tasks)],
        "strategies": strategies,
    }
    if general:
        data["general_data"] = {"path": "missing-general.jsonl"}
    return load_config_dict(data)


LORA = {"name": "lora", "r": 2}

UNMET = [
    (["full", "ewc-lora"], 2, True, "strategies[1] (ewc-lora): list it with lora, e.g. strategies: [lora, ewc-lora]"),
    (["full", {"name": "lwf", "anchor": "general"}], 1, False,
     "strategies[1] (lwf): anchor: general needs text: set general_data or strategies[1].data"),
    (["full", {"name": "lwf", "teacher": "adapters_off"}], 1, False, "strategies[1] (lwf): teacher: adapters_off needs a PEFT"),
    (["full", {"name": "ewc", "source": "general"}], 2, False,
     "strategies[1] (ewc): source: general needs general text: set general_data"),
    (["full", "ewc"], 1, False, "strategies[1] (ewc): source: previous_task estimates the Fisher on finished tasks"),
    ([LORA, {"name": "ewc-lora", "source": "both"}], 2, False, "strategies[1] (ewc-lora): source: both needs general text"),
    (["full", {"name": "importance", "source": "general"}], 2, False, "strategies[1] (importance): source: general needs"),
    (["full", "importance"], 1, False, "strategies[1] (importance): source: training learns importance"),
    (["full", "fip"], 1, False, "strategies[1] (fip): pool: general needs text: set general_data or strategies[1].data"),
    (["full", {"name": "fip", "pool": "past"}], 1, False, "strategies[1] (fip): pool: past anchors on earlier tasks"),
    (["full", {"name": "replay", "source": "general"}], 2, False, "strategies[1] (replay): source: general needs text"),
    (["full", "replay"], 1, False, "strategies[1] (replay): source: auto replays earlier tasks, and this run has one task"),
    (["full", {"name": "synthetic-replay", "demonstrations_from_data": 0}], 2, False,
     "strategies[1] (synthetic-replay): nothing to synthesize from"),
    (["full", {"name": "synthetic-replay", "tasks": {"stroies": {"description": "x"}}}], 1, False, "'stroies'"),
    (["full", {"name": "synthetic-replay", "tasks": {"t1": {}}}], 1, False, "strategies[1].tasks.t1: give a description"),
    (["o-lora"], 1, False, "strategies[0] (o-lora): it works across a sequence of tasks and needs at least 2"),
    (["progressive-prompts"], 1, False, "strategies[0] (progressive-prompts): it works across a sequence of tasks"),
]

MET = [
    ([LORA, "ewc-lora"], 2, False),
    (["full", {"name": "lwf", "anchor": "general"}], 1, True),
    ([LORA, {"name": "lwf", "teacher": "adapters_off"}], 1, False),
    (["full", "ewc"], 1, True),
    (["full", "ewc"], 2, False),
    (["full", {"name": "ewc", "file": "fisher.safetensors"}], 1, False),
    (["full", "importance"], 1, True),
    (["full", "importance"], 2, False),
    (["full", "fip"], 1, True),
    (["full", {"name": "fip", "pool": "past"}], 2, False),
    (["full", "replay"], 2, False),
    (["full", "replay"], 1, True),
    (["full", {"name": "synthetic-replay", "prompts": ["Once"]}], 1, False),
    (["full", "synthetic-replay"], 1, False),  # defaults: demonstrations from each task's own data
    (["full", {"name": "synthetic-replay", "demonstrations_from_data": 0}], 1, True),  # general_data openings
    (["o-lora"], 2, False),
    (["full", "l2", "stm", "lwf"], 1, False),
]


@pytest.mark.parametrize("strategies,tasks,general,message", UNMET, ids=[m.split(":")[0] + f"-{i}" for i, (*_, m) in enumerate(UNMET)])
def test_unmet_requirement_refused_with_key_path(strategies, tasks, general, message):
    from retain.strategies.registry import validate_run_config

    with pytest.raises(ConfigError) as err:
        validate_run_config(_run(strategies, tasks, general), "run.yaml")
    assert str(err.value).startswith("invalid config in run.yaml: ")
    assert message in str(err.value)


@pytest.mark.parametrize("strategies,tasks,general", MET)
def test_met_requirements_pass(strategies, tasks, general):
    from retain.strategies.registry import validate_run_config

    assert validate_run_config(_run(strategies, tasks, general))


def test_every_unmet_requirement_is_listed_in_one_error():
    from retain.strategies.registry import validate_run_config

    config = _run(["full", {"name": "lwf", "anchor": "general"}, "fip", {"name": "replay", "source": "general"}])
    with pytest.raises(ConfigError) as err:
        validate_run_config(config)
    lines = [line.strip() for line in str(err.value).splitlines()[1:]]
    assert [line.split(":")[0] for line in lines] == ["strategies[1] (lwf)", "strategies[2] (fip)", "strategies[3] (replay)"]


def test_config_mistake_refused_in_seconds_before_the_model_loads(tmp_path, monkeypatch):
    """The model directory does not exist: the error must be about the strategy, and come fast."""
    import time

    import yaml

    import retain.models.loading as loading
    from retain.train.run import load_run_config

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was refused")

    monkeypatch.setattr(loading, "load_model", no_loading)
    config = _run(["full", {"name": "lwf", "anchor": "general"}], model=str(tmp_path / "no-such-model"))
    config = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(tmp_path / "run")})})
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"strategies\[1\] \(lwf\): anchor: general needs text"):
        finetune(config)
    assert time.perf_counter() - start < 2.0
    assert not (tmp_path / "run").exists()

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with pytest.raises(ConfigError, match=r"(?s)invalid config in .*run.yaml: .*strategies\[1\] \(lwf\)"):
        load_run_config(path)


def test_strategy_seeds_default_to_train_seed():
    """Every strategy with a seed key leaves it unset by default, so train.seed (bench --seed) moves it."""
    from retain.strategies.base import strategy_seed

    seeded = [n for n in available_strategies() if "seed" in build_strategy(n, _minimal(n)).config.model_fields]
    assert {"ewc", "ewc-lora", "importance", "lwf", "fip", "stm", "replay", "synthetic-replay"} <= set(seeded)
    for name in seeded:
        assert build_strategy(name, _minimal(name)).config.seed is None, name
    run = _run(["full"]).model_copy(update={"train": _run(["full"]).train.model_copy(update={"seed": 7})})
    assert strategy_seed(None, run) == 7 and strategy_seed(3, run) == 3
    assert strategy_seed(None, run, 1) != strategy_seed(None, run, 2) != strategy_seed(None, run)


def _minimal(name: str) -> dict:
    return {"freeze": {"top_layers": 1}}.get(name, {})


def test_every_strength_names_a_config_key_with_a_sensible_range():
    """The declared strength is what budgets adapt and `retain tune` searches: it must be a real key
    whose default lies inside the declared range."""
    from retain.strategies.registry import get_strategy_class

    declared = 0
    for name in available_strategies():
        cls = get_strategy_class(name)
        if cls.strength is None:
            continue
        declared += 1
        field = cls.Config.model_fields[cls.strength.key]
        assert 0 < cls.strength.low < cls.strength.high, name
        assert cls.strength.low <= field.default <= cls.strength.high, (name, field.default)
    assert declared >= 9
