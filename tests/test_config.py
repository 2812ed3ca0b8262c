"""Config loading: unknown keys named with the closest valid one, --set overrides, YAML errors with a line."""

from __future__ import annotations

import pytest
import yaml

from retain.config import apply_overrides, load_config, load_config_dict, parse_override
from retain.errors import ConfigError
from retain.strategies.registry import validate_run_config

BASE = {
    "model": {"name_or_path": "some/model"},
    "tasks": [{"name": "contracts", "data": {"path": "train.jsonl"}}],
}


def test_defaults_and_strategy_shorthands():
    config = load_config_dict({**BASE, "strategies": "lora"})
    assert [s.name for s in config.strategies] == ["lora"]
    assert config.train.steps_per_task == 100
    assert [s.name for s in load_config_dict(BASE).strategies] == ["full"]


def test_unknown_key_named_with_closest_valid_name():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*") as err:
        load_config_dict({**BASE, "train": {"learning_rat": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'; did you mean 'lr'"):
        load_config_dict({**BASE, "train": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\[0\].data.max_len'; did you mean 'max_length'"):
        load_config_dict({**BASE, "tasks": [{"name": "a", "data": {"path": "x", "max_len": 4}}]})
    assert "valid keys here" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'train.batch_size'"):
        load_config_dict({**BASE, "train": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config_dict({"tasks": BASE["tasks"]})


def test_overrides_parse_values_and_paths():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("strategies[0].r=16") == (["strategies", 0, "r"], 16)
    assert parse_override("output.merge=true") == (["output", "merge"], True)
    data = apply_overrides({"strategies": [{"name": "lora"}]}, ["strategies.0.r=4", "train.seed=3"])
    assert data == {"strategies": [{"name": "lora", "r": 4}], "train": {"seed": 3}}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")


def test_override_applies_to_shorthand_strategy_and_is_validated():
    config = load_config_dict({**BASE, "strategies": ["lora"]}, ["strategies[0].r=4"])
    assert config.strategies[0].params == {"r": 4}
    config = load_config_dict({**BASE, "strategies": ["lora"]}, ["strategies[0].rank=4"])  # structure is valid
    with pytest.raises(ConfigError, match=r"strategies\[0\].rank"):
        validate_run_config(config)  # the strategy's own keys are checked against its Config


def test_yaml_error_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: x\ntasks: [\n  - bad\n")
    with pytest.raises(ConfigError, match=r"run.yaml line \d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_duplicate_task_names_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tasks": BASE["tasks"] * 2}))
    with pytest.raises(ConfigError, match="task names must be unique"):
        load_config(path)


def test_every_yaml_retain_reads_refuses_a_repeated_key(tmp_path):
    """Two train: blocks: the second silently won (batch 2 -> 8). The bench --config, a run's recorded
    config and the run YAML share the loader; a << merge may still override what it brings in."""
    from retain.config import read_yaml
    from retain.scenarios.bench import read_bench_config

    bench = tmp_path / "bench.yaml"
    bench.write_text("strategies: {ewc: {lambda_: 1}}\ntrain: {lr: 0.1}\nstrategies: {ewc: {lambda_: 2}}\n")
    with pytest.raises(ConfigError, match=r"bench.yaml: key 'strategies' appears twice \(lines 1 and 3\)"):
        read_bench_config(bench)
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {lr: 1, seed: 2}\ntrain:\n  <<: *b\n  lr: 3\n")
    assert read_yaml(merged, "run YAML")["train"] == {"lr": 3, "seed": 2}
