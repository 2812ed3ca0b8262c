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


def test_resume_refuses_keys_that_change_the_data_order_or_the_model(tiny_model_dir, text_file, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, text_file, tmp_path / "run", ["full"], 4)
    finetune(load_config(cfg))
    with pytest.raises(StateError) as raised:
        finetune(load_config(cfg, ["train.batch_size=8", "train.seed=3", "train.lr=0.5", "tasks[1].data.max_length=8"]), resume=True)
    message = str(raised.value)
    assert "3 differ" in message and "train.batch_size: 4 -> 8" in message and "train.seed: 0 -> 3" in message
    assert "tasks[1].data.max_length: 16 -> 8" in message and "train.lr" not in message  # lr alone would be accepted
    assert "train.lr" in (raised.value.hint or "")


def test_resume_keys_classification():
    from retain.train.resume import resumable

    for key in ("train.lr", "train.max_grad_norm", "train.betas[0]", "train.log_every", "train.progress", "train.trackers[0]",
                "eval.suite", "eval.every_n_steps", "checkpoint.every", "checkpoint.keep", "output.dir", "train.warmup_steps"):
        assert resumable(key), key
    for key in ("train.lrr", "train.batch_size", "train.grad_accum", "train.seed", "train.steps_per_task", "model.name_or_path",
                "tasks[0].data.path", "strategies[0].r", "general_data.path", "train.mixed_precision"):
        assert not resumable(key), key
