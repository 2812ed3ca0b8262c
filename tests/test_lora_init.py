"""LoRA's subspace inits: MiLoRA's factors by hand, every init computes the base model at step 0, keeps
its residual in the base, and exports a full model that ``from_pretrained`` loads as trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retain.config import load_config_dict
from retain.errors import ConfigError
from retain.models.adapters import minor_factors
from retain.strategies.registry import validate_run_config
from retain.train import finetune


def test_minor_factors_by_hand():
    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # singular values 3 (e1) and 1 (e2)
    a, b, residual = minor_factors(weight, r=1, scaling=2.0)
    # the minor triplet (1, e2, e2): s B A = e2 e2^T, each factor sqrt(1 / 2) in size
    assert torch.allclose(2.0 * b @ a, torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(a.abs(), torch.tensor([[0.0, 0.5 ** 0.5]]), atol=1e-6)
    assert torch.allclose(residual, torch.tensor([[3.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError):
        minor_factors(weight, r=3, scaling=1.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-init-data")
    task, general = root / "task.jsonl", root / "general.jsonl"
    task.write_text("".join(json.dumps({"text": f"q{i}: add {i} {i + 1} = {2 * i + 1}"}) + "\n" for i in range(16)))
    general.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}."}) + "\n" for i in range(16)))
    return {"task": task, "general": general}


def config_for(model_dir: Path, files: dict[str, Path], out: Path, strategies: list, steps: int = 3):
    return load_config_dict({
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "t1", "data": {"path": str(files["task"]), "max_length": 24}}],
        "strategies": strategies,
        "general_data": {"path": str(files["general"]), "max_length": 16},
        "train": {"steps_per_task": steps, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out), "save_per_task": False},
    })


@pytest.mark.parametrize("init", ["pissa", "milora", "olora", "corda"])
def test_init_starts_at_the_base_and_exports_a_loadable_full_model(init, tiny_model_dir, files, tmp_path):
    from transformers import AutoModelForCausalLM

    from retain.strategies.lora import Lora, LoraConfig

    ids = torch.tensor([[1, 5, 9, 13, 7, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = base(input_ids=ids).logits

    # step 0: the wrapped model computes the base model, and the base weights hold a residual
    config = config_for(tiny_model_dir, files, tmp_path / "run", [{"name": "lora", "r": 2, "dropout": 0.0, "init": init}])
    ctx = _context(config)
    wrapped = Lora(LoraConfig(r=2, dropout=0.0, init=init)).setup(ctx.model, ctx).eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(input_ids=ids).logits, expected, atol=1e-4)
        moved = max((p - base.state_dict()[k.replace("base_model.model.", "").replace(".base_layer", "")]).abs().max().item()
                    for k, p in wrapped.state_dict().items() if "lora_" not in k)
    assert moved > 0, f"{init}: the base weights should keep a residual"

    # trained, exported: a plain full model whose outputs are the trained model's
    outcome = finetune(config)
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    outcome.model.eval()
    with torch.no_grad():
        trained = outcome.model(input_ids=ids).logits
        assert not torch.allclose(trained, expected, atol=1e-4)
        assert torch.allclose(loaded(input_ids=ids).logits, trained, atol=1e-4)


def _context(config):
    from accelerate import Accelerator

    from retain.data import collate, ensure_pad_token
    from retain.models.loading import load_model
    from retain.strategies.base import StrategyContext

    model, tokenizer = load_model(config.model)
    tokenizer = ensure_pad_token(tokenizer)
    return StrategyContext(config=config, accelerator=Accelerator(cpu=True), tokenizer=tokenizer, model=model, tasks=[],
                           run_dir=Path(config.output.dir), cache_dir=Path(config.output.dir) / "cache",
                           collate=lambda examples: collate(examples, tokenizer.pad_token_id))


def test_residual_inits_refuse_hybrids_that_read_the_base_with_adapters_off(tiny_model_dir, files, tmp_path):
    lora = {"name": "lora", "r": 2, "init": "pissa"}
    for other in ({"name": "lwf", "anchor": "general"}, "flow", {"name": "wise", "alpha": 0.5}):
        with pytest.raises(ConfigError, match="residual in the base weights"):
            validate_run_config(config_for(tiny_model_dir, files, tmp_path / "o", [lora, other]))
    validate_run_config(config_for(tiny_model_dir, files, tmp_path / "o", [lora, {"name": "lwf", "anchor": "general",
                                                                               "teacher": "copy"}]))
