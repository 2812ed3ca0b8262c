"""retain strategies inside ``transformers.Trainer``: the loss terms equal retain's own loop's on the same
batch, a resumed Trainer run ends with the uninterrupted run's weights, and the loss scale follows the
Trainer's ``num_items_in_batch`` convention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from retain.config import load_config_dict
from retain.integrations import RetainSession, retain_trainer, scaled_loss
from retain.integrations.checkpoint import read_state
from retain.models.tiny import char_tokenizer, tiny_model
from retain.strategies import Hybrid
from retain.strategies.base import Strategy
from retain.strategies.registry import register_strategy
from retain.train import finetune

PERTURB = "_test-perturb"


@register_strategy(PERTURB)
class Perturb(Strategy):
    """Moves every trainable weight by seeded noise at task start (after the anchors were taken), so a
    penalty and a distillation term are non-zero on the first step."""

    def before_task(self, task, ctx) -> None:
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for _, p in sorted(ctx.unwrapped_model.named_parameters()):
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))


def _files(folder: Path) -> tuple[Path, Path]:
    task, general = folder / "task.jsonl", folder / "general.jsonl"
    # equal-length records, one example each: the batch's token mean does not depend on the row order
    task.write_text("".join(json.dumps({"text": f"the cat sat on the mat {10 + i}."}) + "\n" for i in range(4)))
    general.write_text("".join(json.dumps({"text": f"a dog ran in the park {10 + i}!"}) + "\n" for i in range(12)))
    return task, general


HYBRIDS = {
    "full+ewc": ["full", {"name": "ewc", "lambda_": 100.0, "max_examples": 8}, PERTURB],
    "lora+lwf": [{"name": "lora", "r": 4, "dropout": 0.0}, {"name": "lwf", "anchor": "general", "anchor_batch_size": 2},
                 PERTURB],
}


def _data(path: Path) -> dict:
    return {"path": str(path), "max_length": 40, "pack": False}


def _model(tokenizer) -> nn.Module:
    return tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)


class Recorder:
    """Wraps Hybrid.extra_losses: the task loss and every named term of each call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, float]] = []
        original = Hybrid.extra_losses

        def recording(hybrid, outputs, batch, ctx):
            terms = original(hybrid, outputs, batch, ctx)
            self.calls.append({"task": float(outputs.loss), **{k: float(v) for k, v in terms.items()}})
            return terms

        monkeypatch.setattr(Hybrid, "extra_losses", recording)


def _args(out: Path, steps: int, **extra):
    from transformers import TrainingArguments

    values = {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
              "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no", "report_to": [],
              "use_cpu": True, "disable_tqdm": True, "seed": 0, "weight_decay": 0.0}
    values.update(extra)
    return TrainingArguments(**values)


def _session(strategies, task: Path, general: Path, out: Path) -> RetainSession:
    return RetainSession.create(strategies=strategies, task=("t", _data(task)), general_data=_data(general),
                                output_dir=out, save_per_task=False)


