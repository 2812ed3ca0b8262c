"""The offline demo scenario: a pretrained tiny model forgets its general skills when fine-tuned."""

from __future__ import annotations

import json

from retain.scenarios.bench import run_bench
from retain.scenarios.synthetic import GENERAL_SKILLS, SPECIALIST_SKILLS, build_synthetic, make_examples, write_data


def test_eval_sequences_never_appear_in_training_files(tmp_path):
    paths = write_data(tmp_path)
    held = {r["prompt"] for r in make_examples(GENERAL_SKILLS, 0, 0, True) + make_examples(SPECIALIST_SKILLS, 0, 0, True)}
    for name in ("general_train", "general_pool", "specialist_train"):
        lines = [json.loads(line)["text"] for line in paths[name].read_text().splitlines()]
        assert lines and not any(line.split(">")[0] + ">" in held for line in lines), name


def test_demo_shows_forgetting_and_writes_report(tmp_path):
    scenario = build_synthetic(cache_dir=tmp_path / "cache", quick=True, pretrain_steps=120)
    results = run_bench(scenario, ["full"], out=tmp_path / "demo", progress=False)
    run = results.runs[0]
    base, after = run.records[0].scores, run.records[-1].scores
    assert after["specialist_loss"].value < base["specialist_loss"].value - 1.0  # learned the specialist skill
    assert after["general_loss"].value > base["general_loss"].value + 0.5  # and forgot general skills
    assert (tmp_path / "demo" / "report.html").is_file()
    # the pretrained base is cached: a second build reuses it
    assert build_synthetic(cache_dir=tmp_path / "cache", quick=True, pretrain_steps=120).base_model == scenario.base_model
