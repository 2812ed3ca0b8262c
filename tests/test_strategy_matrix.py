"""One row per registered strategy (as PEFT's TEST_CASES): every strategy builds, trains, checkpoints,
round-trips its state and resumes exactly, and runs beside ``lora`` where it declares it can.

Each row carries the minimal config its strategy needs (general text, a second task). For every row:

- the config validates (``validate_run_config``), with the strategy's requirements met;
- three steps per task through the real loop on a tiny Llama, every logged loss finite;
- ``state_dict()`` of the trained strategies survives ``save_nested``/``load_nested`` unchanged, and
  ``load_state_dict`` followed by ``state_dict`` gives back the checkpointed state;
- a run resumed from its last mid-task checkpoint (the directory a kill leaves) ends with the
  uninterrupted run's weights and logs the same losses after the resume point;
- in a hybrid with ``lora`` it trains with the base weights untouched (or moved, for a strategy that
  merges into them), or, for a strategy that wraps the model itself, the pair is refused.

A real SIGKILL of a ``python -m retain train`` subprocess costs two interpreter starts (~4 s each on a
busy 2-core machine), so it is checked for one hybrid per family rather than per strategy: ``full``
with the weight regularizers, function-preserving terms, replay and sample weights (``ewc``, ``importance``,
``l2``, ``fip``, ``stm``, ``replay``, ``flow``, ``wise``) and ``lora`` with ``ewc-lora``, ``lwf``, ``synthetic-replay``
and ``dft`` (dft and flow refuse each other). The
other wrappers (``freeze``, ``prompt-tuning``, ``o-lora``, ``progressive-prompts``) are covered by the
in-process resume above, which restarts from exactly the files a kill leaves behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_utils import assert_kill_resume_matches, final_weights

from retain.config import RunConfig, load_config_dict
from retain.data import build_task_data, collate
from retain.errors import ConfigError
from retain.strategies import Hybrid, StrategyContext, TaskInfo
from retain.strategies.registry import available_strategies, get_strategy_class, validate_run_config
from retain.train import finetune
from retain.train.checkpoint import load_checkpoint, load_nested, save_nested

REPO = Path(__file__).resolve().parents[1]
LORA = {"name": "lora", "r": 2, "dropout": 0.0}
STEPS = 3


@dataclass(frozen=True)
class Row:
    """A strategy's minimal run: the strategy list (with the wrapper it needs), tasks, general text."""

    strategies: list[Any]
    tasks: int = 1
    general: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


ROWS: dict[str, Row] = {
    "full": Row(["full"]),
    "lora": Row([LORA]),
    "lora@pissa": Row([{**LORA, "init": "pissa"}]),
    "lora@milora": Row([{**LORA, "init": "milora"}]),
    "lora@corda": Row([{**LORA, "init": "corda", "calibration_examples": 4}], general=True),
    "freeze": Row([{"name": "freeze", "top_layers": 1}]),
    "block-expansion": Row([{"name": "block-expansion", "new_blocks": 2}], tasks=2),
    "osf": Row([{"name": "osf", "effective_rank": 0.5}], tasks=2),
    "prompt-tuning": Row([{"name": "prompt-tuning", "num_virtual_tokens": 3}]),
    "o-lora": Row([{"name": "o-lora", "r": 2, "dropout": 0.0}], tasks=2),
    "progressive-prompts": Row([{"name": "progressive-prompts", "num_virtual_tokens": 3}], tasks=2),
    "ewc": Row(["full", {"name": "ewc", "max_examples": 8, "lambda_": 50.0}], tasks=2, general=True),
    "ewc-lora": Row([LORA, {"name": "ewc-lora", "lambda_": 1e3, "max_examples": 8}], tasks=2, general=True),
    "importance": Row(["full", {"name": "importance", "source": "general+training", "max_examples": 8}], tasks=2, general=True),
    "l2": Row(["full", {"name": "l2", "lambda_": 0.1}]),
    "mofo": Row(["full", {"name": "mofo", "fraction": 0.1}]),
    "lwf": Row(["full", {"name": "lwf", "anchor": "general", "anchor_batch_size": 2}], general=True),
    "lwf@replay": Row(["full", {"name": "replay", "ratio": 0.25, "mode": "append"}, {"name": "lwf", "anchor": "replay"}],
                      general=True),
    "fip": Row(
        ["full", {"name": "fip", "pool_size": 8, "pool_batch": 2, "anchor": "path", "reanchor_every": 2, "max_step_norm": 1.0}],
        general=True,
    ),
    "stm": Row(["full", {"name": "stm", "threshold": 100.0}]),
    "flow": Row(["full", {"name": "stm", "threshold": 100.0}, "flow"], tasks=2),
    "dft": Row(["full", {"name": "replay", "ratio": 0.25}, {"name": "dft", "lambda_": 0.5}], tasks=2),
    "replay": Row(["full", {"name": "replay", "ratio": 0.25}], tasks=2),
    "wise": Row(["full", {"name": "wise", "alpha": 0.5}], tasks=2),
    "synthetic-replay": Row(
        ["full", {"name": "synthetic-replay", "prompts": ["the cat"], "per_source": 4, "max_new_tokens": 8,
                  "ratio": 0.25, "select": "first", "demonstrations_from_data": 0}]
    ),
}


