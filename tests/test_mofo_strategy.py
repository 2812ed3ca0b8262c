"""The ``mofo`` strategy: MoFO's fraction as a strength (tune searches it, a budget moves it), the same
optimizer as ``train.optimizer: mofo``, and the loop following a moved fraction from the next step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_config
from test_mofo import B1, B2, EPS, LR, hand_step
from torch import nn

from retain.config import TrainConfig, load_config_dict
from retain.errors import ConfigError
from retain.eval.budget import BudgetMeter, Measurement
from retain.guide.catalogue import find_hybrid
from retain.guide.space import knobs
from retain.strategies import Hybrid
from retain.strategies.base import Strength
from retain.strategies.registry import build_strategies, get_strategy_class, validate_run_config
from retain.train import finetune
from retain.train.loop import build_optimizer, follow_optimizer_settings
from retain.train.optim import MoFO
from retain.train.sharding import sharding_problems


def test_fraction_is_the_strength_tune_searches_and_a_smaller_one_protects_more():
    strength = Strength.of(get_strategy_class("mofo"))
    assert (strength.label, strength.default, strength.low, strength.high) == ("mofo.fraction", 0.15, 0.01, 1.0)
    assert strength.moved(0.15, 1.0) < 0.15 and strength.at_protective_limit(0.01)  # more protection: fewer entries
    assert [k.label for k in knobs(find_hybrid("full+mofo"))] == ["mofo.fraction"]


def test_config_mistakes_are_refused_with_the_key(tmp_path):
    def config(strategies, **train):
        return run_config(str(tmp_path / "m"), tmp_path / "t.jsonl", tmp_path / "run", strategies, **train)

    with pytest.raises(ConfigError, match=r"train.mofo_fraction: 0.2 and strategies\[1\].fraction is 0.1"):
        validate_run_config(config(["full", {"name": "mofo", "fraction": 0.1}], optimizer="mofo", mofo_fraction=0.2))
    validate_run_config(config(["full", {"name": "mofo", "fraction": 0.2}], optimizer="mofo", mofo_fraction=0.2))
    with pytest.raises(ConfigError, match=r"strategies\[1\].fraction"):
        validate_run_config(config(["full", {"name": "mofo", "fraction": 0}]))
    problems = sharding_problems(build_strategies(config(["full", "mofo"]).strategies))
    assert problems == ["mofo: it ranks each weight's entries by momentum; sharded, each process would rank only "
                        "its rows (use train.parallel: ddp)"]


def test_a_trainer_session_refuses_it(tmp_path):
    from retain.integrations.session import RetainSession

    with pytest.raises(ConfigError, match="mofo sets the optimizer, and a Trainer keeps its own"):
        RetainSession.create(strategies="full+mofo", task=("t", tmp_path / "t.jsonl"), output_dir=tmp_path / "run")


class Tiny(nn.Module):
    """One 2x3 matrix and a bias: the hand case of ``test_mofo`` as a weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(2, dtype=torch.float64))


def test_the_loop_builds_mofo_from_the_strategy_and_follows_a_moved_fraction_by_hand():
    """``test_mofo``'s hand case through the strategy: fraction 0.5 moves the top 3 of 6 entries by |m|
    (0, 1, 2); then ``set_strength(1/6)`` (what a budget calls) makes the next step move only the top 1.

    step 1: g = (6, 5, 4, 3, 2, 1)   m = (.6, .5, .4, .3, .2, .1)            -> 0, 1, 2 move (fraction 0.5)
    step 2: g = (0, 0, 0, 0, 0, 10)  m = (.54, .45, .36, .27, .18, 1.09)     -> 5 alone moves (fraction 1/6)
    (at 0.5, step 2 would move 5, 0 and 1). The bias takes the full Adam step both times.
    """
    model = Tiny()
    mofo = get_strategy_class("mofo")(get_strategy_class("mofo").Config(fraction=0.5))
    hybrid = Hybrid([get_strategy_class("full")(), mofo])
    optimizer = build_optimizer(model, TrainConfig(lr=LR, betas=(B1, B2)), hybrid.optimizer_settings())
    assert isinstance(optimizer, MoFO) and optimizer.defaults["eps"] == EPS
    grads = [torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64), torch.tensor([0.0, 0, 0, 0, 0, 10], dtype=torch.float64)]
    m, v, expected = [0.0] * 6, [0.0] * 6, [0.0] * 6
    for t, (g, chosen) in enumerate(zip(grads, [{0, 1, 2}, {5}]), start=1):
        if t == 2:
            mofo.set_strength(1 / 6)
        before = model.weight.detach().flatten().clone()
        model.weight.grad, model.bias.grad = g.reshape(2, 3).clone(), torch.ones(2, dtype=torch.float64)
        follow_optimizer_settings(optimizer, hybrid.optimizer_settings())  # as the loop does before every step
        optimizer.step()
        hand_step(m, v, expected, g, chosen, t)
        after = model.weight.detach().flatten()
        assert {i for i in range(6) if after[i] != before[i]} == chosen, t
        assert after.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert (model.bias.detach() != 0).all()
    assert [g["fraction"] for g in optimizer.param_groups] == [1 / 6, 1.0]