def _trainer(session: RetainSession, model: nn.Module, args):
    from transformers import Trainer

    return retain_trainer(Trainer)(model=model, args=args, train_dataset=session.train_dataset(),
                                   data_collator=session.data_collator, retain=session)


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_trainer_loss_terms_equal_retains_loop_on_the_same_batch(name, tmp_path, monkeypatch):
    task, general = _files(tmp_path)
    tokenizer = char_tokenizer()
    recorder = Recorder(monkeypatch)

    config = load_config_dict({
        "model": {"name_or_path": "tiny"},
        "tasks": [{"name": "t", "data": _data(task)}],
        "strategies": HYBRIDS[name],
        "general_data": _data(general),
        "train": {"steps_per_task": 1, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1},
        "output": {"dir": str(tmp_path / "loop"), "save_per_task": False},
    })
    finetune(config, model=_model(tokenizer), tokenizer=tokenizer)
    loop = recorder.calls[-1]

    session = _session(HYBRIDS[name], task, general, tmp_path / "trainer")
    trainer = _trainer(session, session.setup(_model(tokenizer), tokenizer), _args(tmp_path / "trainer" / "hf", 1))
    session.train(trainer)
    integration = recorder.calls[-1]

    assert len(recorder.calls) == 2 and set(loop) == set(integration) and len(loop) == 2  # task loss + one term
    term = next(k for k in loop if k != "task")
    assert loop[term] > 1e-4  # the penalty / distillation term is really there
    diffs = {k: abs(loop[k] - integration[k]) for k in loop}
    assert max(diffs.values()) <= 1e-6, diffs
    # what the Trainer backpropagated and logged: task loss + terms, as retain's loop
    logged = trainer.state.log_history[0]
    assert abs(logged["loss"] - (loop["task"] + loop[term])) <= 1e-5
    assert abs(logged[f"retain/{term}"] - loop[term]) <= 1e-6


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_resumed_trainer_run_ends_with_the_uninterrupted_weights(name, tmp_path):
    task, general = _files(tmp_path)
    tokenizer = char_tokenizer()
    strategies = [s for s in HYBRIDS[name] if s != PERTURB]

    session = _session(strategies, task, general, tmp_path / "a")
    trainer = _trainer(session, session.setup(_model(tokenizer), tokenizer),
                       _args(tmp_path / "a" / "hf", 6, save_strategy="steps", save_steps=3))
    session.train(trainer)
    expected = _weights(session.ctx.unwrapped_model)
    checkpoint = tmp_path / "a" / "hf" / "checkpoint-3"
    state = read_state(checkpoint)
    assert state.task_name == "t" and set(state.strategies) == {s if isinstance(s, str) else s["name"] for s in strategies}

    resumed = _session(strategies, task, general, tmp_path / "b")  # a fresh process' view: new model, new session
    trainer = _trainer(resumed, resumed.setup(_model(tokenizer), tokenizer),
                       _args(tmp_path / "a" / "hf", 6, save_strategy="steps", save_steps=3))
    resumed.train(trainer, resume_from_checkpoint=str(checkpoint))
    got = _weights(resumed.ctx.unwrapped_model)
    diff = max((got[n] - expected[n]).abs().max().item() for n in expected)
    assert diff <= 1e-6, diff
    if name.startswith("lora"):  # lora_B starts at zero
        moved = max(got[n].abs().max().item() for n in got if "lora_B" in n)
    else:
        moved = max((got[n] - base).abs().max().item() for n, base in _weights(_model(tokenizer)).items())
    assert moved > 1e-3  # it trained, so equal weights are not equal by standing still


def test_scaled_loss_follows_the_trainer_convention():
    task_mean, terms = torch.tensor(2.0), {"ewc/penalty": torch.tensor(0.6)}
    # 5 of the step's 20 label tokens in this micro-batch, 4 micro-batches: 2.0 * 5 / 20 + 0.6 / 4
    got = scaled_loss(task_mean, terms, local_items=5, num_items_in_batch=20, accumulation_steps=4, world=1,
                      average_across_devices=True)
    assert got.item() == pytest.approx(0.5 + 0.15)
    # a global count over 2 processes: DDP averages gradients, so the task part is multiplied back by 2
    got = scaled_loss(task_mean, terms, local_items=5, num_items_in_batch=20, accumulation_steps=4, world=2,
                      average_across_devices=True)
    assert got.item() == pytest.approx(1.0 + 0.15)
    # no count: per-micro-batch means, divided by the accumulation steps
    got = scaled_loss(task_mean, terms, local_items=0, num_items_in_batch=None, accumulation_steps=4, world=1,
                      average_across_devices=False)
    assert got.item() == pytest.approx(0.5 + 0.15)