def strategy_of(key: str) -> str:
    """The strategy a row tests: its key, or the part before ``@`` (``lwf@replay``: a second setting of a
    strategy with a code path of its own)."""
    return key.split("@", 1)[0]


def package_strategies() -> list[str]:
    """Registered strategies whose class lives in the retain.strategies package (not test doubles)."""
    return [n for n in available_strategies() if get_strategy_class(n).__module__.startswith("retain.strategies.")]


def subject(name: str, row: Row) -> dict[str, Any]:
    """The row's entry for the strategy under test."""
    specs = [s if isinstance(s, dict) else {"name": s} for s in row.strategies]
    return next(s for s in specs if s["name"] == name)


def with_lora(name: str, row: Row) -> list[Any]:
    """The row's strategies with lora as the wrapper: lora beside a wrapper subject, else in place of full."""
    if any(isinstance(s, dict) and s["name"] == "lora" for s in row.strategies):
        return row.strategies
    if get_strategy_class(name).wraps_model:
        return [LORA, subject(name, row)]
    return [LORA, *[s for s in row.strategies if s != "full"]]


def lora_compatible(name: str) -> bool:
    """Declared to combine with lora: not a wrapper, or a wrapper either side names as compatible."""
    cls, lora = get_strategy_class(name), get_strategy_class("lora")
    return name == "lora" or not cls.wraps_model or name in lora.compatible_with or "lora" in cls.compatible_with


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix-data")
    task, general = root / "task.jsonl", root / "general.jsonl"
    task.write_text("".join(json.dumps({"text": f"q{i}: add {i} {i + 1} = {2 * i + 1}"}) + "\n" for i in range(24)))
    general.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}."}) + "\n" for i in range(24)))
    return {"task": task, "general": general}


def make_config(model_dir: Path, files: dict[str, Path], out: Path, row: Row, strategies: list[Any] | None = None,
                train: dict[str, Any] | None = None) -> RunConfig:
    tasks = [{"name": f"t{i}", "data": {"path": str(files["task"]), "max_length": 24 - 8 * i}} for i in range(row.tasks)]
    data: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": tasks,
        "strategies": strategies if strategies is not None else row.strategies,
        "train": {"steps_per_task": STEPS, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1, "warmup_steps": 1,
                  **(train or {})},
        "checkpoint": {"every": 2, "keep": 10},
        "output": {"dir": str(out), "save_per_task": False},
        **row.extra,
    }
    if row.general:
        data["general_data"] = {"path": str(files["general"]), "max_length": 16}
    return load_config_dict(data)


def log_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def losses(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k == "loss" or k.startswith("loss/")}


