"""Importance files: computed once by `retain importance compute`, reused by runs, refused for another model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from retain.cli.importance import importance_app
from retain.config import load_config_dict
from retain.models.adapters import canonical_name
from retain.models.fingerprint import base_fingerprint
from retain.models.tiny import char_tokenizer, tiny_model
from retain.stats.files import ImportanceFileError, load_importance, save_importance
from retain.train import finetune

SECRET = "zebra quartz"  # training text that must never appear in a file


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def general_file(tmp_path):
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": f"{SECRET} number {i} is here."}) + "\n" for i in range(12)))
    return path


def _compute(model_dir, data, out, method, *extra):
    result = CliRunner().invoke(
        importance_app,
        ["compute", "--model", str(model_dir), "--data", str(data), "--method", method, "--out", str(out),
         "--max-examples", "6", "--max-length", "24", *extra],
    )
    assert result.exit_code == 0, result.output
    return out


def test_cli_writes_statistics_with_metadata_and_no_text(tiny_model_dir, general_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for method in ("ewc", "importance"):
        path = _compute(tiny_model_dir, general_file, tmp_path / f"{method}.safetensors", method)
        loaded = load_importance(path, model=model)
        assert loaded.method == method and loaded.examples == 6 and len(loaded.data_hash) == 64
        assert loaded.estimator == ("sampled" if method == "ewc" else "si_general_pass")
        assert set(loaded.tensors) == {n for n, _ in model.named_parameters()}
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in loaded.tensors.values())
        assert sum(t.sum() for t in loaded.tensors.values()) > 0
        raw = path.read_bytes()
        assert SECRET.encode() not in raw and b"number 3" not in raw


def test_a_file_from_another_model_is_refused(tiny_model_dir, general_file, tmp_path):
    path = _compute(tiny_model_dir, general_file, tmp_path / "f.safetensors", "ewc")
    tok = char_tokenizer()
    other = tiny_model("llama", len(tok), seed=1, hidden=32, layers=2, heads=4)
    with pytest.raises(ImportanceFileError, match="computed for another model"):
        load_importance(path, model=other)
    with pytest.raises(ImportanceFileError, match="holds 'ewc' statistics"):
        load_importance(path, methods=("importance",))


def test_fingerprint_ignores_lora_wrapping_but_not_weights(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    before = base_fingerprint(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert base_fingerprint(wrapped) == before
    assert canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        wrapped.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight[0, 0] += 1e-3
    assert base_fingerprint(wrapped) != before


def _run(model_dir, data, out, strategies, general=None):
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "t", "data": {"path": str(data), "max_length": 24}}],
        "strategies": strategies,
        "train": {"steps_per_task": 3, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1},
        "output": {"dir": str(out)},
    }
    if general:
        config["general_data"] = {"path": str(general), "max_length": 24}
    return finetune(load_config_dict(config))


def test_a_file_replaces_the_in_run_computation(tiny_model_dir, general_file, text_file, tmp_path):
    """The same estimator, examples and seed give the same Fisher from the file as computed in the run."""
    from retain.train.checkpoint import latest_checkpoint, load_nested

    path = _compute(tiny_model_dir, general_file, tmp_path / "f.safetensors", "ewc", "--estimator", "empirical")
    ewc = {"name": "ewc", "estimator": "empirical", "max_examples": 6, "source": "general"}
    from_file = _run(tiny_model_dir, text_file, tmp_path / "a", ["full", {**ewc, "file": str(path)}])
    in_run = _run(tiny_model_dir, text_file, tmp_path / "b", ["full", ewc], general=general_file)
    first = load_nested(latest_checkpoint(from_file.run_dir), "strategies")["ewc"]["penalties"][0]["fisher"]
    second = load_nested(latest_checkpoint(in_run.run_dir), "strategies")["ewc"]["penalties"][0]["fisher"]
    assert first.keys() == second.keys()
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-6
    # ewc-lora reads the same file (Fisher of W = Fisher of Delta W); importance files feed `importance`
    _run(tiny_model_dir, text_file, tmp_path / "c", [{"name": "lora", "r": 2}, {"name": "ewc-lora", "file": str(path), "source": "general"}])
    imp = _compute(tiny_model_dir, general_file, tmp_path / "i.safetensors", "importance")
    _run(tiny_model_dir, text_file, tmp_path / "d", ["full", {"name": "importance", "file": str(imp)}])


def test_adapter_runs_and_wrong_methods_are_refused_with_a_reason(tiny_model_dir, general_file, text_file, tmp_path):
    path = _compute(tiny_model_dir, general_file, tmp_path / "f.safetensors", "ewc")
    with pytest.raises(ImportanceFileError, match="ewc-lora"):
        _run(tiny_model_dir, text_file, tmp_path / "a", [{"name": "lora", "r": 2}, {"name": "ewc", "file": str(path)}])
    with pytest.raises(ImportanceFileError, match="holds 'ewc' statistics"):
        _run(tiny_model_dir, text_file, tmp_path / "b", ["full", {"name": "importance", "file": str(path)}])
    tensors = load_importance(path).tensors
    save_importance(tmp_path / "g.safetensors", tensors, model=tiny_model("llama", 100, seed=2, hidden=32, layers=2, heads=4),
                    method="ewc", estimator="sampled", samples=1, examples=[])
    with pytest.raises(ImportanceFileError, match="another model"):
        _run(tiny_model_dir, text_file, tmp_path / "c", ["full", {"name": "ewc", "file": str(tmp_path / "g.safetensors")}])
