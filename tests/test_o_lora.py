"""O-LoRA: the orthogonality term by hand, earlier adapters frozen bit for bit, inference = sum of all
adapters, the term does its job, and resume rebuilds the adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retain.config import load_config_dict
from retain.losses.subspace import l2_norm_penalty, orthogonality, orthogonality_penalty
from retain.train import finetune


def test_orthogonality_term_by_hand():
    a_past = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a_new = torch.tensor([[1.0, 1.0]])
    # A_past A_new^T = [[1], [1]] -> 2
    assert orthogonality(a_past, a_new).item() == 2.0
    second = (torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [-2.0, 1.0]]))
    # [1*3 + 2*(-1), 1*(-2) + 2*1] = [1, 0] -> 1
    assert orthogonality(*second).item() == 1.0
    assert orthogonality_penalty([(a_past, a_new), second]).item() == 3.0
    assert orthogonality(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])).item() == 0.0  # orthogonal rows
    assert l2_norm_penalty([torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 0.0])]).item() == 6.0  # norms, not squares
    with pytest.raises(ValueError):
        orthogonality(torch.ones(1, 2), torch.ones(1, 3))


def test_penalty_gradient_reaches_only_the_new_adapter():
    a_past = torch.tensor([[1.0, -2.0]], requires_grad=False)
    a_new = torch.tensor([[0.5, 1.0], [2.0, 0.0]], requires_grad=True)
    orthogonality_penalty([(a_past, a_new)]).backward()
    # d/dA_new sum_j |a_past . a_new_j| = sign(a_past . a_new_j) * a_past
    assert torch.equal(a_new.grad, torch.tensor([[-1.0, 2.0], [1.0, -2.0]]))


def two_task_config(model_dir: Path, text_file: Path, pc_file: Path, out: Path, strategy: dict, steps: int = 6, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [
            {"name": "first", "data": {"path": str(text_file), "max_length": 24}},
            {"name": "second", "data": {"path": str(pc_file), "max_length": 24}},
        ],
        "strategies": [strategy],
        "train": {"steps_per_task": steps, "batch_size": 4, "lr": 1e-2, "progress": False, "warmup_steps": 1, **train},
        "checkpoint": {"every": 4, "keep": 100},
        "output": {"dir": str(out)},
    }


def adapter(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    folder = run_dir / which
    return load_file(str(folder / "adapter_model.safetensors"))


def resumed_matches_reference(tmp_path: Path, config: dict, name: str) -> list[str]:
    """Resume in-process from every checkpoint of a finished run; each must end with its final weights."""
    reference = Path(config["output"]["dir"])
    expected = adapter(reference, "final")
    resumed_from = []
    for checkpoint in sorted((reference / "checkpoints").glob("step-*")):
        run_dir = tmp_path / f"{name}-{checkpoint.name}"
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)  # the fingerprint names output.dir
        finetune(load_config_dict({**config, "output": {"dir": str(run_dir)}}), resume=True)
        got = adapter(run_dir, "final")
        assert got.keys() == expected.keys()
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-6, f"resumed from {checkpoint.name}: weights differ by {worst}"
        resumed_from.append(json.loads((checkpoint / "meta.json").read_text())["position"])
    return resumed_from


@pytest.fixture(scope="module")
def olora_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("olora")
    text_file, pc_file = folder / "text.jsonl", folder / "pc.jsonl"
    text_file.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}."}) + "\n" for i in range(30)))
    pc_file.write_text("".join(json.dumps({"prompt": f"q{i}: add {i} {i + 1} =", "completion": f" {2 * i + 1}"}) + "\n" for i in range(30)))
    strategy = {"name": "o-lora", "r": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    config = two_task_config(tiny_model_dir, text_file, pc_file, folder / "run", strategy)
    outcome = finetune(load_config_dict(config))
    return outcome, config, folder


def test_earlier_adapter_is_frozen_bit_for_bit_and_stacked(olora_run):
    outcome, config, folder = olora_run
    run_dir = folder / "run"
    first, final = adapter(run_dir, "tasks/00-first"), adapter(run_dir, "tasks/01-second")
    assert final.keys() == first.keys() and final.keys() == adapter(run_dir, "final").keys()
    for key, value in first.items():
        if "lora_A" in key:
            assert final[key].shape == (4, value.shape[1])
            assert torch.equal(final[key][:2], value)
            assert not torch.equal(final[key][2:], torch.zeros_like(value))
        else:
            assert final[key].shape == (value.shape[0], 4)
            assert torch.equal(final[key][:, :2], value)
            assert final[key][:, 2:].abs().max() > 0  # the second task's adapter learned
    saved = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8  # per-task scaling alpha/r = 4/2 kept at rank 4
    assert outcome.task_stats[1].loss_terms["o-lora/orthogonality"] > 0
    assert "o-lora/orthogonality" not in outcome.task_stats[0].loss_terms


def test_inference_is_the_sum_of_every_task_adapter_without_task_id(olora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome, _, folder = olora_run
    final = adapter(folder / "run", "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, module in expected.named_modules():
            prefix = f"base_model.model.{name}."
            if prefix + "lora_A.weight" in final:
                a, b = final[prefix + "lora_A.weight"], final[prefix + "lora_B.weight"]
                task_sum = b[:, :2] @ a[:2] + b[:, 2:] @ a[2:]  # first task's update + second task's
                module.weight += 2.0 * task_sum  # scaling alpha / r = 4 / 2
    ids = torch.randint(4, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    model = outcome.model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert (got - expected(input_ids=ids).logits).abs().max() <= 1e-5
        assert (got - base(input_ids=ids).logits).abs().max() > 1e-4
        reloaded = PeftModel.from_pretrained(base, folder / "run" / "final").eval()
        assert (got - reloaded(input_ids=ids).logits).abs().max() <= 1e-6


def test_resume_rebuilds_the_adapters_exactly(olora_run, tmp_path):
    _, config, _ = olora_run
    positions = resumed_matches_reference(tmp_path, config, "olora")
    assert {(p["task_index"], p["task_started"]) for p in positions} >= {(1, False), (1, True)}


def test_orthogonality_weight_keeps_the_new_adapter_out_of_the_old_subspace(olora_run, tmp_path):
    _, config, folder = olora_run

    def overlap(lambda1: float) -> float:
        run_config = {**config, "strategies": [{**config["strategies"][0], "lambda1": lambda1}]}
        run_config["output"] = {"dir": str(tmp_path / f"lambda{lambda1}")}
        run_config["checkpoint"] = {"every": 0}
        finetune(load_config_dict(run_config))
        final = adapter(tmp_path / f"lambda{lambda1}", "final")
        pairs = [(v[:2], v[2:]) for k, v in final.items() if "lora_A" in k]
        return orthogonality_penalty(pairs).item()

    assert overlap(50.0) < 0.5 * overlap(0.0)
