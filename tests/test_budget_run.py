"""A forgetting budget in real (tiny) runs: strengths move the right way, the kept point is restored
exactly and recorded, stop/warn behave as documented, resume stays exact, and the config is refused
early when the suite cannot measure what the budget bounds."""

from __future__ import annotations

import json
import math
import shutil
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from resume_utils import final_weights, kill_after_first_checkpoint
from typer.testing import CliRunner

from retain.cli import app
from retain.config import DataConfig, TaskConfig, load_config, load_config_dict
from retain.errors import ConfigError, GateError
from retain.eval.budget import BudgetMeter, Measurement, budget_problems, capped
from retain.eval.split import SplitConfig, split_indices
from retain.eval.runner import SuiteObserver
from retain.eval.suite import SuiteConfig
from retain.eval.tasks import LossEval, NextTokenAccuracyEval
from retain.results.schema import Results
from retain.scenarios.base import Scenario
from retain.scenarios.bench import build_run_config, run_bench
from retain.strategies.registry import available_strategies, get_strategy_class
from retain.train import finetune
from retain.train.run import load_run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("budget-data")

    def write(name: str, rows: list[str]) -> Path:
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        return path

    return {
        "task": write("task", [f"contracts shall be governed by the laws of delaware #{i}" for i in range(40)]),
        "general": write("general", [f"the cat sat on the mat number {i}." for i in range(30)]),
        "general_eval": write("general_eval", [f"a dog ran in the park {i} times." for i in range(48)]),
        "task_eval": write("task_eval", [f"the licensee may not assign this agreement #{i}" for i in range(48)]),
    }


def make_suite(files: dict[str, Path], *, probes: bool = True, general: bool = True) -> SuiteConfig:
    tasks = [NextTokenAccuracyEval(name="task_acc", role="task", train_task="t1",
                                   data=DataConfig(path=str(files["task_eval"]), max_length=32))]
    if general:
        tasks.insert(0, NextTokenAccuracyEval(name="general_acc", data=DataConfig(path=str(files["general_eval"]), max_length=32)))
    return SuiteConfig(tasks=tasks, probe_prompts=["the cat sat on", "a dog ran in the park"] if probes else [])


def make_config(model_dir: Path, files: dict[str, Path], out: Path, strategies: list[Any], budget: dict[str, Any] | None,
                steps: int = 8, **extra: Any):
    data = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "t1", "data": {"path": str(files["task"]), "max_length": 32}}],
        "strategies": strategies,
        "general_data": {"path": str(files["general"]), "max_length": 32},
        "train": {"steps_per_task": steps, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 2},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out), "save_per_task": False},
        **({"budget": budget} if budget is not None else {}),
        **extra,
    }
    return load_config_dict(data)


def budgeted_run(model_dir, files, out, strategies, budget, steps: int = 8, suite: SuiteConfig | None = None):
    config = make_config(model_dir, files, out, strategies, budget, steps)
    observer = SuiteObserver(suite or make_suite(files), name="+".join(s if isinstance(s, str) else s["name"] for s in strategies),
                             run_dir=out, config=config.model_dump(mode="json"), batch_size=8)
    outcome = finetune(config, observer=observer)
    return outcome, observer.strategy_run()


# ---------------------------------------------------------------------------------------------
# config


def test_budget_needs_a_bound_and_valid_ranges(files, tmp_path):
    with pytest.raises(ConfigError, match="at least one bound"):
        make_config(tmp_path, files, tmp_path / "o", ["full"], {"check_every": 10})
    with pytest.raises(ConfigError, match="budget.check_every"):
        make_config(tmp_path, files, tmp_path / "o", ["full"], {"max_kl": 0.1, "check_every": 0})
    with pytest.raises(ConfigError, match="budget.min_general_retention"):
        make_config(tmp_path, files, tmp_path / "o", ["full"], {"min_general_retention": 1.5})
    with pytest.raises(ConfigError, match="on_exhausted"):
        make_config(tmp_path, files, tmp_path / "o", ["full"], {"max_kl": 0.1, "on_exhausted": "panic"})
    config = make_config(tmp_path, files, tmp_path / "o", ["full", "ewc"], {"min_general_retention": 0.95})
    assert config.budget.check_every == 25 and config.budget.on_exhausted == "rollback"


