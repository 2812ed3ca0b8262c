"""A training process killed with SIGKILL resumes and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import pytest
from resume_utils import assert_kill_resume_matches, final_weights, write_config
from safetensors.torch import load_file

from retain.config import load_config
from retain.errors import StateError
from retain.train import finetune


@pytest.mark.parametrize("strategies", [["full"], [{"name": "lora", "r": 4, "dropout": 0.1}]], ids=["full", "lora"])
def test_sigkill_then_resume_matches_uninterrupted(strategies, tiny_model_dir, text_file, tmp_path):
    assert_kill_resume_matches(tmp_path, tiny_model_dir, text_file, strategies, steps=60)
    if strategies == ["full"]:
        base = load_file(str(tiny_model_dir / "model.safetensors"))
        tuned = final_weights(tmp_path / "ref")
        assert max((tuned[k] - base[k]).abs().max().item() for k in base if k in tuned) > 1e-3


def test_existing_run_dir_needs_resume_flag(tiny_model_dir, text_file, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, text_file, tmp_path / "run", ["full"], 4)
    finetune(load_config(cfg))
    with pytest.raises(StateError, match="--resume"):
        finetune(load_config(cfg))


def test_resume_refuses_a_changed_config(tiny_model_dir, text_file, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, text_file, tmp_path / "run", ["full"], 4)
    finetune(load_config(cfg))
    with pytest.raises(StateError, match="config differs"):
        finetune(load_config(cfg, ["train.lr=0.5"]), resume=True)
