"""The offline demo scenario: a pretrained tiny model forgets its general skills when fine-tuned."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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



README = Path(__file__).resolve().parents[1] / "README.md"
# the README's sentence: general before -> after for full/lora, then replay and lwf; specialist likewise
_FIGURES = re.compile(
    r"\(exact match ([\d.]+) → ([\d.]+)\) while replay and distillation keep most of them \(([\d.]+) → ([\d.]+) and "
    r"([\d.]+)\) and\s+still learn the specialist skill \(([\d.]+) → ([\d.]+) and ([\d.]+); `full` reaches ([\d.]+), "
    r"`lora` ([\d.]+)\)"
)


@pytest.mark.slow
def test_the_readme_demo_figures_reproduce_on_another_thread_count(tmp_path):
    """The README's figures (written from a run with OMP_NUM_THREADS=1) from a real ``retain demo`` on two
    threads: the demo computes on one thread whatever the machine allows. About 40 s on two cores."""
    match = _FIGURES.search(" ".join(README.read_text(encoding="utf-8").split()))
    assert match, "the README's demo sentence changed: update the pattern here"
    general_before, general_lost, kept_before, replay_general, lwf_general, specialist_before, replay_specialist, \
        lwf_specialist, full_specialist, lora_specialist = (float(v) for v in match.groups())
    assert kept_before == general_before
    env = {**os.environ, "PYTHONPATH": str(README.parent), "OMP_NUM_THREADS": "2", "RETAIN_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "retain", "demo", "--out", str(tmp_path / "demo")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {run["name"].split("@")[0]: run for run in json.loads((tmp_path / "demo" / "results.json").read_text())["runs"]}

    def score(name: str, record: int, key: str) -> float:
        return round(runs[name]["records"][record]["scores"][key]["value"], 2)

    assert {score(name, 0, "general_exact") for name in runs} == {general_before}
    assert {score(name, 0, "specialist_exact") for name in runs} == {specialist_before}
    assert (score("full", -1, "general_exact"), score("lora", -1, "general_exact")) == (general_lost, general_lost)
    assert (score("full+replay", -1, "general_exact"), score("full+lwf", -1, "general_exact")) == (replay_general, lwf_general)
    assert [score(n, -1, "specialist_exact") for n in ("full+replay", "full+lwf", "full", "lora")] == [
        replay_specialist, lwf_specialist, full_specialist, lora_specialist]
