"""OSF (peft ``OSFConfig``): the gradient of the trainable factors is orthogonal to the frozen top
singular directions, the model starts at the base, and the exported adapter loads as trained."""

from __future__ import annotations

import json

import torch

from retain.config import load_config_dict
from retain.models.loading import load_any
from retain.strategies.osf import Osf, OsfConfig
from retain.train import finetune


def test_gradient_is_orthogonal_to_the_frozen_subspace(llama):
    from peft.tuners.osf.layer import OSFLayer

    ids = torch.tensor([[1, 5, 9, 13, 7, 3, 8, 2]])
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
    weights = {n: m.weight.detach().clone() for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear)}
    model = Osf(OsfConfig(effective_rank=0.5)).setup(llama, ctx=None)
    out = model(input_ids=ids, labels=ids)
    assert torch.allclose(out.logits, expected, atol=1e-5)  # the trainable factors start at the SVD's low part
    out.loss.backward()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, OSFLayer)}
    assert layers
    for name, layer in layers.items():
        w = weights[name.replace("base_model.model.", "")]
        u, _, vh = torch.linalg.svd(w.float(), full_matrices=False)
        k = min(w.shape) // 2  # effective_rank 0.5 of the smaller dimension stays frozen
        params = layer.osf_svd_params["default"]
        assert params["U_low"].shape[1] == min(w.shape) - k
        assert params["U_low"].grad.abs().max() > 0
        assert torch.allclose(u[:, :k].T @ params["U_low"].grad, torch.zeros(k, min(w.shape) - k), atol=1e-5)
        assert torch.allclose(params["V_low"].grad @ vh[:k].T, torch.zeros(min(w.shape) - k, k), atol=1e-5)


def test_trained_osf_exports_an_adapter_that_loads(tiny_model_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"text": f"q{i}: add {i} {i + 1} = {2 * i + 1}"}) + "\n" for i in range(16)))
    config = load_config_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "tasks": [{"name": "t1", "data": {"path": str(task), "max_length": 24}}],
        "strategies": [{"name": "osf", "effective_rank": 0.5}],
        "train": {"steps_per_task": 3, "batch_size": 4, "lr": 1e-2, "progress": False},
        "checkpoint": {"every": 0},
        "output": {"dir": str(tmp_path / "run"), "save_per_task": False},
    })
    outcome = finetune(config)
    loaded, _ = load_any(str(tmp_path / "run" / "final"))
    ids = torch.tensor([[1, 5, 9, 13, 7, 3]])
    outcome.model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, outcome.model(input_ids=ids).logits, atol=1e-5)


def test_drift_folds_the_osf_delta_into_the_weight(llama):
    """weight_rel_l2 and effective_weights read an OSF layer as base + (U_low S_low V_low - its init)."""
    from retain.eval.drift import effective_weights, snapshot_weights, weight_rel_l2

    base = snapshot_weights(llama)
    model = Osf(OsfConfig(effective_rank=0.5)).setup(llama, ctx=None)
    assert weight_rel_l2(base, model) == 0.0
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "osf_svd_params"))
    with torch.no_grad():
        layer.osf_svd_params["default"]["S_low"].mul_(2.0)  # the low part doubles
    key = name.replace("base_model.model.", "") + ".weight"
    u, s, v = (layer._osf_U_low_init["default"], layer._osf_S_low_init["default"], layer._osf_V_low_init["default"])
    assert torch.allclose(effective_weights(model)[key], base[key] + (u * s) @ v, atol=1e-5)
    assert weight_rel_l2(base, model) > 0