def context(config: RunConfig, model_dir: Path, run_dir: Path):
    """A StrategyContext as the loop builds one, on a freshly loaded base model."""
    from accelerate import Accelerator

    from retain.data import ensure_pad_token
    from retain.models.loading import load_model

    model, tokenizer = load_model(config.model)
    tokenizer = ensure_pad_token(tokenizer)
    tasks = [
        TaskInfo(index=i, name=t.name, steps=config.steps_for(t), data=build_task_data(t.data, tokenizer, seed=config.train.seed))
        for i, t in enumerate(config.tasks)
    ]
    return StrategyContext(
        config=config, accelerator=Accelerator(cpu=True), tokenizer=tokenizer, model=model, tasks=tasks,
        run_dir=run_dir, cache_dir=run_dir / "cache", collate=lambda examples: collate(examples, tokenizer.pad_token_id),
    )


def assert_same(expected: Any, got: Any, where: str = "state") -> None:
    """Nested equality: same keys, same types, tensors equal in value, dtype and shape."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert expected.dtype == got.dtype and expected.shape == got.shape, where
        assert torch.equal(expected.cpu(), got.cpu()), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and set(map(str, expected)) == set(map(str, got)), where
        by_name = {str(k): v for k, v in got.items()}
        for key, value in expected.items():
            assert_same(value, by_name[str(key)], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert expected == got or (isinstance(expected, float) and math.isnan(expected) and math.isnan(got)), where


def mid_task_checkpoint(run_dir: Path) -> Path:
    """The last checkpoint taken inside a task (what a kill during the last task leaves)."""
    inside = []
    for path in sorted((run_dir / "checkpoints").glob("step-*")):
        position = json.loads((path / "meta.json").read_text())["position"]
        if position["task_started"]:
            inside.append(path)
    assert inside, "no mid-task checkpoint was written"
    return inside[-1]


# ---------------------------------------------------------------------------------------------


def test_every_registered_strategy_has_a_row():
    tested = {strategy_of(key) for key in ROWS}
    missing = sorted(set(package_strategies()) - tested)
    assert not missing, f"strategies without a row in the matrix: {missing}; add one to ROWS"
    assert not tested - set(package_strategies()), "a row names a strategy that is not registered"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_row_builds_with_its_requirements_met(name, files, tmp_path):
    row = ROWS[name]
    strategies = validate_run_config(make_config(tmp_path / "no-model", files, tmp_path / "run", row))
    assert strategy_of(name) in [s.name for s in strategies]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_row_trains_round_trips_its_state_and_resumes(name, files, tiny_model_dir, tmp_path):
    row = ROWS[name]
    reference_dir = tmp_path / "ref"
    config = make_config(tiny_model_dir, files, reference_dir, row)
    finetune(config)

    rows = log_rows(reference_dir)
    assert len(rows) == STEPS * row.tasks
    for entry in rows:
        assert all(math.isfinite(v) for v in losses(entry).values()), entry

    # state_dict() -> safetensors -> the same state; load_state_dict(state_dict()) is the identity
    checkpoint = mid_task_checkpoint(reference_dir)
    saved = load_checkpoint(checkpoint).strategies
    ctx = context(config, tiny_model_dir, tmp_path / "ctx")
    hybrid = Hybrid(validate_run_config(config))
    ctx.model = hybrid.setup(ctx.model, ctx)
    hybrid.load_state_dict(saved, ctx)
    state = hybrid.state_dict()
    save_nested(state, tmp_path, "roundtrip")
    assert_same(state, load_nested(tmp_path, "roundtrip"))
    assert_same(saved, state)

    assert_resumes_exactly(name, config, reference_dir, checkpoint, tmp_path / "resumed")


def assert_resumes_exactly(name: str, config: RunConfig, reference_dir: Path, checkpoint: Path, resumed_dir: Path) -> None:
    """The directory a kill leaves (``checkpoint`` only), resumed, ends where the reference run ended."""
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed_dir / "checkpoints" / checkpoint.name)
    finetune(config.model_copy(update={"output": config.output.model_copy(update={"dir": str(resumed_dir)})}), resume=True)
    expected, got = final_weights(reference_dir), final_weights(resumed_dir)
    assert expected.keys() == got.keys()
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"{name}: resumed weights differ by {worst}"
    after, rows = log_rows(resumed_dir), log_rows(reference_dir)
    assert [losses(r) for r in after] == [losses(r) for r in rows[-len(after):]]


WRAPPER_ROWS = sorted(key for key in ROWS if get_strategy_class(strategy_of(key)).wraps_model)


@pytest.mark.parametrize("name", WRAPPER_ROWS)
def test_wrapper_row_trains_and_resumes_under_mofo(name, files, tiny_model_dir, tmp_path):
    """``train.optimizer: mofo`` works whatever decides which weights train, and its state resumes exactly."""
    row = ROWS[name]
    reference_dir = tmp_path / "ref"
    config = make_config(tiny_model_dir, files, reference_dir, row, train={"optimizer": "mofo", "mofo_fraction": 0.1})
    finetune(config)
    assert all(math.isfinite(v) for r in log_rows(reference_dir) for v in losses(r).values())
    assert_resumes_exactly(name, config, reference_dir, mid_task_checkpoint(reference_dir), tmp_path / "resumed")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_row_in_a_hybrid_with_lora(name, files, tiny_model_dir, tmp_path):
    row, name = ROWS[name], strategy_of(name)
    strategies = with_lora(name, row)
    config = make_config(tiny_model_dir, files, tmp_path / "run", row, strategies)
    if not lora_compatible(name):
        with pytest.raises(ConfigError, match="both decide which parameters train"):
            validate_run_config(config)
        return
    outcome = finetune(config)
    assert all(math.isfinite(v) for r in log_rows(tmp_path / "run") for v in losses(r).values())
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    tuned = outcome.model.get_base_model().state_dict()
    moved = max(
        (tuned[k] - base[k.replace(".base_layer", "")]).abs().max().item() for k in tuned if "lora_" not in k
    )
    merges = any(s.modifies_frozen_weights for s in validate_run_config(config))  # lora's residual inits too
    assert (moved > 0) if merges else (moved == 0), f"{name}: base weights moved by {moved} beside lora"


# ---------------------------------------------------------------------------------------------
# SIGKILL of a real training process, one hybrid per family (see the module docstring)


KILL_HYBRIDS = {
    "full-family": [
        "full",
        {"name": "ewc", "max_examples": 8, "lambda_": 50.0},
        {"name": "importance", "source": "general+training", "max_examples": 8},
        {"name": "l2", "lambda_": 0.1},
        {"name": "fip", "pool_size": 8, "pool_batch": 2, "anchor": "path", "reanchor_every": 4},
        {"name": "stm", "threshold": 100.0},
        {"name": "replay", "ratio": 0.25},
        "flow",
        {"name": "mofo", "fraction": 0.5},  # its momentum ranks must resume exactly too
        {"name": "wise", "alpha": 0.75},
    ],
    "lora-family": [
        {"name": "lora", "r": 2, "dropout": 0.1},
        {"name": "ewc-lora", "lambda_": 1e3, "max_examples": 8},
        {"name": "lwf", "anchor": "general", "anchor_batch_size": 2},
        {"name": "synthetic-replay", "prompts": ["the cat"], "per_source": 4, "max_new_tokens": 8, "ratio": 0.25, "select": "first",
         "demonstrations_from_data": 0},
        "dft",
    ],
}


def test_kill_hybrids_cover_every_non_wrapper_strategy():
    covered = {s["name"] if isinstance(s, dict) else s for hybrid in KILL_HYBRIDS.values() for s in hybrid}
    non_wrappers = {n for n in package_strategies() if not get_strategy_class(n).wraps_model}
    assert non_wrappers <= covered, sorted(non_wrappers - covered)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(KILL_HYBRIDS))
def test_family_hybrid_resumes_exactly_after_sigkill(family, files, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    assert_kill_resume_matches(
        tmp_path, tiny_model_dir, files["task"], KILL_HYBRIDS[family], steps=12,
        general_data={"path": str(files["general"]), "max_length": 16},
    )
