"""Block expansion (LLaMA Pro): identity-initialized blocks, only they train, and the export loads plainly."""

from __future__ import annotations

import pytest
import torch
from conftest import run_config

from retain.errors import ConfigError
from retain.models.expansion import decoder_blocks, expand_blocks, expansion_plan
from retain.models.tiny import tiny_model
from retain.strategies import build_strategy
from retain.train import finetune


def test_plan_puts_one_block_after_each_group_as_the_authors_script():
    # LLaMA-2-7B: 32 -> 40, one copy after blocks 3, 7, ..., 31 (groups of 4)
    assert [i for i, n in enumerate(expansion_plan(32, 8)) if n] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert expansion_plan(2, 1) == [0, 1]
    assert expansion_plan(5, 2) == [0, 0, 1, 0, 1]  # groups of 2.5: after blocks 2 and 4
    assert expansion_plan(2, 6) == [3, 3]  # 4x the depth: three copies after each block
    assert sum(expansion_plan(7, 3)) == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_expanded_model_computes_exactly_what_the_original_did(arch, tokenizer):
    model = tiny_model(arch, len(tokenizer), seed=0, hidden=32, layers=4, heads=4).eval()
    x = torch.randint(4, len(tokenizer), (2, 9))
    with torch.no_grad():
        before = model(x).logits
        generated = model.generate(x[:, :4], max_new_tokens=5, do_sample=False)
    added = expand_blocks(model, 2)
    assert added == [2, 5]  # after original blocks 1 and 3, renumbered in order
    layers = decoder_blocks(model)
    assert model.config.num_hidden_layers == len(layers) == 6
    assert [block.self_attn.layer_idx for block in layers] == list(range(6))  # KV-cache slots follow the order
    for i in added:  # a copy of the block below with zeroed output projections
        assert torch.equal(layers[i].self_attn.q_proj.weight, layers[i - 1].self_attn.q_proj.weight)
        assert not layers[i].self_attn.o_proj.weight.any() and not layers[i].mlp.down_proj.weight.any()
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 6
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
        assert torch.equal(model.generate(x[:, :4], max_new_tokens=5, do_sample=False), generated)


def test_only_the_new_blocks_get_gradients(tokenizer):
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    strategy = build_strategy("block-expansion", {"new_blocks": 1})
    model = strategy.setup(model, None)
    (new,) = strategy.added
    x = torch.randint(4, len(tokenizer), (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    layers = decoder_blocks(model)
    prefix = f"model.layers.{new}."
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == name.startswith(prefix), name
        if not name.startswith(prefix):
            assert parameter.grad is None, name
    # at the identity init only the zeroed projections get a gradient (the rest are multiplied by zero)
    assert layers[new].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert layers[new].mlp.down_proj.weight.grad.abs().sum() > 0
    assert not layers[new].self_attn.q_proj.weight.grad.any()

    with_head = build_strategy("block-expansion", {"new_blocks": 1, "train_head": True}).setup(
        tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4), None)
    assert with_head.get_output_embeddings().weight.requires_grad


def test_default_count_is_a_quarter_of_the_blocks_and_other_models_are_refused(tokenizer):
    strategy = build_strategy("block-expansion", {})
    assert strategy.blocks_to_add(32) == 8 and strategy.blocks_to_add(2) == 1
    assert build_strategy("block-expansion", {"expansion": 1.0}).blocks_to_add(6) == 6
    gpt2 = tiny_model("gpt2", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    with pytest.raises(ConfigError, match="block-expansion"):
        strategy.setup(gpt2, None)


def test_trained_export_loads_with_plain_from_pretrained(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    config = run_config(str(tiny_model_dir), text_file, tmp_path / "run", [{"name": "block-expansion", "new_blocks": 2}],
                        steps=4)
    outcome = finetune(config)
    trained = outcome.model.eval()
    loaded = AutoModelForCausalLM.from_pretrained(outcome.final_dir).eval()
    assert loaded.config.num_hidden_layers == 4
    x = torch.randint(4, 60, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, trained(x).logits)
    # the original blocks (now 0 and 2) and everything outside the new blocks are bit-identical to the base
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    renamed = {0: 0, 1: 2}
    tuned = loaded.state_dict()
    for name, weight in base.items():
        for old, new in renamed.items():
            name_now = name.replace(f"layers.{old}.", f"layers.{new}.") if f"layers.{old}." in name else None
            if name_now:
                break
        assert torch.equal(tuned[name_now or name], weight), name
    assert not torch.equal(tuned["model.layers.1.mlp.down_proj.weight"], torch.zeros_like(tuned["model.layers.1.mlp.down_proj.weight"]))


def test_names_as_loaded_match_each_block_with_itself():
    """Drift by name after an expansion: block 1 of 2 becomes block 2 of 4 (a new block sits at 1, another
    at 3); renamed, the loaded blocks are compared with themselves and the new ones are left out."""
    from retain.eval.drift import effective_weights, snapshot_weights
    from retain.models.expansion import expand_blocks, names_as_loaded
    from retain.models.tiny import tiny_model

    model = tiny_model("llama", 40, seed=0, hidden=16, layers=2, heads=2)
    base = snapshot_weights(model)
    assert expand_blocks(model, 2) == [1, 3]
    renamed = names_as_loaded(model, effective_weights(model))
    assert set(renamed) == set(base)
    assert all(torch.equal(renamed[k], base[k]) for k in base)  # every loaded block found under its old name
    by_name = effective_weights(model)  # without renaming, block 1 is a new block, not the loaded block 1
    key = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(by_name[key], base[key]) and torch.equal(renamed[key], base[key])


def test_weight_drift_of_an_expansion_is_zero_until_a_loaded_block_moves():
    from retain.eval.drift import snapshot_weights, weight_rel_l2
    from retain.models.expansion import expand_blocks
    from retain.models.tiny import tiny_model

    model = tiny_model("llama", 40, seed=0, hidden=16, layers=2, heads=2)
    base = snapshot_weights(model)
    expand_blocks(model, 2)
    assert weight_rel_l2(base, model) == 0.0  # the loaded blocks are where they were, only renumbered
    with torch.no_grad():
        decoder_blocks(model)[1].mlp.up_proj.weight.add_(1.0)  # a new block trains: no base to compare with
    assert weight_rel_l2(base, model) == 0.0
    with torch.no_grad():
        decoder_blocks(model)[2].mlp.up_proj.weight.add_(1.0)  # the loaded block 1 moves
    assert weight_rel_l2(base, model) > 0.0