def test_train_refuses_a_budget_without_a_suite_before_loading_anything(files, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tmp_path / "no-such-model")},
        "tasks": [{"name": "t1", "data": {"path": str(files["task"])}}],
        "strategies": ["full", "ewc"],
        "general_data": {"path": str(files["general"])},
    }))
    with pytest.raises(ConfigError, match="set eval.suite"):
        load_run_config(run, ["budget.min_general_retention=0.95"])
    result = CliRunner().invoke(app, ["train", str(run), "--set", "budget.min_general_retention=0.95"])
    assert result.exit_code == 2 and "eval.suite" in result.output


def test_budget_problems_name_what_the_suite_lacks(files):
    budget = load_config_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": "t1", "data": {"path": "x.jsonl"}}],
                               "budget": {"min_general_retention": 0.9, "max_kl": 0.1, "max_task_forgetting": 0.05}}).budget
    loss_only = SuiteConfig(tasks=[LossEval(name="general_loss", data=DataConfig(path=str(files["general_eval"])))])
    problems = budget_problems(budget, loss_only, ["t1"], "eval.suite")
    assert any("min_general_retention" in p and "bounded general eval" in p for p in problems)
    assert any("max_kl" in p and "probe_prompts" in p for p in problems)
    assert any("max_task_forgetting" in p and "two or more tasks" in p for p in problems)
    two_tasks = budget_problems(budget, make_suite(files), ["t0", "t1"], "eval.suite")  # task_acc measures t1, the last
    assert two_tasks == [next(p for p in two_tasks if "no eval (role: task" in p)]
    assert budget_problems(budget, make_suite(files), ["t1", "t2"], "eval.suite") == []


def test_train_refuses_a_suite_that_cannot_measure_the_budget(files, tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, files, tmp_path / "run", ["full"], {"max_kl": 0.1})
    observer = SuiteObserver(make_suite(files, probes=False), name="full", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="max_kl.*probe_prompts"):
        finetune(config, observer=observer)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_budget_probe_reads_at_most_probe_examples_of_the_select_part_and_no_report_item():
    task = NextTokenAccuracyEval(name="g", data=DataConfig(path="g.jsonl"), max_examples=120)
    assert capped(task, 32) == task  # its pool stays the suite's: the cap applies inside the select part
    split = SplitConfig()
    select, report = split_indices(120, split)
    probe = task.for_part("select", split, limit=32).item_ids(120)
    assert len(probe) == 32 and set(probe) <= set(select) and not set(probe) & set(report)
    assert task.for_part("select", split, limit=500).item_ids(120) == select


# ---------------------------------------------------------------------------------------------
# strengths move the right way and reach the strategies


def test_every_declared_strength_can_be_set_at_runtime():
    for name in available_strategies():
        cls = get_strategy_class(name)
        if cls.strength is None or not cls.__module__.startswith("retain.strategies."):
            continue
        strategy = cls()
        value = math.sqrt(cls.strength.low * cls.strength.high)
        strategy.set_strength(value)
        assert getattr(strategy.config, cls.strength.key) == pytest.approx(value), name


def test_a_too_weak_strength_goes_up_and_a_too_strong_one_comes_down(files, tiny_model_dir, tmp_path):
    _, weak = budgeted_run(tiny_model_dir, files, tmp_path / "weak", ["full", {"name": "l2", "lambda_": 1e-3}],
                           {"max_kl": 1e-5, "check_every": 2})
    values = [c.strengths["l2.lambda_"] for c in weak.budget.checks]
    assert weak.budget.mode == "adaptive" and weak.budget.start == {"l2.lambda_": 1e-3}
    assert values[1] > 1e-3 and weak.budget.final["l2.lambda_"] > 1e-2  # over budget from the first check: up
    assert all(b >= a for a, b in zip(values, values[1:]))

    _, strong = budgeted_run(tiny_model_dir, files, tmp_path / "strong", ["full", {"name": "l2", "lambda_": 1e3}],
                             {"max_kl": 50.0, "check_every": 2})
    values = [c.strengths["l2.lambda_"] for c in strong.budget.checks]
    assert values[1] < 1e3 and strong.budget.final["l2.lambda_"] < 1e2  # far inside the budget: down
    assert all(c.within_budget for c in strong.budget.checks)
    # the strategy trained with the moved value: its logged penalty weight follows lambda
    rows = [json.loads(x) for x in (tmp_path / "strong" / "train_log.jsonl").read_text().splitlines()]
    logged = [r["budget/l2.lambda_"] for r in rows if "budget/l2.lambda_" in r]
    assert logged == values


