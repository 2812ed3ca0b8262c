"""Progressive prompts: a new prompt per task in front of the frozen earlier ones (bit-identical even under
weight decay), inference prepends the whole stack, model folders reload, and resume regrows the stack."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_o_lora import resumed_matches_reference, two_task_config

from retain.config import load_config_dict
from retain.strategies.registry import build_strategy
from retain.train import finetune

M = 3  # virtual tokens per task


def test_prepend_freezes_the_old_rows_and_trains_the_new(llama):
    strategy = build_strategy("progressive-prompts", {"num_virtual_tokens": M})
    model = strategy.setup(llama, None)
    vocab = model.word_embeddings.weight
    assert all((vocab == row).all(dim=1).any() for row in strategy.embedding.weight)  # vocab initialisation
    first = strategy.embedding.weight.detach().clone()
    strategy._prepend()
    weight = strategy.embedding.weight
    assert weight.shape == (2 * M, vocab.shape[1]) and model.peft_config["default"].num_virtual_tokens == 2 * M
    assert torch.equal(weight[M:], first) and all((vocab == row).all(dim=1).any() for row in weight[:M])

    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.5)
    ids = torch.randint(4, 60, (2, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        assert weight.grad[M:].abs().sum() > 0  # the old prompt does receive gradient ...
        strategy.after_backward(model, None)
        assert weight.grad[M:].abs().sum() == 0  # ... which is dropped
        optimizer.step()
        optimizer.zero_grad()
        strategy.after_step(model, None)
    assert torch.equal(weight[M:], first)
    assert not torch.equal(weight[:M], first)


@pytest.fixture(scope="module")
def prompts_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    text_file, pc_file = folder / "text.jsonl", folder / "pc.jsonl"
    text_file.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}."}) + "\n" for i in range(30)))
    pc_file.write_text("".join(json.dumps({"prompt": f"q{i}: add {i} {i + 1} =", "completion": f" {2 * i + 1}"}) + "\n" for i in range(30)))
    strategy = {"name": "progressive-prompts", "num_virtual_tokens": M}
    config = two_task_config(tiny_model_dir, text_file, pc_file, folder / "run", strategy, lr=0.1, weight_decay=0.1)
    outcome = finetune(load_config_dict(config))
    return outcome, config, folder


def _prompt(run_dir, which):
    return load_file(str(run_dir / which / "adapter_model.safetensors"))["prompt_embeddings"]


def test_earlier_prompt_is_bit_identical_after_the_next_task(prompts_run):
    _, _, folder = prompts_run
    first, final = _prompt(folder / "run", "tasks/00-first"), _prompt(folder / "run", "final")
    assert first.shape[0] == M and final.shape[0] == 2 * M
    assert torch.equal(final[M:], first)  # weight decay was on: the old rows were restored every step
    assert json.loads((folder / "run" / "final" / "adapter_config.json").read_text())["num_virtual_tokens"] == 2 * M


def test_inference_prepends_every_prompt_newest_first(prompts_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome, _, folder = prompts_run
    prompts = _prompt(folder / "run", "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(4, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = torch.cat([prompts.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        expected = base(inputs_embeds=embeds).logits[:, 2 * M :]
        got = outcome.model.eval()(input_ids=ids).logits[:, -ids.shape[1] :]
        assert (got - expected).abs().max() <= 1e-5
        reloaded = PeftModel.from_pretrained(base, folder / "run" / "final").eval()
        assert (reloaded(input_ids=ids).logits[:, -ids.shape[1] :] - got).abs().max() <= 1e-6


def test_resume_regrows_the_prompt_stack(prompts_run, tmp_path):
    _, config, _ = prompts_run
    positions = resumed_matches_reference(tmp_path, config, "prompts")
    assert {(p["task_index"], p["task_started"]) for p in positions} >= {(1, False), (1, True)}
