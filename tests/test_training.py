"""The loop on tiny models of three architectures and on the real stories260K: losses fall, the right
weights move, outputs load with transformers/peft, NaN stops the run, trackers write."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_config
from transformers import AutoModelForCausalLM

from retain.config import load_config_dict
from retain.models.tiny import char_tokenizer, tiny_model
from retain.strategies import Strategy, available_strategies, register_strategy
from retain.train import NonFiniteLossError, finetune
from retain.train.checkpoint import latest_checkpoint


def _loss(model, tokenizer, texts) -> float:
    model.eval()
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss.item()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_tiny_architectures_train_and_save_loadable_dirs(arch, text_file, tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_model(arch, len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    texts = ["the cat sat on the mat. #1", "a dog ran in the park! #2"]
    before = _loss(model, tokenizer, texts)
    config = run_config(f"tiny-{arch}", text_file, tmp_path / arch, ["full"], steps=25)
    outcome = finetune(config, model=model, tokenizer=tokenizer)
    after = _loss(outcome.model, tokenizer, texts)
    assert after < before - 0.5, (before, after)
    reloaded = AutoModelForCausalLM.from_pretrained(outcome.final_dir)
    assert _loss(reloaded, tokenizer, texts) == pytest.approx(after, abs=1e-5)


def test_lora_saves_adapter_and_merged_model(tiny_model_dir, text_file, tmp_path):
    from peft import PeftModel

    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", [{"name": "lora", "r": 4}], steps=10)
    config.output.merge = True
    outcome = finetune(config)
    assert (outcome.final_dir / "adapter_config.json").is_file()
    tokenizer = char_tokenizer()
    texts = ["the cat sat on the mat."]
    expected = _loss(outcome.model, tokenizer, texts)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), outcome.final_dir)
    merged = AutoModelForCausalLM.from_pretrained(outcome.final_dir / "merged")
    assert _loss(adapter, tokenizer, texts) == pytest.approx(expected, abs=1e-5)
    assert _loss(merged, tokenizer, texts) == pytest.approx(expected, abs=1e-5)


def test_freeze_trains_only_the_chosen_blocks(tiny_model_dir, text_file, tmp_path):
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", [{"name": "freeze", "top_layers": 1}], steps=5)
    outcome = finetune(config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = {n for n, v in outcome.model.state_dict().items() if not torch.equal(v, base[n])}
    assert moved and all(n.startswith("model.layers.1.") for n in moved), moved


def test_freeze_by_pattern(tiny_model_dir, text_file, tmp_path):
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", [{"name": "freeze", "trainable": ["*.mlp.*"]}], steps=3)
    outcome = finetune(config)
    trainable = {n for n, p in outcome.model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)


def test_prompt_tuning_trains_only_the_soft_prompt(tiny_model_dir, text_file, tmp_path):
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", [{"name": "prompt-tuning", "num_virtual_tokens": 4}], steps=5)
    outcome = finetune(config)
    trainable = [n for n, p in outcome.model.named_parameters() if p.requires_grad]
    assert trainable and all("prompt_encoder" in n for n in trainable)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, value in outcome.model.get_base_model().state_dict().items():
        assert torch.equal(value, base[name])


def test_gradient_accumulation_matches_a_larger_batch(tiny_model_dir, text_file, tmp_path):
    """Packed windows have equal token counts, so 2 x 4 accumulated equals one batch of 8."""
    big = finetune(run_config(str(tiny_model_dir), text_file, tmp_path / "a", ["full"], steps=3, batch_size=8, max_grad_norm=None))
    accumulated = finetune(
        run_config(str(tiny_model_dir), text_file, tmp_path / "b", ["full"], steps=3, batch_size=4, grad_accum=2, max_grad_norm=None)
    )
    a, b = big.model.state_dict(), accumulated.model.state_dict()
    # Adam turns float noise in a near-zero gradient into an update: up to 4e-5 over train.seed 0-11 (3 steps at
    # lr 1e-2), while steps that read other rows end 4e-2 apart
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


class _ExplodeAtStep(Strategy):
    """Adds an infinite loss term from the third step on: a divergence that does not depend on numerics."""

    def extra_losses(self, outputs, batch, ctx):
        return {"boom": torch.tensor(float("inf"))} if ctx.step_in_task >= 2 else {}


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tiny_model_dir, text_file, tmp_path):
    if "test-explode" not in available_strategies():
        register_strategy("test-explode")(_ExplodeAtStep)
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full", "test-explode"], steps=30)
    config.checkpoint.every = 1
    with pytest.raises(NonFiniteLossError, match=r"diverged at task 't1' step 5 of 30: 3 steps in a row.*--resume"):
        finetune(config)
    last = latest_checkpoint(tmp_path / "run")
    assert last is not None
    meta = json.loads((last / "meta.json").read_text())
    assert meta["position"]["step_in_task"] >= 1


def test_tensorboard_tracker_writes_events(tiny_model_dir, text_file, tmp_path):
    pytest.importorskip("tensorboard")
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["full"], steps=4, trackers=["tensorboard"])
    finetune(config)
    assert list((tmp_path / "run").rglob("events.out.tfevents*"))


def test_task_sequence_saves_per_task_outputs(tiny_model_dir, text_file, pc_file, tmp_path):
    config = load_config_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "tasks": [
                {"name": "text", "data": {"path": str(text_file), "max_length": 32}},
                {"name": "qa", "data": {"path": str(pc_file), "max_length": 32}},
            ],
            "train": {"steps_per_task": 3, "batch_size": 4, "progress": False},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    finetune(config)
    assert (tmp_path / "run" / "tasks" / "00-text" / "config.json").is_file()
    assert (tmp_path / "run" / "tasks" / "01-qa" / "config.json").is_file()
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def _clause_loss(model, tokenizer, texts) -> float:
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_stories260k_learns_contract_clauses(strategy, data_dir, tmp_path):
    from retain.models.llama2c import ensure_stories260k
    from retain.scenarios.stories_contracts import contract_splits
    from retain.train.run import default_cache_dir

    model_dir = ensure_stories260k(data_dir, default_cache_dir())
    train, held = contract_splits(data_dir / "legalbench-cuad")
    train_file = tmp_path / "clauses.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in train[:3000]))
    config = load_config_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "tasks": [{"name": "contracts", "data": {"path": str(train_file), "max_length": 128}}],
            "strategies": [strategy],
            "train": {"steps_per_task": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "progress": False},
            "output": {"dir": str(tmp_path / "run"), "save_per_task": False},
        }
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = _clause_loss(base, tokenizer, held[:40])
    outcome = finetune(config)
    after = _clause_loss(outcome.model, tokenizer, held[:40])
    assert after < before - 0.3, (before, after)
    if strategy == "lora":
        tuned = outcome.model.get_base_model().state_dict()
        for name, value in base.state_dict().items():
            key = name if name in tuned else name.replace("weight", "base_layer.weight")
            assert torch.equal(tuned[key], value), f"LoRA changed base weight {name}"
    assert math.isfinite(after)


def test_merging_strategy_saves_the_full_model(tiny_model_dir, text_file, tmp_path):
    """ewc-lora folds each task's adapter into the weights, so the output is the merged model, not an adapter."""
    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", ["lora", {"name": "ewc-lora", "lambda_": 10.0}], steps=4)
    config.tasks.append(config.tasks[0].model_copy(update={"name": "t2"}))
    outcome = finetune(config)
    assert not (outcome.final_dir / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(outcome.final_dir)
    tokenizer = char_tokenizer()
    texts = ["the cat sat on the mat."]
    assert _loss(reloaded, tokenizer, texts) == pytest.approx(_loss(outcome.model, tokenizer, texts), abs=1e-5)


class _WatchWeights(Strategy):
    """Keeps the weights after every completed step; the loss turns infinite from the third step on.

    The infinite term is a constant, so the gradients stay finite: only the loop's check keeps the
    optimizer from moving the weights on the failing step.
    """

    model = None
    after_steps: list = []

    def setup(self, model, ctx):
        type(self).model, type(self).after_steps = model, []
        return model

    def extra_losses(self, outputs, batch, ctx):
        return {"boom": torch.tensor(float("inf"))} if ctx.step_in_task >= 2 else {}

    def after_step(self, model, ctx):
        self.after_steps.append({n: p.detach().clone() for n, p in model.named_parameters()})


def test_nonfinite_loss_stops_before_the_optimizer_step(text_file, tmp_path):
    if "test-watch-weights" not in available_strategies():
        register_strategy("test-watch-weights")(_WatchWeights)
    tokenizer = char_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    config = run_config("tiny", text_file, tmp_path / "run", ["full", "test-watch-weights"], steps=10, grad_accum=2)
    with pytest.raises(NonFiniteLossError) as raised:
        finetune(config, model=model, tokenizer=tokenizer)
    message = str(raised.value)
    assert "training diverged at task 't1' step 5 of 10: 3 steps in a row had a non-finite loss" in message
    assert "'test-watch-weights/boom': inf" in message and "Lower train.lr" in message and "--resume" in message
    before, after = _WatchWeights.after_steps[-1], dict(_WatchWeights.model.named_parameters())
    assert len(_WatchWeights.after_steps) == 2
    assert any(not torch.equal(before[n], _WatchWeights.after_steps[0][n]) for n in before)  # steps do move weights
    assert all(torch.equal(before[n], after[n]) for n in before)  # the failing one did not


class _Reporter(Strategy):
    """Reports a value once before the task and once at its fourth step, plus a loss term every step."""

    def before_task(self, task, ctx):
        ctx.log("reporter/before_task", 1.0)

    def extra_losses(self, outputs, batch, ctx):
        return {"half": outputs.logits.sum() * 0.0 + 0.5}

    def after_step(self, model, ctx):
        if ctx.step_in_task == 3:
            ctx.log("reporter/at_step_4", 4.0)


def test_strategy_metrics_belong_to_the_window_they_were_reported_in(text_file, tmp_path):
    if "test-reporter" not in available_strategies():
        register_strategy("test-reporter")(_Reporter)
    tokenizer = char_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    config = run_config("tiny", text_file, tmp_path / "run", ["full", "test-reporter"], steps=6, log_every=2)
    finetune(config, model=model, tokenizer=tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert [row.get("reporter/before_task") for row in rows] == [1.0, None, None]
    assert [row.get("reporter/at_step_4") for row in rows] == [None, 4.0, None]
    assert all(row["loss/test-reporter/half"] == pytest.approx(0.5) for row in rows)


_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def test_the_loop_reads_from_the_device_once_per_step(text_file, tmp_path, monkeypatch):
    """Every way a tensor reaches the host, counted when called from loop.py: one per optimizer step."""
    import sys

    import retain.train.loop as loop

    if "test-reporter" not in available_strategies():
        register_strategy("test-reporter")(_Reporter)
    calls: list[str] = []
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == loop.__file__:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    tokenizer = char_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    config = run_config("tiny", text_file, tmp_path / "run", ["full", "test-reporter"], steps=5, grad_accum=3, log_every=2)
    outcome = finetune(config, model=model, tokenizer=tokenizer)
    assert calls == ["tolist"] * 5
    stats = outcome.task_stats[0]
    assert stats.tokens == 5 * 3 * 4 * 32  # packed windows: every position is a token
    assert stats.loss_terms == {"test-reporter/half": pytest.approx(0.5)} and math.isfinite(stats.last_loss)