def test_stm_threshold_rederives_its_masks(tiny_model_dir, files):
    from retain.data import build_task_data, ensure_pad_token
    from retain.models.loading import load_model
    from retain.stats.token_tables import TokenTable
    from retain.strategies.stm import SelectiveTokenMasking

    _, tokenizer = load_model(load_config_dict({"model": {"name_or_path": str(tiny_model_dir)},
                                                "tasks": [{"name": "t", "data": {"path": "x.jsonl"}}]}).model)
    examples = build_task_data(DataConfig(path=str(files["task"]), max_length=32), ensure_pad_token(tokenizer), seed=0).train
    ce = torch.linspace(0.0, 5.0, sum(len(e.input_ids) for e in examples))  # perplexity from 1 to e^5
    stm = SelectiveTokenMasking()
    stm._tables = {0: TokenTable({"ce": ce}, torch.tensor([len(e.input_ids) for e in examples]))}
    stm._examples = {0: examples}
    stm.set_strength(2.0)
    many = stm._counts[0][0]
    stm.set_strength(50.0)
    assert stm.config.threshold == 50.0 and 0 < stm._counts[0][0] < many  # a higher threshold masks fewer tokens


# ---------------------------------------------------------------------------------------------
# the kept point


class Scripted:
    """Stands in for ``BudgetMeter.measure``: the retention and task score of each call, in order, and a
    copy of the trainable weights measured at each step (what a rollback must restore)."""

    def __init__(self, retention: list[float], scores: list[float]) -> None:
        self.retention, self.scores, self.calls = retention, scores, 0
        self.weights: list[dict[str, torch.Tensor]] = []

    def __call__(self, meter: BudgetMeter, model: Any, tokenizer: Any, task: str, earlier: Any) -> Measurement:
        i = self.calls
        self.calls += 1
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return Measurement(general_retention=self.retention[i], task_score=self.scores[i])


def scripted(monkeypatch: pytest.MonkeyPatch, script: Scripted) -> None:
    monkeypatch.setattr(BudgetMeter, "measure", lambda meter, *args: script(meter, *args))


@pytest.mark.parametrize("wrapper", ["full", "lora"])
def test_rollback_restores_the_best_in_budget_point_exactly(wrapper, files, tiny_model_dir, tmp_path, monkeypatch):
    # checks at steps 0, 2, 4, 6, 8; in budget (>= 0.95) up to step 6; the best score in budget is step 4's
    script = Scripted([1.0, 0.99, 0.97, 0.96, 0.90], [0.1, 0.2, 0.4, 0.3, 0.5])
    scripted(monkeypatch, script)
    strategies = ["full"] if wrapper == "full" else [{"name": "lora", "r": 2, "dropout": 0.0}]
    outcome, run = budgeted_run(tiny_model_dir, files, tmp_path / "run", strategies,
                                {"min_general_retention": 0.95, "check_every": 2, "early_checks": 0})
    assert script.calls == 5
    assert run.budget.mode == "rollback baseline" and run.budget.final == {}
    decision = run.budget.tasks[0]
    assert (decision.kept_step, decision.end_step, decision.rolled_back, decision.within_budget) == (4, 8, True, True)
    assert "restored step 4" in decision.reason and "0.4000" in decision.reason
    low, high = decision.report_interval  # the kept model, chosen on select, reported on report items
    assert low <= decision.report_general_retention <= high
    model = outcome.model
    got = {n: p for n, p in model.named_parameters() if n in script.weights[2]}
    assert got.keys() == script.weights[2].keys()
    assert all(torch.equal(got[n], script.weights[2][n]) for n in got)
    exported = final_weights(tmp_path / "run")
    assert any(not torch.equal(exported[k], v) for k, v in _by_suffix(exported, script.weights[4]).items())
    assert all(torch.equal(exported[k], v) for k, v in _by_suffix(exported, script.weights[2]).items())
    kept_files = list((tmp_path / "run" / "budget").glob("kept-*")) if (tmp_path / "run" / "budget").exists() else []
    assert kept_files == []  # nothing left behind once the task is over
    saved = Results.load(_write(outcome, run, tmp_path))
    assert saved.runs[0].budget.tasks[0].kept_step == 4


