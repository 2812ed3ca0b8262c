"""``retain tune``: pruning and selection rules by hand, a tiny search end to end, resume after a kill,
the ladder, and best.yaml as a loadable run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from retain.cli import app
from retain.data.sampling import Stream, derive_seed
from retain.errors import ConfigError, OutputError, StateError
from retain.guide.catalogue import find_hybrid
from retain.guide.evidence import Evidence, EvidenceRow
from retain.guide.monitor import dominated, intermediate_suite, point_from_scores, prune_reason
from retain.guide.rules import Constraints
from retain.guide.target import load_target
from retain.guide.tune import TuneOptions, Tuner, check_folder, ladder_next, pick_hybrids, promising_first
from retain.guide.tune_report import CONFIRM_BAND, TrialRecord, choose_best, confirm_band, confirm_candidates, front
from retain.results.schema import Score
from retain.train.run import load_run_config

runner = CliRunner()


# --- rules by hand -------------------------------------------------------------------------------


def _rec(n, hybrid="lora", new=0.5, ret=0.9, state="complete", dup=None):
    return TrialRecord(number=n, state=state, hybrid=hybrid, label=hybrid.split("@")[0],
                       new_task_score=new, general_retention=ret, duplicate_of=dup)


def test_no_trial_is_cut_for_its_retention_alone():
    """full+replay's own step-20 point on stories-contracts (0.809 retention; 0.905 after 300 steps)
    under a 0.9 floor. Under optuna's median rule on a floor-penalized value it was cut; now finished
    trials that beat it on one score only do not stop it, one that beats it on both does."""
    replay = (0.40, 0.809)
    new_task_only = [(0.45, 0.80), (0.50, 0.75), (0.48, 0.79), (0.55, 0.70)]
    keep_the_floor = [(0.30, 0.95), (0.35, 0.93), (0.38, 0.92)]  # above the floor, less new task
    for others in (new_task_only, keep_the_floor, new_task_only + keep_the_floor):
        assert prune_reason(replay, others, 0.9) is None
        assert prune_reason(replay, others, None) is None
    assert "beaten on both scores" in prune_reason(replay, new_task_only + [(0.42, 0.83)], 0.9)
    assert "beaten on both scores" in prune_reason(replay, [(0.42, 0.83)], None)


def test_the_median_rule_only_compares_trials_that_keep_the_floor():
    keeping = [(0.50, 0.915), (0.45, 0.93), (0.40, 0.92)]
    point = (0.42, 0.925)  # keeps 0.9; no finished trial beats it on both scores
    assert "below the median 0.450 of the 3 finished trials" in prune_reason(point, keeping, 0.9)
    assert prune_reason((0.46, 0.925), keeping, 0.9) is None  # above their median
    assert prune_reason(point, keeping[:2] + [(0.9, 0.5)], 0.9) is None  # only 2 kept it: no median
    assert prune_reason(point, keeping, None) is None  # no floor: dominance only
    assert prune_reason((0.42, 0.899), [(0.50, 0.905), (0.45, 0.905), (0.44, 0.905)], 0.9) is None  # misses the floor: no median rule


def test_dominated_needs_a_margin_on_both_scores():
    assert dominated((0.3, 0.8), [(0.32, 0.85)])
    assert not dominated((0.3, 0.8), [(0.305, 0.95)])  # better on retention only by the margin
    assert not dominated((0.3, 0.8), [(0.5, 0.79)])


def test_choose_best_within_the_floor_else_the_most_retention():
    records = [_rec(0, new=0.6, ret=0.5), _rec(1, new=0.4, ret=0.92), _rec(2, new=0.45, ret=0.91),
               _rec(3, new=0.9, ret=0.95, state="pruned"), _rec(4, new=0.45, ret=0.91, dup=2)]
    best, kept = choose_best(records, 0.9)
    assert (best.number, kept) == (2, True)
    best, kept = choose_best(records, 0.99)
    assert (best.number, kept) == (1, False)
    assert [r.number for r in front(records)] == [1, 2, 0]  # pruned and repeated trials are not on it


def test_confirm_candidates_spread_along_the_front_that_keeps_the_floor():
    records = [_rec(0, new=0.6, ret=0.95), _rec(1, new=0.5, ret=0.97), _rec(2, new=0.4, ret=0.99),
               _rec(3, new=0.7, ret=0.5), _rec(4, new=0.3, ret=0.92), _rec(5, new=0.55, ret=0.96)]
    # front of those keeping 0.9, best new task first: 0, 5, 1, 2 (4 is dominated)
    assert [r.number for r in confirm_candidates(records, 0.9, 2)] == [0, 2]
    assert [r.number for r in confirm_candidates(records, 0.9, 3)] == [0, 1, 2]
    assert [r.number for r in confirm_candidates(records, 0.9, 1)] == [2]  # the safest
    assert [r.number for r in confirm_candidates(records, 0.9, 9)] == [0, 5, 1, 2]
    assert [r.number for r in confirm_candidates(records, 0.999, 2, band=0.0)] == [2, 1]  # none keeps it: most retentive
    assert confirm_candidates(records, 0.9, 0) == []


def test_trials_at_the_full_budget_confirm_only_those_that_keep_the_floor():
    """A trial that already ran the full budget has the full run's retention: one under the floor must not
    take a confirmation from the best trial that keeps it (a 24-trial tune at 300 steps confirmed the
    just-under end and the most retentive end, never its best trial above the floor)."""
    assert confirm_band(300, 300) == 0.0 and confirm_band(40, 300) == CONFIRM_BAND
    records = [_rec(1, new=0.55, ret=0.968), _rec(23, new=0.40, ret=0.981), _rec(19, new=0.36, ret=0.983),
               _rec(10, new=0.20, ret=0.9996)]
    assert [r.number for r in confirm_candidates(records, 0.98, 2, confirm_band(300, 300))] == [23, 10]
    assert [r.number for r in confirm_candidates(records, 0.98, 2, confirm_band(40, 300))] == [1, 10]


def test_a_short_trial_just_under_the_floor_is_still_confirmed():
    """Protected runs recover retention later (full+replay: 0.809 at step 20, 0.905 at 300 steps), so a
    trial within the band below the floor is retrained at the full budget; one far below is not."""
    records = [_rec(0, new=0.38, ret=0.85), _rec(1, new=0.30, ret=0.93), _rec(2, new=0.5, ret=0.6)]
    assert [r.number for r in confirm_candidates(records, 0.9, 2)] == [0, 1]
    assert [r.number for r in confirm_candidates(records, 0.9, 2, band=0.0)] == [1]  # the old rule lost trial 0


def test_ladder_next_finishes_the_first_rung_that_keeps_the_floor():
    rungs = ["lora", "lora+lwf", "lora+fip"]
    assert ladder_next(rungs, [], 2, 0.9) == "lora"
    low = [_rec(0, "lora", ret=0.5), _rec(1, "lora", ret=0.6)]
    assert ladder_next(rungs, low, 2, 0.9) == "lora+lwf"
    kept = low + [_rec(2, "lora+lwf", ret=0.93)]
    assert ladder_next(rungs, kept, 2, 0.9) == "lora+lwf"  # finish the rung's trials
    assert ladder_next(rungs, kept + [_rec(3, "lora+lwf", ret=0.8, state="pruned")], 2, 0.9) is None
    nothing = low + [_rec(2, "lora+lwf", ret=0.8), _rec(3, "lora+lwf", ret=0.8),
                     _rec(4, "lora+fip", ret=0.8), _rec(5, "lora+fip", ret=0.8)]
    assert ladder_next(rungs, nothing, 2, 0.9) is None


def test_promising_first_puts_measured_winners_within_the_floor_first_and_unmeasured_before_misses():
    hybrids = [find_hybrid(k) for k in ("lora", "full", "full+ewc", "full+replay")]
    ev = Evidence("s", 300, "2026", "0", {"full": EvidenceRow(0.6, 0.2, 0.3), "full+ewc": EvidenceRow(0.4, 0.2, 0.92),
                                          "full+replay": EvidenceRow(0.5, 0.2, 0.95)})
    # lora is unmeasured: after the floor keepers, before full (measured, retention 0.3 < floor)
    assert [h.label for h in promising_first(hybrids, ev, 0.9)] == ["full+replay", "full+ewc", "lora", "full"]
    assert [h.label for h in promising_first(hybrids, None, 0.9)] == ["lora", "full", "full+ewc", "full+replay"]
    assert [h.label for h in promising_first(hybrids, ev, 0.93)] == ["full+replay", "lora", "full", "full+ewc"]
    swapped = [find_hybrid(k) for k in ("full", "full+ewc", "lora", "full+replay")]  # rules order: a miss first
    assert [h.label for h in promising_first(swapped, ev, 0.93)] == ["full+replay", "lora", "full", "full+ewc"]


def test_pick_hybrids_prefers_the_hybrid_a_key_names_over_one_that_shares_its_label():
    joint = find_hybrid("full+replay@replay.mode=append@replay.ratio=0.5")
    plain = find_hybrid("full+replay")
    assert joint.label == plain.label == "full+replay"
    picked = pick_hybrids([joint, plain], [joint.key, "full+replay"])
    assert [h.key for h in picked] == [joint.key, plain.key]  # both, though joint training is ranked first


def test_pick_hybrids_by_key_or_label():
    ordered = [find_hybrid(k) for k in ("lora", "full+lwf@lwf.anchor=general@lwf.teacher=cached_topk", "full+ewc")]
    assert pick_hybrids(ordered, ["full+ewc", "full+lwf(teacher=cached_topk)", "lora"]) == [ordered[2], ordered[1], ordered[0]]
    with pytest.raises(ConfigError, match="'full' is not among"):
        pick_hybrids(ordered, ["full"])


def test_intermediate_point_and_suite():
    def score(v, role, task=None, bounded=True):
        return Score(value=v, metric="accuracy", higher_is_better=True, bounded=bounded, role=role, train_task=task)

    base = {"g": score(0.5, "general"), "t": score(0.1, "task", "t1")}
    now = {"g": score(0.45, "general"), "loss": score(2.0, "task", "t1", bounded=False), "t": score(0.3, "task", "t1")}
    assert point_from_scores(base, now, "t1") == pytest.approx((0.3, 0.9))


def test_check_folder_refuses_foreign_folders_and_other_settings(tmp_path):
    assert check_folder(tmp_path / "new", {"target": "x"}) is False
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and is not a tune folder"):
        check_folder(tmp_path / "other", {})
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "tune.json").write_text(json.dumps({"target": "a", "steps": 3}))
    with pytest.raises(StateError, match="steps differ"):
        check_folder(tmp_path / "tune", {"target": "a", "steps": 4})


# --- a tiny user run ------------------------------------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A one-task run YAML on the tiny model with a suite scoring general text and the task."""
    rows = ["the cat sat on the mat.", "a dog ran in the park!", "she sells sea shells by the sea shore."]
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"text": f"{rows[i % 3]} {i}"}) + "\n" for i in range(40)))
    (tmp_path / "general_eval.jsonl").write_text("".join(json.dumps({"text": f"{rows[i % 3]} x{i}"}) + "\n" for i in range(12)))
    task = [f"the licensee may not assign clause {i}." for i in range(52)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in task[:40]))
    (tmp_path / "task_eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in task[40:]))
    (tmp_path / "suite.yaml").write_text(
        "tasks:\n"
        "  - {name: general_acc, type: next_token_accuracy, data: {path: general_eval.jsonl, max_length: 32}}\n"
        "  - {name: task_acc, type: next_token_accuracy, role: task, train_task: t1, data: {path: task_eval.jsonl, max_length: 32}}\n"
    )
    run = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "tasks": [{"name": "t1", "data": {"path": str(tmp_path / "task.jsonl"), "max_length": 32}}],
        "strategies": [{"name": "lora", "r": 4}],
        "general_data": {"path": str(tmp_path / "general.jsonl"), "max_length": 32},
        "train": {"steps_per_task": 6, "batch_size": 4, "lr": 1e-2, "progress": False},
        "eval": {"suite": str(tmp_path / "suite.yaml"), "batch_size": 8},
        "output": {"dir": str(tmp_path / "runs" / "mine")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


#: a small space that trains fast on the tiny model: adapters only, no synthetic generation
SMALL = Constraints(compute="low", privacy="normal", stakes="high", weights="adapters")


def _trials(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())["selection"]


def test_tune_cli_end_to_end_on_a_user_run(tiny_run, tmp_path):
    out = tmp_path / "tune"
    result = runner.invoke(app, ["tune", str(tiny_run), "--trials", "3", "--steps", "3", "--out", str(out),
                                 "--compute", "low", "--stakes", "high", "--adapters"])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "best: trial #" in result.output
    # what was searched, and why the best was chosen (issue 20 item 9)
    assert "search space: 4 hybrids" in result.output and "lwf.alpha 0.01–100 (log-uniform, default" in result.output
    why = " ".join(result.output.split("why:", 1)[1].split())
    assert "selection (select part, 3 steps per task" in why and "confirmation (select part, the full budget of 6" in why
    assert "report (report part, read once for this trial): new-task score" in why
    trials = _trials(out)
    counted = [t for t in trials if t["duplicate_of"] is None and t["state"] in ("complete", "pruned")]
    assert len(counted) == 3
    for t in trials:
        assert t["steps"] == 3 and t["hybrid"] and t["strategies"][0] == {"name": "lora", "r": 4, **t["strategies"][0]}
        assert {"lwf", "fip"} & {s["name"] for s in t["strategies"]}  # --stakes high pruned the rest
        if t["state"] == "complete":
            assert t["new_task_score"] is not None and t["general_retention"] is not None and t["seconds"] > 0
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Pareto front" in html and "All trials" in html
    best = load_run_config(out / "best.yaml")  # a complete run, ready for retain train
    # trials ran 3 steps; the best was confirmed at the run's own budget (6 steps)
    assert best.train.steps_per_task == 6 and best.eval.suite == str(tiny_run.parent / "suite.yaml")
    assert best.output.dir.endswith("mine-tuned")
    data = json.loads((out / "trials.json").read_text())
    assert data["best"]["confirmed"] and data["best"]["steps"] == 6
    assert [c["steps"] for c in data["confirmation"]] == [6] * len(data["confirmation"]) and 1 <= len(data["confirmation"]) <= 2
    assert [s.name for s in best.strategies] == [s["name"] for s in _trials(out)[data["best"]["trial"]]["strategies"]]
    assert "confirmation at the full budget" in result.output
    # a second run into the same folder with other settings is refused; a foreign folder too
    again = runner.invoke(app, ["tune", str(tiny_run), "--trials", "3", "--steps", "4", "--out", str(out),
                                "--compute", "low", "--stakes", "high", "--adapters"])
    assert again.exit_code == 2 and "other settings (steps differ" in again.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("")
    refused = runner.invoke(app, ["tune", str(tiny_run), "--out", str(foreign)])
    assert refused.exit_code == 2 and "not a tune folder" in refused.output


class SimulatedKill(BaseException):
    """Not an Exception: optuna lets it through without recording the trial, as a SIGKILL would."""


def test_a_killed_tune_resumes_without_redoing_finished_trials(tiny_run, tmp_path):
    from retain.train import finetune

    out = tmp_path / "tune"
    options = TuneOptions(trials=4, steps=3, seed=1, constraints=SMALL, min_general_retention=0.0,
                          hybrids=["lora+lwf", "lora+fip"])
    calls = []

    def killed_on_third(config, observer):
        calls.append(config.output.dir)
        if len(calls) == 3:
            raise SimulatedKill
        return finetune(config, observer=observer)

    with pytest.raises(SimulatedKill):
        Tuner(load_target(str(tiny_run)), options, out, train_fn=killed_on_third).run()
    before = {t["number"]: t for t in _trials(out)}
    assert [t["state"] for t in before.values()] == ["complete", "complete", "running"]
    killed = before[2]

    resumed_calls = []

    def counting(config, observer):
        resumed_calls.append(config.output.dir)
        return finetune(config, observer=observer)

    result = Tuner(load_target(str(tiny_run)), options, out, train_fn=counting).run()
    after = {t["number"]: t for t in _trials(out)}
    for n in (0, 1):
        assert after[n] == before[n]  # finished trials untouched
    assert after[2]["state"] == "failed" and after[2]["note"] == "interrupted"
    retry = [t for n, t in after.items() if n > 2 and t["params"] == killed["params"] and t["hybrid"] == killed["hybrid"]]
    assert retry and retry[0]["state"] in ("complete", "pruned")  # the killed trial ran again with its settings
    counted = [t for t in after.values() if t["state"] in ("complete", "pruned") and t["duplicate_of"] is None]
    assert len(counted) == 4
    trained = [Path(c).parent.name for c in resumed_calls]
    assert trained.count("trials") == 2  # only the two missing trials trained, then the confirmations
    assert trained.count("confirm") == len(result.confirmed) >= 1
    assert result.best is not None and result.best.confirms is not None
    # a finished tune run again trains nothing
    again = Tuner(load_target(str(tiny_run)), options, out, train_fn=counting).run()
    assert again.records == result.records and again.confirmed == result.confirmed
    assert len(resumed_calls) == len(trained)
    # more trials continue the same study, over the same hybrids
    import dataclasses

    more = Tuner(load_target(str(tiny_run)), dataclasses.replace(options, trials=5, hybrids=None), out, train_fn=counting)
    assert [h.label for h in more.eligible] == ["lora+lwf", "lora+fip"]
    more.run()
    counted = [t for t in _trials(out) if t["state"] in ("complete", "pruned") and t["duplicate_of"] is None]
    assert len(counted) == 5


def test_ladder_stops_at_the_first_rung_that_keeps_the_floor(tiny_run, tmp_path):
    options = TuneOptions(trials=4, steps=3, ladder=True, min_general_retention=0.0,
                          constraints=Constraints(compute="low", weights="adapters"))
    result = Tuner(load_target(str(tiny_run)), options, tmp_path / "easy").run()
    assert [r.label for r in result.records] == ["lora"]  # lora keeps a zero floor: stop there
    strict = TuneOptions(trials=3, steps=3, ladder=True, min_general_retention=50.0,
                         constraints=Constraints(compute="low", weights="adapters"))
    result = Tuner(load_target(str(tiny_run)), strict, tmp_path / "hard").run()
    labels = [r.label for r in result.records if r.duplicate_of is None]
    assert labels == ["lora", "lora+lwf", "lora+lwf+replay"]  # walked up the path; nothing kept 50x retention
    assert not result.keeps_floor


def test_ladder_needs_a_floor(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="--min-general-retention"):
        Tuner(load_target(str(tiny_run)), TuneOptions(ladder=True), tmp_path / "t")


def test_intermediate_evals_only_score_what_decides_the_two_numbers(tiny_run):
    target = load_target(str(tiny_run))
    suite = intermediate_suite(target.suite, "t1")
    assert [t.name for t in suite.tasks] == ["general_acc", "task_acc"]
    assert intermediate_suite(target.suite, "other").tasks[0].name == "general_acc"


def test_scenario_best_yaml_reproduces_the_scenario(data_dir, tmp_path):
    target = load_target("stories-contracts", data_dir=data_dir)
    h = find_hybrid("full+replay")
    strategies = [s.model_dump(mode="json") for s in target.trial_config(h, {"replay.ratio": 0.3}, tmp_path / "t", 40, 20).strategies]
    target.write_suite(tmp_path)
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(target.best_data(strategies, 40, tmp_path)))
    config = load_run_config(path)
    assert config.train.steps_per_task == 40 and config.strategies[1].params == {"ratio": 0.3}
    assert config.model.name_or_path == target.base["model"]["name_or_path"]
    from retain.eval.suite import load_suite

    assert [t.name for t in load_suite(config.eval.suite).tasks] == [t.name for t in target.suite.tasks]


def test_max_minutes_stops_starting_trials(tiny_run, tmp_path):
    options = TuneOptions(trials=3, steps=3, max_minutes=0, constraints=SMALL)
    result = Tuner(load_target(str(tiny_run)), options, tmp_path / "t").run()
    assert result.records == [] and result.best is None
    assert json.loads((tmp_path / "t" / "trials.json").read_text())["selection"] == []
    assert (tmp_path / "t" / "report.html").is_file() and not (tmp_path / "t" / "best.yaml").exists()


def test_the_runs_train_seed_stands_unless_seed_is_given(tiny_run, monkeypatch):
    """Without --seed a tune trains (and samples) with the YAML's train.seed; --seed replaces it."""
    run = yaml.safe_load(tiny_run.read_text())
    run["train"]["seed"] = 7
    tiny_run.write_text(yaml.safe_dump(run))
    assert load_target(str(tiny_run)).base["train"]["seed"] == 7
    assert load_target(str(tiny_run), seed=3).base["train"]["seed"] == 3

    seen: list[tuple[int, int]] = []

    def tuner(target, options, out, progress=None):  # noqa: ANN001, ANN202 - stops the command before any training
        seen.append((target.base["train"]["seed"], options.seed))
        raise SimulatedKill

    monkeypatch.setattr("retain.guide.tune.Tuner", tuner)
    out = tiny_run.parent / "tune"
    for extra in ([], ["--seed", "3"]):
        with pytest.raises(SimulatedKill):
            runner.invoke(app, ["tune", str(tiny_run), "--out", str(out), *extra])
    assert seen == [(7, 7), (3, 3)]


# --- select chooses, report reports: a fake training whose select and report parts disagree ----------


def _part_score(report: float, select: float, role: str, task: str | None = None, n: int = 12) -> Score:
    from retain.results.schema import ItemScores, PartScore

    spread = [report + (0.04 if i % 2 else -0.04) for i in range(n)]  # mean = report: an interval around it
    return Score(value=report, metric="accuracy", higher_is_better=True, bounded=True, role=role, train_task=task,
                 n=n, part="report", select=PartScore(value=select, n=n // 2), items=ItemScores(num=spread))


def fake_training(base_seed: int, unlucky_seed: int):
    """A train_fn that trains nothing: it hands the observer a base record and a task-end record. Select
    part: the new-task score grows with lwf's alpha, retention falls with it, and ``unlucky_seed`` costs
    0.3 of new-task score. Report part: the new-task score is 0.20 for every run, below the base
    model's 0.25 (the tuned model does not beat the base model there)."""
    import math

    from retain.results.schema import StepRecord

    seen = []

    def train(config, observer):
        inner = getattr(observer, "inner", observer)  # TrialObserver (search) or SuiteObserver (confirmation)
        alpha = next(s.params["alpha"] for s in config.strategies if s.name == "lwf")
        seed = config.train.seed
        seen.append((Path(config.output.dir).parent.name, seed, config.train.steps_per_task))
        step = math.log10(alpha) / 4  # -0.5 .. 0.5 over lwf's range
        new = 0.5 + 0.2 * step - (0.3 if seed == unlucky_seed else 0.0)
        inner.task_names = ["t1"]
        inner.records = {
            0: StepRecord(index=0, scores={"g": _part_score(0.60, 0.60, "general"),
                                           "t": _part_score(0.25, 0.10, "task", "t1")}),
            1: StepRecord(index=1, task="t1", global_step=config.train.steps_per_task,
                          scores={"g": _part_score(0.57, 0.60 * (0.95 - 0.05 * step), "general"),
                                  "t": _part_score(0.20, new, "task", "t1")}),
        }

    return train, seen


def test_select_chooses_confirmation_reruns_on_fresh_seeds_and_report_is_read_once(tiny_run, tmp_path):
    out = tmp_path / "tune"
    target = load_target(str(tiny_run))
    base_seed = target.base["train"]["seed"]
    fresh = [derive_seed(base_seed, Stream.TUNE_CONFIRM, rank) % 2**31 for rank in (0, 1)]
    train, seen = fake_training(base_seed, unlucky_seed=fresh[0])
    options = TuneOptions(trials=3, seed=1, constraints=SMALL, min_general_retention=0.8, hybrids=["lora+lwf"])
    result = Tuner(target, options, out, train_fn=train).run()  # --steps not given: trials at the full budget
    search = [r for r in result.records if r.duplicate_of is None]
    assert all(r.stage == "search" and r.seed == base_seed and r.steps == 6 for r in search)
    for r in search:  # the search recorded select figures: 0.10 before on the task, never the report's 0.25
        assert r.new_task_score_before == pytest.approx(0.10) and r.new_task_score != pytest.approx(0.20)
    # confirmed even at the full budget, on fresh seeds (one rule: derive_seed by purpose), scored on select
    assert [(c.stage, c.seed, c.steps) for c in result.confirmed] == [("confirm", fresh[0], 6), ("confirm", fresh[1], 6)]
    assert [s for s in seen if s[0] == "confirm"] == [("confirm", fresh[0], 6), ("confirm", fresh[1], 6)]
    assert base_seed not in fresh
    top_search = max(search, key=lambda r: r.new_task_score)
    assert result.confirmed[0].confirms == top_search.number  # rank 0: the best search trial, on the unlucky seed
    # the confirmation decides: rank 0 lost 0.3 on its fresh seed, so rank 1 wins
    assert result.best is result.confirmed[1] and result.best.seed == fresh[1] and result.keeps_floor
    assert result.confirmed[0].report is None  # only the winner is read on the report part
    report = result.best.report
    assert report["new_task_score"] == pytest.approx(0.20) and report["new_task_score_before"] == pytest.approx(0.25)
    assert report["general_retention"] == pytest.approx(0.95) and len(report["general_retention_interval"]) == 2
    assert report["gain_interval"][1] < 0
    data = json.loads((out / "trials.json").read_text())
    assert set(data) >= {"selection", "confirmation", "report"}
    assert [t["stage"] for t in data["selection"]] == ["search"] * len(data["selection"])
    assert [c["seed"] for c in data["confirmation"]] == [fresh[0], fresh[1]]
    assert data["report"]["part"] == "report" and data["report"]["seed"] == fresh[1]
    assert data["report"]["new_task_score"] == pytest.approx(0.20)
    assert data["best"]["chosen_on"] == "select" and data["best"]["beats_base_model"] is False
    assert any("does not beat the base model on the new task (0.200 vs 0.250 before" in w for w in data["best"]["warnings"])
    header = [line for line in (out / "best.yaml").read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "selection (select part" in text and "confirmation (select part" in text and "report (report part" in text
    assert f"fresh seed {fresh[1]}" in text and "WARNING: does not beat the base model" in text
    assert load_run_config(out / "best.yaml").train.seed == fresh[1]  # retrains the reported run
    html = (out / "report.html").read_text()
    assert "does not beat the base model" in html and "report (report part" in html


def test_a_winner_that_misses_the_floor_on_confirmation_says_so(tiny_run, tmp_path):
    out = tmp_path / "tune"
    target = load_target(str(tiny_run))
    train, _ = fake_training(target.base["train"]["seed"], unlucky_seed=-1)
    options = TuneOptions(trials=2, seed=1, constraints=SMALL, min_general_retention=0.99, hybrids=["lora+lwf"],
                          confirm=1)
    result = Tuner(target, options, out, train_fn=train).run()
    assert not result.keeps_floor and result.best.stage == "confirm"
    warnings = json.loads((out / "trials.json").read_text())["best"]["warnings"]
    assert any(w.startswith("misses the floor on confirmation: general retention") for w in warnings)
    assert "WARNING: misses the floor on confirmation" in (out / "best.yaml").read_text()


def test_trial_observer_scores_the_select_part_against_the_base_models_select_values(monkeypatch):
    from types import SimpleNamespace

    from retain.eval.suite import SuiteConfig
    from retain.guide.monitor import TrialObserver
    from retain.results.schema import StepRecord

    calls, points = [], []

    def evaluate(model, tokenizer, suite, batch_size, *, part="all"):
        calls.append(part)
        return {"g": Score(value=0.45, metric="accuracy", higher_is_better=True, bounded=True, role="general", part="select"),
                "t": Score(value=0.3, metric="accuracy", higher_is_better=True, bounded=True, role="task", train_task="t1",
                           part="select")}

    monkeypatch.setattr("retain.guide.monitor.evaluate_suite", evaluate)
    base = {"g": _part_score(0.9, 0.5, "general"), "t": _part_score(0.2, 0.1, "task", "t1")}
    inner = SimpleNamespace(suite=SuiteConfig(), base_scores=base, batch_size=4, records={})
    observer = TrialObserver(inner, lambda step, new, ret: points.append((step, new, ret)))
    model = SimpleNamespace(train=lambda: None)
    ctx = SimpleNamespace(unwrapped_model=model, tokenizer=None, global_step=5, tasks=[1, 2])
    observer.score_step(ctx, SimpleNamespace(name="t1"))
    assert calls == ["select"] and points == [(5, 0.3, pytest.approx(0.9))]  # 0.45 / the base's select 0.5
    inner.on_task_end = lambda *a: None
    inner.records[1] = StepRecord(index=1, scores={"g": _part_score(0.1, 0.4, "general"), "t": _part_score(0.9, 0.35, "task", "t1")})
    observer.on_task_end(model, ctx, SimpleNamespace(index=0, name="t1"), None)
    assert points[-1] == (5, 0.35, pytest.approx(0.8))  # the task end's select values, never its report ones


# --- the constraints a run YAML records bound the search ---------------------------------------------


def _strict_yaml(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The issue's strict.yaml: `retain recommend --compute low --privacy strict --stakes high --tasks 1
    --out strict.yaml`, its placeholders filled with the tiny run's files, its budget made tiny."""
    from retain.guide.template import fill_placeholders

    strict = tmp_path / "strict.yaml"
    made = runner.invoke(app, ["recommend", "--compute", "low", "--privacy", "strict", "--stakes", "high", "--tasks", "1",
                               "--out", str(strict)])
    assert made.exit_code == 0, made.output
    (tmp_path / "suite1.yaml").write_text(
        (tmp_path / "suite.yaml").read_text().replace("train_task: t1", "train_task: task1"))
    values = {"model": str(tiny_model_dir), "general_data": str(tmp_path / "general.jsonl"),
              "suite": str(tmp_path / "suite1.yaml"), "prompts": "the cat", "task1_data": str(tmp_path / "task.jsonl")}
    data = yaml.safe_load(fill_placeholders(strict.read_text(), values))
    assert data["constraints"] == {"compute": "low", "privacy": "strict", "stakes": "high", "weights": "any"}
    data["model"]["dtype"] = "float32"
    data["tasks"][0]["data"]["max_length"] = data["general_data"]["max_length"] = 32
    data["train"] = {"steps_per_task": 4, "batch_size": 4, "lr": 1e-2, "progress": False}
    data["output"]["dir"] = str(tmp_path / "runs" / "strict")
    strict.write_text(yaml.safe_dump(data, sort_keys=False))
    return strict


def test_a_recommended_strict_yaml_is_tuned_within_its_constraints(tiny_run, tiny_model_dir, tmp_path):
    strict = _strict_yaml(tmp_path, tiny_model_dir)
    target = load_target(str(strict))
    assert target.constraints == {"compute": "low", "privacy": "strict", "stakes": "high", "weights": "any"}
    tuner = Tuner(target, TuneOptions(trials=40), tmp_path / "space")  # no flags: as recorded
    assert (tuner.constraints.compute, tuner.constraints.privacy, tuner.constraints.stakes) == ("low", "strict", "high")
    from retain.guide.catalogue import uses_adapters

    assert tuner.allowed and set(tuner.eligible) <= set(tuner.allowed)
    for h in tuner.allowed:  # everything the tune may ever search here
        assert "replay" not in h.names, h.key  # privacy strict: no stored real data
        assert uses_adapters(h), h.key  # compute low: never the full weights
        assert {"lwf", "fip"} & set(h.names), h.key  # stakes high: a function-preserving method

    # the console's search space, without --hybrids (--max-minutes 0: no trial starts)
    shown = runner.invoke(app, ["tune", str(strict), "--out", str(tmp_path / "shown"), "--trials", "8", "--max-minutes", "0"])
    assert shown.exit_code == 0, shown.output
    space = shown.output.split("search space:", 1)[1].split("tune ", 1)[0]
    listed = [line.split()[0] for line in space.splitlines()[1:]
              if line.startswith("  ") and not line.startswith("   ") and not line.strip().startswith("skipped")]
    assert listed and all(name.startswith("lora+") or name.startswith("prompt") for name in listed), listed
    assert all("+replay" not in name and ("lwf" in name or "fip" in name) for name in listed), listed
    out = tmp_path / "tune"
    result = runner.invoke(app, ["tune", str(strict), "--out", str(out), "--trials", "1", "--steps", "2", "--confirm", "0",
                                 "--min-general-retention", "0.9", "--hybrids", "lora+fip"])
    assert result.exit_code == 0, result.output
    assert f"compute low, privacy strict, stakes high, adapters or full weights, 1 task (recorded in {strict})" in result.output
    assert "fip.weight 0.01–1000 (log-uniform" in result.output and "why:" in result.output
    assert "not confirmed at the full budget" in result.output and "report (report part" in result.output
    recorded = json.loads((out / "trials.json").read_text())["tune"]["constraints"]
    assert (recorded["compute"], recorded["privacy"], recorded["stakes"]) == ("low", "strict", "high")
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["constraints"] == {"compute": "low", "privacy": "strict", "stakes": "high", "weights": "any"}
    # --hybrids outside the recorded constraints, and a flag that widens them, are refused before any training
    for extra, message in ((["--hybrids", "full+replay"], "'full+replay' is not among the hybrids"),
                           (["--compute", "high"], f"--compute high would widen the constraints recorded in {strict} "
                                                   "(compute low)"),
                           (["--privacy", "normal"], "(privacy strict)"),
                           (["--full-weights"], "compute low rules out full-weight hybrids")):
        refused = runner.invoke(app, ["tune", str(strict), "--out", str(tmp_path / "refused"), "--trials", "1", *extra])
        assert refused.exit_code == 2, refused.output
        assert message in " ".join(refused.output.split()), refused.output
    assert not (tmp_path / "refused").exists()
    narrowed = runner.invoke(app, ["tune", str(strict), "--out", str(tmp_path / "narrow"), "--trials", "1", "--steps", "2",
                                   "--confirm", "0", "--adapters", "--hybrids", "lora+fip"])
    assert narrowed.exit_code == 0 and f"(recorded in {strict}, narrowed by --adapters)" in narrowed.output


def test_an_interrupted_or_failed_trial_reaches_the_user_without_a_traceback(tiny_run, tmp_path):
    import logging
    import sys

    from retain.errors import Interrupted

    options = TuneOptions(trials=2, steps=3, seed=1, constraints=SMALL, min_general_retention=0.0, hybrids=["lora+lwf"])

    def stopped(config, observer):
        raise Interrupted("stopped task 'contracts' after step 1; checkpoint somewhere")

    with pytest.raises(Interrupted):
        Tuner(load_target(str(tiny_run)), options, tmp_path / "a", train_fn=stopped).run()
    handlers = logging.getLogger("optuna").handlers
    assert handlers  # optuna's own stream handler, where its "Trial N failed" warnings go

    def record(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord("optuna.study._optimize", logging.WARNING, __file__, 1,
                                     f"Trial 0 failed because of the following error: {error!r}.", None, sys.exc_info())

    plain = logging.Formatter()  # optuna's colour formatter asks its stream, which an earlier test may have closed
    for handler in handlers:
        assert not handler.filter(record(Interrupted("stopped")))  # the CLI prints the interruption, once
        ours = record(ConfigError("strategies[0].x: not a setting of lwf"))
        assert handler.filter(ours)
        shown = plain.format(ours)
        assert "not a setting of lwf" in shown and "Traceback" not in shown
        foreign = record(ValueError("a bug"))
        assert handler.filter(foreign) and "Traceback" in plain.format(foreign)  # a bug keeps its stack