def test_the_strategy_and_the_optimizer_option_train_the_same_weights_bit_for_bit(tiny_model_dir, text_file, tmp_path):
    steps, fraction = 3, 0.05
    strategy = finetune(run_config(str(tiny_model_dir), text_file, tmp_path / "s", ["full", {"name": "mofo", "fraction": fraction}],
                                   steps=steps)).model.state_dict()
    option = finetune(run_config(str(tiny_model_dir), text_file, tmp_path / "o", ["full"], steps=steps,
                                 optimizer="mofo", mofo_fraction=fraction)).model.state_dict()
    assert strategy.keys() == option.keys()
    assert all(torch.equal(strategy[k], option[k]) for k in strategy)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    name = next(k for k in base if k.endswith("q_proj.weight"))
    changed = int((strategy[name] != base[name]).sum())
    assert 0 < changed <= steps * int(base[name].numel() * fraction)  # filtered, not AdamW


def test_a_budget_move_reaches_the_optimizer_on_the_next_step(tiny_model_dir, tmp_path, monkeypatch):
    """Checks at steps 0, 2, 4; retention 0.5 at step 2 is over the 0.95 floor, so the budget lowers
    mofo.fraction there, and optimizer steps 3 and 4 use the lowered value."""
    from retain.config import DataConfig
    from retain.eval.runner import SuiteObserver
    from retain.eval.suite import SuiteConfig
    from retain.eval.tasks import NextTokenAccuracyEval

    def write(name: str, rows: list[str]) -> Path:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        return path

    task = write("task", [f"contracts shall be governed by the laws of delaware #{i}" for i in range(40)])
    general = write("general_eval", [f"a dog ran in the park {i} times." for i in range(48)])
    suite = SuiteConfig(tasks=[NextTokenAccuracyEval(name="general_acc", data=DataConfig(path=str(general), max_length=32))],
                        probe_prompts=["a dog ran in the park"])
    config = load_config_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "tasks": [{"name": "t1", "data": {"path": str(task), "max_length": 32}}],
        "strategies": ["full", "mofo"],
        "train": {"steps_per_task": 4, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1},
        "checkpoint": {"every": 0},
        "output": {"dir": str(tmp_path / "run"), "save_per_task": False},
        "budget": {"min_general_retention": 0.95, "check_every": 2, "early_checks": 0},
    })
    retention = iter([1.0, 0.5, 0.5])
    monkeypatch.setattr(BudgetMeter, "measure", lambda meter, *args: Measurement(general_retention=next(retention), task_score=0.1))
    used: list[list[float]] = []
    step = MoFO.step

    def recording(self, closure=None):
        used.append([g["fraction"] for g in self.param_groups])
        return step(self, closure)

    monkeypatch.setattr(MoFO, "step", recording)
    observer = SuiteObserver(suite, name="full+mofo", run_dir=tmp_path / "run", config=config.model_dump(mode="json"), batch_size=8)
    finetune(config, observer=observer)
    moved = observer.strategy_run().budget.checks[1].strengths["mofo.fraction"]
    assert moved < 0.15
    assert used == [[0.15, 1.0], [0.15, 1.0], [moved, 1.0], [moved, 1.0]]