def _by_suffix(exported: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The in-run weights under their exported names (peft saves adapters without the adapter's name)."""
    renamed = {n.replace(".default.", "."): w for n, w in weights.items()}
    out = {k: renamed[k].to(v.dtype) for k, v in exported.items() if k in renamed}
    assert out, "no exported tensor matched a trained weight"
    return out


def _write(outcome: Any, run: Any, tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    Results(base_model="m", runs=[run]).save(path)
    return path


def test_a_task_that_ends_within_budget_keeps_its_last_model(files, tiny_model_dir, tmp_path, monkeypatch):
    script = Scripted([1.0, 0.90, 0.97, 0.99, 0.96], [0.1, 0.9, 0.2, 0.3, 0.2])
    scripted(monkeypatch, script)
    _, run = budgeted_run(tiny_model_dir, files, tmp_path / "run", ["full"], {"min_general_retention": 0.95, "check_every": 2, "early_checks": 0})
    decision = run.budget.tasks[0]
    assert (decision.kept_step, decision.rolled_back) == (8, False) and "within budget" in decision.reason


def test_warn_keeps_the_last_model_and_says_so(files, tiny_model_dir, tmp_path, monkeypatch):
    scripted(monkeypatch, Scripted([1.0, 0.99, 0.90, 0.90, 0.90], [0.1, 0.2, 0.3, 0.4, 0.5]))
    _, run = budgeted_run(tiny_model_dir, files, tmp_path / "run", ["full"],
                          {"min_general_retention": 0.95, "check_every": 2, "early_checks": 0, "on_exhausted": "warn"})
    decision = run.budget.tasks[0]
    assert (decision.kept_step, decision.rolled_back, decision.within_budget) == (8, False, False)
    assert "on_exhausted: warn" in decision.reason


def test_stop_ends_the_run_with_the_kept_point_exported(files, tiny_model_dir, tmp_path, monkeypatch):
    script = Scripted([1.0, 0.99, 0.90, 0.90, 0.90], [0.1, 0.2, 0.3, 0.4, 0.5])
    scripted(monkeypatch, script)
    config = make_config(tiny_model_dir, files, tmp_path / "run", ["full"],
                         {"min_general_retention": 0.95, "check_every": 2, "early_checks": 0, "on_exhausted": "stop"})
    observer = SuiteObserver(make_suite(files), name="full", run_dir=tmp_path / "run", config=config.model_dump(mode="json"))
    with pytest.raises(GateError, match="budget exhausted at task 't1' step 4") as caught:
        finetune(config, observer=observer)
    assert caught.value.exit_code == 1
    assert script.calls == 3  # no check after the stop
    results = Results.load(tmp_path / "run" / "results.json")  # written before the error
    budget = results.runs[0].budget
    assert budget.stopped and budget.tasks[0].kept_step == 2 and budget.tasks[0].end_step == 4
    exported = final_weights(tmp_path / "run")
    assert all(torch.equal(exported[k], v) for k, v in _by_suffix(exported, script.weights[1]).items())


# ---------------------------------------------------------------------------------------------
# resume


def _budget_yaml(tmp_path: Path, files: dict[str, Path], model_dir: Path, out: Path, strategies: list[Any]) -> Path:
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({
        "tasks": [
            {"name": "general_acc", "type": "next_token_accuracy", "data": {"path": str(files["general_eval"]), "max_length": 32}},
            {"name": "task_acc", "type": "next_token_accuracy", "role": "task", "train_task": "first",
             "data": {"path": str(files["task_eval"]), "max_length": 32}},
        ],
        "probe_prompts": ["the cat sat on", "a dog ran in the park"],
    }))
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "first", "data": {"path": str(files["task"]), "max_length": 32}},
                  {"name": "second", "data": {"path": str(files["general"]), "max_length": 16}}],
        "strategies": strategies,
        "general_data": {"path": str(files["general"]), "max_length": 16},
        "train": {"steps_per_task": 24, "batch_size": 4, "lr": 1e-2, "progress": False, "warmup_steps": 3},
        "checkpoint": {"every": 5, "keep": 2},
        "eval": {"suite": str(tmp_path / "suite.yaml")},
        "budget": {"max_kl": 0.02, "max_task_forgetting": 0.05, "check_every": 3},
        "output": {"dir": str(out)},
    }))
    return path