def test_session_refuses_a_trainer_without_it(tmp_path):
    from transformers import Trainer

    task, general = _files(tmp_path)
    tokenizer = char_tokenizer()
    session = _session(["full"], task, general, tmp_path / "x")
    model = session.setup(_model(tokenizer), tokenizer)
    plain = Trainer(model=model, args=_args(tmp_path / "x" / "hf", 1), train_dataset=session.train_dataset(),
                    data_collator=session.data_collator)
    with pytest.raises(Exception, match="retain_trainer"):
        session.train(plain)


@pytest.mark.parametrize("strategy", [{"name": "o-lora", "r": 2}, {"name": "progressive-prompts", "num_virtual_tokens": 3}],
                         ids=["o-lora", "progressive-prompts"])
def test_two_task_sequence_resumes_mid_second_task(strategy, tiny_model_dir, tmp_path):
    """Strategies that add modules per task (a new adapter, a longer prompt) rebuild them from the
    checkpoint's retain state before the Trainer loads weights; the resumed run ends where the other did."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task, general = _files(tmp_path)

    def session_and_model(out: Path):
        session = RetainSession.create(strategies=[strategy], tasks={"a": _data(task), "b": _data(general)},
                                       output_dir=out, model_name=str(tiny_model_dir))
        model = session.setup(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              AutoTokenizer.from_pretrained(tiny_model_dir))
        return session, model

    def trainer_for(session, model, name, out):
        args = _args(out / "hf" / name, 4, save_strategy="steps", save_steps=2, learning_rate=0.05)
        return retain_trainer(__import__("transformers").Trainer)(
            model=model, args=args, train_dataset=session.train_dataset(name), data_collator=session.data_collator,
            retain=session)

    session, model = session_and_model(tmp_path / "a")
    for name in ("a", "b"):
        session.train(trainer_for(session, model, name, tmp_path / "a"), task=name)
    expected = _weights(session.ctx.unwrapped_model)
    written = session.finish()
    assert json.loads((written["final"] / "retain_tasks.json").read_text())["tasks"][1]["folder"] == "tasks/01-b"

    resumed, model = session_and_model(tmp_path / "b")  # a new process: nothing of task a in memory
    checkpoint = tmp_path / "a" / "hf" / "b" / "checkpoint-2"
    resumed.train(trainer_for(resumed, model, "b", tmp_path / "a"), task="b", resume_from_checkpoint=str(checkpoint))
    got = _weights(resumed.ctx.unwrapped_model)
    assert set(got) == set(expected)
    diff = max((got[n] - expected[n]).abs().max().item() for n in expected)
    assert diff <= 1e-6, diff


MICRO = "_test-micro-batch"


@register_strategy(MICRO)
class MicroBatchProbe(Strategy):
    """Records ``ctx.micro_batch`` where each hook sees it (class-level: the session builds its own instance)."""

    seen: list[tuple[str, int]] = []

    def transform_batch(self, batch, ctx):
        MicroBatchProbe.seen.append(("transform", ctx.micro_batch))
        return batch

    def extra_losses(self, outputs, batch, ctx):
        MicroBatchProbe.seen.append(("score", ctx.micro_batch))
        return {}


def test_trainer_sets_the_micro_batch_as_the_loop_does(tmp_path):
    """With gradient accumulation 2, each step builds micro-batches 0 and 1 before any forward, then
    scores them in the same order (what lwf's and fip's per-micro-batch pool rows rely on)."""
    task, general = _files(tmp_path)
    tokenizer = char_tokenizer()
    MicroBatchProbe.seen = []
    session = _session(["full", MICRO], task, general, tmp_path / "trainer")
    args = _args(tmp_path / "trainer" / "hf", 2, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    session.train(_trainer(session, session.setup(_model(tokenizer), tokenizer), args))
    step = [("transform", 0), ("transform", 1), ("score", 0), ("score", 1)]  # 4 examples: two whole steps
    assert MicroBatchProbe.seen == step * 2, repr(MicroBatchProbe.seen)
