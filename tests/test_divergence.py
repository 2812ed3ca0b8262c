"""A step with a non-finite loss or gradient is skipped, N in a row stop the run, and no checkpoint ever
holds a non-finite weight; ``--resume`` may then change the learning rate and clipping."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_config
from rich.console import Console
from safetensors.torch import load_file

from retain.errors import DivergenceError
from retain.models.tiny import char_tokenizer, tiny_model
from retain.strategies import Strategy
from retain.strategies.registry import available_strategies, register_strategy
from retain.train import checkpoint as ckpt
from retain.train import finetune
from retain.train.loop import StepSums, keep_hyperparameters, total_grad_norm


def _checkpoints_are_finite(run_dir: Path) -> list[str]:
    names = []
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        weights = load_file(str(folder / "weights.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{folder.name} holds a non-finite weight"
        names.append(folder.name)
    return names


def _tiny():
    tokenizer = char_tokenizer()
    return tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4), tokenizer


def test_a_huge_learning_rate_without_clipping_never_checkpoints_nan(text_file: Path, tmp_path: Path) -> None:
    """The issue's case: lr 1e8, no clipping, a checkpoint every 2 steps. Before, the step-2 checkpoint
    held NaN weights and --resume failed at once; now the NaN gradients are skipped."""
    model, tokenizer = _tiny()
    config = run_config("tiny", text_file, tmp_path / "run", ["full"], steps=20, lr=1e8, max_grad_norm=None, log_every=1)
    config.checkpoint.every = 2
    with pytest.raises(DivergenceError, match=r"step (\d+) of 20: 3 steps in a row") as raised:
        finetune(config, model=model, tokenizer=tokenizer)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    names = _checkpoints_are_finite(tmp_path / "run")
    assert names, "the first checkpoint was written before the divergence"
    step = int(re.search(r"step (\d+) of 20", str(raised.value)).group(1))
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step))  # the log, the message and the names count alike
    assert names[-1] == f"step-{2 * ((step - 1) // 2):08d}-task00"  # the last even step before it


class _InfGradient(Strategy):
    """A loss term that is 0 in value but has a NaN gradient (d sqrt|x| at 0), at the chosen steps."""

    steps: set[int] = set()

    def extra_losses(self, outputs, batch, ctx):
        if ctx.step_in_task not in _InfGradient.steps:
            return {}
        weight = next(p for p in ctx.unwrapped_model.parameters() if p.requires_grad)
        x = weight.sum() - weight.sum().detach()
        return {"spike": x.abs().sqrt()}


@pytest.fixture
def spike_strategy():
    if "test-inf-gradient" not in available_strategies():
        register_strategy("test-inf-gradient")(_InfGradient)
    yield _InfGradient
    _InfGradient.steps = set()


def test_one_non_finite_gradient_is_skipped_and_the_run_goes_on(text_file: Path, tmp_path: Path, spike_strategy) -> None:
    spike_strategy.steps = {2}
    model, tokenizer = _tiny()
    config = run_config("tiny", text_file, tmp_path / "run", ["full", "test-inf-gradient"], steps=6, log_every=1)
    config.checkpoint.every = 1
    config.checkpoint.keep = 10
    outcome = finetune(config, model=model, tokenizer=tokenizer)
    assert outcome.task_stats[0].skipped_steps == 1 and outcome.task_stats[0].steps == 6
    assert len(_checkpoints_are_finite(tmp_path / "run")) == 6  # five step checkpoints and the task end
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps") for r in rows] == [None, None, 1.0, None, None, None]
    assert "loss" not in rows[2] and all("loss" in r for i, r in enumerate(rows) if i != 2)


def test_n_non_finite_steps_in_a_row_stop_the_run(text_file: Path, tmp_path: Path, spike_strategy) -> None:
    spike_strategy.steps = set(range(1, 100))
    model, tokenizer = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = run_config("tiny", text_file, tmp_path / "run", ["full", "test-inf-gradient"], steps=10, max_nonfinite_steps=2)
    config.checkpoint.every, config.checkpoint.keep = 1, 5
    with pytest.raises(DivergenceError) as raised:
        finetune(config, model=model, tokenizer=tokenizer)
    message = str(raised.value)
    assert "task 't1' step 3 of 10: 2 steps in a row" in message and "gradient norm nan" in message
    assert "--resume" in message
    after_first = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001-task00").weights
    assert any(not torch.equal(before[n], after_first[n]) for n in before)  # step 1 trained
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-00000002-task00"  # after step 2 (skipped): the weights of step 1
    assert all(torch.equal(after_first[n], t) for n, t in ckpt.load_checkpoint(latest).weights.items())

    # the cause is gone: --resume with another learning rate and clipping is accepted, says so, and finishes
    spike_strategy.steps = set()
    resumed = run_config("tiny", text_file, tmp_path / "run", ["full", "test-inf-gradient"], steps=10,
                         max_nonfinite_steps=2, lr=3e-3, max_grad_norm=0.5)
    resumed.checkpoint.every, resumed.checkpoint.keep = 1, 5
    printed = io.StringIO()
    outcome = finetune(resumed, resume=True, model=_tiny()[0], tokenizer=tokenizer,
                       console=Console(file=printed, width=200))
    assert "train.lr: 0.01 -> 0.003" in printed.getvalue() and "train.max_grad_norm: 1.0 -> 0.5" in printed.getvalue()
    assert "after step 2 of 10 (global step 2)" in printed.getvalue()
    assert outcome.task_stats[0].steps == 8 and outcome.task_stats[0].skipped_steps == 0
    _checkpoints_are_finite(tmp_path / "run")


def test_a_checkpoint_with_a_non_finite_weight_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    with pytest.raises(DivergenceError, match=r"1 of 2 weight tensors are not finite .*weight"):
        ckpt.save_checkpoint(tmp_path, position=ckpt.Position(0, 1, 1, True), model=model, full_weights=True,
                             optimizer=None, scheduler=None, strategy_state={})
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_the_gradient_norm_joins_the_one_read_of_the_step() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = total_grad_norm([a, b])
    assert norm.item() == pytest.approx(5.0)
    sums = StepSums(labels=torch.tensor(4.0), parts=2)  # 4 label tokens in the step; terms averaged over 2 parts
    sums.add(torch.tensor(4.0), {"x": torch.tensor(0.5)}, torch.ones(2, 3))
    sums.add(torch.tensor(2.0), {"x": torch.tensor(1.5)}, torch.ones(1, 3))
    values = sums.read(norm)
    assert (values.loss, values.task_loss, values.terms, values.tokens, values.grad_norm) == (2.5, 1.5, {"x": 1.0}, 9, 5.0)
    b.grad = torch.tensor([float("inf")])
    assert not sums.read(total_grad_norm([a, b])).finite


def test_resumed_optimizer_state_takes_the_new_hyperparameters() -> None:
    from retain.config import TrainConfig
    from retain.train.loop import build_optimizer, build_scheduler

    model = torch.nn.Linear(2, 2)
    old = TrainConfig(lr=0.1, weight_decay=0.5, scheduler="linear", warmup_steps=0)
    optimizer = build_optimizer(model, old)
    scheduler = build_scheduler(optimizer, old, 10)
    model(torch.ones(1, 2)).sum().backward()
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    new = TrainConfig(lr=0.01, weight_decay=0.0, scheduler="linear", warmup_steps=0)
    fresh = build_optimizer(model, new)
    fresh_scheduler = build_scheduler(fresh, new, 10)
    with keep_hyperparameters(fresh, fresh_scheduler):
        fresh.load_state_dict(saved_optimizer)
        fresh_scheduler.load_state_dict(saved_scheduler)
    assert fresh_scheduler.last_epoch == 4  # the position is kept
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([0.01 * 6 / 10] * 2)  # the new peak, linear decay
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.0, 0.0]
    assert fresh.state_dict()["state"][0]["exp_avg"].abs().sum() > 0  # the moments are restored