@pytest.mark.slow
def test_budgeted_run_resumes_exactly_after_sigkill(files, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    strategies = ["full", {"name": "l2", "lambda_": 1e-2}, {"name": "replay", "ratio": 0.1}]
    reference = _budget_yaml(tmp_path, files, tiny_model_dir, tmp_path / "ref", strategies)
    config = load_config(reference)
    observer = SuiteObserver.from_config(config)
    finetune(config, observer=observer)
    expected_budget = observer.strategy_run().budget
    assert expected_budget.tasks and any(c.strengths["l2.lambda_"] != 1e-2 for c in expected_budget.checks)
    assert any(d.rolled_back for d in expected_budget.tasks), "the budget should bite in this run"

    killed = _budget_yaml(tmp_path, files, tiny_model_dir, tmp_path / "killed", strategies)
    kill_after_first_checkpoint(killed, tmp_path / "killed")
    result = CliRunner().invoke(app, ["train", str(killed), "--resume"])
    assert result.exit_code == 0, result.output[-3000:]
    expected, got = final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed")
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    resumed_budget = Results.load(tmp_path / "killed" / "results.json").runs[0].budget
    assert [d.kept_step for d in resumed_budget.tasks] == [d.kept_step for d in expected_budget.tasks]
    assert resumed_budget.final == pytest.approx(expected_budget.final)


def test_budgeted_lora_run_resumes_exactly_from_a_mid_task_checkpoint(files, tiny_model_dir, tmp_path):
    import shutil

    strategies = [{"name": "lora", "r": 2, "dropout": 0.0}, {"name": "ewc-lora", "lambda_": 1e3, "max_examples": 8}]
    budget = {"max_kl": 1e-3, "check_every": 2}
    ref = make_config(tiny_model_dir, files, tmp_path / "ref", strategies, budget, steps=9, checkpoint={"every": 3, "keep": 10})
    observer = SuiteObserver(make_suite(files), name="x", run_dir=tmp_path / "ref", config=ref.model_dump(mode="json"))
    finetune(ref, observer=observer)
    expected_budget = observer.strategy_run().budget
    assert expected_budget.tasks[0].rolled_back  # the kept adapter (in memory) must survive the resume
    checkpoint = sorted((tmp_path / "ref" / "checkpoints").glob("step-0000000[6]*"))[-1]
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed_dir / "checkpoints" / checkpoint.name)
    resumed = ref.model_copy(update={"output": ref.output.model_copy(update={"dir": str(resumed_dir)})})
    observer = SuiteObserver(make_suite(files), name="x", run_dir=resumed_dir, config=resumed.model_dump(mode="json"))
    finetune(resumed, observer=observer, resume=True)
    expected, got = final_weights(tmp_path / "ref"), final_weights(resumed_dir)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    assert observer.strategy_run().budget.model_dump(exclude={"seconds"}) == expected_budget.model_dump(exclude={"seconds"})


# ---------------------------------------------------------------------------------------------
# --set budget.* on train and bench


def test_set_budget_on_train_reaches_the_run_and_results(files, tiny_model_dir, tmp_path):
    path = _budget_yaml(tmp_path, files, tiny_model_dir, tmp_path / "cli", ["full", {"name": "l2", "lambda_": 0.1}])
    data = yaml.safe_load(path.read_text())
    data.pop("budget")
    data["tasks"] = data["tasks"][:1]
    data["train"]["steps_per_task"] = 4
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(path), "--set", "budget.max_kl=0.5", "--set", "budget.check_every=4"])
    assert result.exit_code == 0, result.output[-3000:]
    budget = Results.load(tmp_path / "cli" / "results.json").runs[0].budget
    assert budget.bounds == {"max_kl": 0.5} and [c.step for c in budget.checks] == [0, 1, 2, 4]  # 2 early checks
    lines = [line for line in result.output.splitlines() if line.startswith("budget: task 'first'")]
    assert len(lines) == 5, result.output[-3000:]  # one per check, then the closing decision
    assert lines[1].startswith("budget: task 'first' step 1: KL ") and "(ceiling 0.5)" in lines[1]
    assert "l2.lambda_ 0.1 -> " in lines[1] or "strengths unchanged" in lines[1]
    assert lines[-1].startswith("budget: task 'first' keeps step 4 of 4: the task ended")


def _scenario(files: dict[str, Path], model_dir: Path, suite: SuiteConfig) -> Scenario:
    return Scenario(
        name="tiny", base_model=str(model_dir), suite=suite,
        tasks=[TaskConfig(name="t1", data=DataConfig(path=str(files["task"]), max_length=32))],
        general_data=DataConfig(path=str(files["general"]), max_length=32),
        train={"batch_size": 4, "lr": 1e-2, "steps_per_task": 4},
    )


def test_set_budget_on_bench_reaches_every_item_and_is_checked_against_the_suite(files, tiny_model_dir, tmp_path):
    scenario = _scenario(files, tiny_model_dir, make_suite(files))
    config = build_run_config(scenario, "full+l2", tmp_path, steps=None, seed=0, shared={}, train_overrides={},
                              overrides=["budget.min_general_retention=0.9"], progress=False)
    assert config.budget.min_general_retention == 0.9
    no_general = _scenario(files, tiny_model_dir, make_suite(files, general=False))
    with pytest.raises(ConfigError, match="the tiny suite has no bounded general eval"):
        build_run_config(no_general, "full", tmp_path, steps=None, seed=0, shared={}, train_overrides={},
                         overrides=["budget.min_general_retention=0.9"], progress=False)
    results = run_bench(scenario, ["full", "full+l2@l2.lambda_=0.5"], out=tmp_path / "bench", progress=False,
                        sets=["budget.max_kl=0.5", "budget.check_every=2"])
    assert [r.budget.mode for r in results.runs] == ["rollback baseline", "adaptive"]
    assert results.runs[1].budget.start == {"l2.lambda_": 0.5}
    assert "Forgetting budget" in (tmp_path / "bench" / "report.html").read_text()


def test_resume_refuses_a_changed_budget(files, tmp_path):
    from retain.errors import StateError
    from retain.train.resume import check_resume_changes

    started = make_config(tmp_path, files, tmp_path / "run", ["full", "ewc"], {"min_general_retention": 0.95})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(started.model_dump(mode="json")))
    assert check_resume_changes(tmp_path / "run", started) == []
    changed = make_config(tmp_path, files, tmp_path / "run", ["full", "ewc"], {"min_general_retention": 0.9})
    with pytest.raises(StateError, match="budget.min_general_retention"):
        check_resume_changes(tmp_path / "run", changed)


def test_report_plots_the_trajectory_against_the_bound():
    from retain.report.html import render_html
    from retain.results.schema import BudgetCheck, BudgetResult, BudgetTask, StepRecord, StrategyRun
    from retain.results.summary import budget_series

    checks = [BudgetCheck(task="t1", step=s, global_step=s, general_retention=r, strengths={"ewc.lambda_": lam})
              for s, r, lam in [(0, 1.0, 1e4), (25, 0.9, 1e5), (50, 0.97, 3e4)]]
    budget = BudgetResult(mode="adaptive", bounds={"min_general_retention": 0.95}, checks=checks,
                          start={"ewc.lambda_": 1e4}, final={"ewc.lambda_": 3e4},
                          tasks=[BudgetTask(task="t1", end_step=50, kept_step=50, reason="the task ended within budget")])
    run = StrategyRun(name="full+ewc", task_names=["t1"], records=[StepRecord(index=0)], budget=budget)
    strengths, quantities = budget_series(run)
    assert strengths == [("ewc.lambda_", [0.0, 25.0, 50.0], [1e4, 1e5, 3e4])]
    (series, bound), = quantities.values()
    assert bound == 0.95 and series[0][2] == [1.0, 0.9, 0.97] and series[1] == ("kept (task end)", [50.0], [0.97])
    page = render_html(Results(base_model="m", runs=[run]))
    assert "Forgetting budget" in page and "ewc.lambda_: 1e+04 → 3e+04" in page and page.count("<svg") >= 2


def test_stop_exits_1_from_the_cli_with_results_written(files, tiny_model_dir, tmp_path, monkeypatch):
    scripted(monkeypatch, Scripted([1.0, 0.99, 0.90], [0.1, 0.2, 0.3]))
    path = _budget_yaml(tmp_path, files, tiny_model_dir, tmp_path / "stop", ["full"])
    result = CliRunner().invoke(app, ["train", str(path), "--set", "budget={min_general_retention: 0.95, check_every: 2, "
                                      "early_checks: 0, on_exhausted: stop}"])
    assert result.exit_code == 1 and "budget exhausted at task 'first' step 4" in result.output
    budget = Results.load(tmp_path / "stop" / "results.json").runs[0].budget
    assert budget.stopped and [d.kept_step for d in budget.tasks] == [2]
    assert (tmp_path / "stop" / "final").is_dir()


def test_task_kl_is_measured_on_the_tasks_own_inputs_and_bounds_a_budget(files, tiny_model_dir, tmp_path):
    """RL's Razor: KL(base || model) on the task's own inputs, in each check and in the task-end drift."""
    _, run = budgeted_run(tiny_model_dir, files, tmp_path / "run", ["full", {"name": "l2", "lambda_": 1e-3}],
                          {"max_task_kl": 1e-4, "check_every": 4, "early_checks": 0})
    kls = [c.task_kl for c in run.budget.checks]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and all(k is not None and k > 0 for k in kls[1:])  # base: no drift
    assert run.budget.bounds == {"max_task_kl": 1e-4}
    assert run.budget.checks[-1].strengths["l2.lambda_"] > 1e-3  # over the tiny ceiling: more protection
    # every trained point is over it, so the task's start is what is kept, and its drift is none
    assert run.budget.tasks[0].kept_step == 0 and run.summary.task_kl == pytest.approx(0.0, abs=1e-6)
    _, free = budgeted_run(tiny_model_dir, files, tmp_path / "free", ["full"], {"max_task_kl": 100.0, "check_every": 4})
    assert free.budget.tasks[0].kept_step == 8 and free.summary.task_kl == free.records[-1].drift.task_kl > 0


def test_a_bench_stopped_inside_a_run_resumes_that_run_exactly(files, tiny_model_dir, tmp_path):
    """``bench --resume`` after a kill: the unfinished run continues from its last checkpoint (no new rows for
    the steps it had done) and ends with the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    scenario = _scenario(files, tiny_model_dir, make_suite(files))
    sets = ["checkpoint.every=2", "train.log_every=1", "checkpoint.keep=5"]
    run_bench(scenario, ["full"], out=tmp_path / "bench", progress=False, sets=sets)
    run_dir = tmp_path / "bench" / "runs" / "full"
    whole = load_file(next((run_dir / "final").glob("*.safetensors")))
    # what a kill after step 2 leaves: the step-2 checkpoint, the log of steps 1-2, no results
    for later in sorted((run_dir / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    log = (run_dir / "train_log.jsonl").read_text().splitlines()
    kept = [json.dumps({**json.loads(line), "written_before_the_kill": True}) for line in log[:2]]
    (run_dir / "train_log.jsonl").write_text("\n".join(kept) + "\n")
    for name in ("results.json", "final"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_bench(scenario, ["full"], out=tmp_path / "bench", progress=False, sets=sets, resume=True)
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # steps 3 and 4 were trained once, after the resume
    assert [r.get("written_before_the_kill", False) for r in rows] == [True, True, False, False]  # not trained again
    resumed = load_file(next((run_dir / "final").glob("*.safetensors")))
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
