"""retain.guide: the catalogue's facts, each recommendation rule, the search space read from the strategies."""

from __future__ import annotations

import itertools
import json

import pytest

from retain.guide.catalogue import (
    CATALOGUE,
    extra_passes,
    find_hybrid,
    holds_frozen_copy,
    hybrid,
    memory_in_models,
    stores_real_data,
    uses_adapters,
)
from retain.guide.evidence import Evidence, EvidenceRow, evidence_from_results, load_evidence
from retain.errors import ConfigError
from retain.guide.rules import Constraints, assess, check_consistent, ladder, rank, recommend, tighten
from retain.guide.space import fill_from_run, general_prompts, knob, knobs, strategy_specs
from retain.strategies.base import Strength

ALL_CONSTRAINTS = [
    Constraints(compute=c, privacy=p, stakes=s, weights=w, tasks=t)
    for c, p, s, w, t in itertools.product(
        ("low", "medium", "high"), ("strict", "normal"), ("high", "normal"), ("adapters", "full", "any"), (1, 2, 3)
    )
    if not (c == "low" and w == "full")  # refused: low compute trains adapters only (check_consistent)
]


def _allowed(c: Constraints):
    """Allowed hybrids in ranked order, with the packaged evidence (the rules must hold with it)."""
    return [r.hybrid for r in rank(c, load_evidence())[0]]


# --- facts -------------------------------------------------------------------------------------


def test_keys_round_trip_and_name_bench_items():
    for h in CATALOGUE:
        assert hybrid(h.key, h.summary) == h
        assert find_hybrid(h.key) is h
    lwf = find_hybrid("lora+lwf@lwf.anchor=general@lwf.teacher=adapters_off")
    assert lwf.strategy_list() == [{"name": "lora"}, {"name": "lwf", "anchor": "general", "teacher": "adapters_off"}]


@pytest.mark.parametrize(
    ("key", "copy", "memory", "extra"),
    [
        ("lora", False, 1.0, 0.0),
        ("full", False, 4.0, 0.0),
        ("full+ewc", False, 6.0, 0.0),  # + anchor and Fisher over every weight
        ("lora+ewc-lora", False, 1.0, 0.0),  # adapter-sized state
        ("full+fip", True, 5.0, 4 / 3),  # fip snapshots every trainable weight: a copy; pool fwd+bwd + anchor fwd
        ("lora+fip", False, 1.0, 4 / 3),  # on LoRA the snapshot is the adapters
        ("full+lwf@lwf.anchor=general@lwf.teacher=copy", True, 5.0, 4 / 3),
        ("full+lwf@lwf.anchor=general@lwf.teacher=cached_topk", False, 4.0, 1.0),  # no teacher forward
        ("lora+lwf@lwf.anchor=general@lwf.teacher=adapters_off", False, 1.0, 4 / 3),
    ],
)
def test_memory_and_work_by_hand(key, copy, memory, extra):
    h = find_hybrid(key)
    assert holds_frozen_copy(h) is copy
    assert memory_in_models(h) == memory
    assert extra_passes(h) == pytest.approx(extra)


def test_lwf_auto_teacher_is_a_copy_only_without_adapters():
    assert holds_frozen_copy(hybrid("full+lwf", "")) and not holds_frozen_copy(hybrid("lora+lwf", ""))


def test_real_data_facts():
    assert stores_real_data(find_hybrid("full+replay"))
    assert not stores_real_data(find_hybrid("lora+synthetic-replay"))
    assert stores_real_data(hybrid("lora+synthetic-replay@synthetic-replay.demonstrations_from_data=2", ""))


# --- the rules that must hold -------------------------------------------------------------------


@pytest.mark.parametrize("c", [c for c in ALL_CONSTRAINTS if c.privacy == "strict"], ids=Constraints.describe)
def test_strict_privacy_never_recommends_stored_real_data(c):
    allowed = _allowed(c)
    assert allowed, "something always fits"
    assert not any("replay" in h.names for h in allowed)
    assert all(not stores_real_data(h) for h in allowed)


def test_strict_privacy_excludes_replay_with_a_reason():
    _, excluded = rank(Constraints(privacy="strict"))
    replays = [r for r in excluded if "replay" in r.hybrid.names]
    assert {r.hybrid.label for r in replays} >= {"full+replay", "lora+replay", "lora+lwf+replay"}
    assert all("privacy strict" in r.excluded_by[0] for r in replays)


@pytest.mark.parametrize("c", [c for c in ALL_CONSTRAINTS if c.stakes == "high"], ids=Constraints.describe)
def test_high_stakes_always_includes_lwf_or_fip(c):
    allowed = _allowed(c)
    assert allowed
    assert all({"lwf", "fip"} & set(h.names) for h in allowed)


@pytest.mark.parametrize("c", [c for c in ALL_CONSTRAINTS if c.compute == "low"], ids=Constraints.describe)
def test_low_compute_trains_adapters_only_and_holds_no_frozen_copy(c):
    allowed = _allowed(c)
    assert allowed
    assert not any(holds_frozen_copy(h) for h in allowed)
    assert all(uses_adapters(h) for h in allowed), "compute low never trains the full weights"


def test_low_compute_excludes_full_weights_with_a_reason_and_refuses_full_weights_only():
    _, excluded = rank(Constraints(compute="low", stakes="high"))
    reasons = {r.hybrid.key: r.excluded_by[0] for r in excluded}
    assert reasons["full+lwf@lwf.anchor=general@lwf.teacher=cached_topk"].startswith("compute low: full fine-tuning")
    assert "full+fip" in reasons and "full" not in [r.hybrid.key for r in rank(Constraints(compute="low"))[0]]
    with pytest.raises(ConfigError, match="compute low rules out full-weight hybrids"):
        check_consistent(Constraints(compute="low", weights="full"))
    top = recommend(Constraints(compute="medium", stakes="high", weights="full"))
    assert not uses_adapters(top[0].hybrid) and {"lwf", "fip"} & set(top[0].hybrid.names)


def test_weights_and_tasks_rules():
    assert all(uses_adapters(h) for h in _allowed(Constraints(weights="adapters")))
    assert not any(uses_adapters(h) for h in _allowed(Constraints(weights="full")))
    one = {h.label for h in _allowed(Constraints(tasks=1))}
    two = {h.label for h in _allowed(Constraints(tasks=2))}
    assert "o-lora" not in one and "o-lora" in two and "progressive-prompts" in two
    reasons = assess(find_hybrid("o-lora"), Constraints(tasks=3)).reasons
    assert any(r.startswith("tasks 3") for r in reasons)


def test_every_reason_names_its_constraint():
    for r in rank(Constraints(compute="low", privacy="strict", stakes="high"))[0]:
        assert r.reasons
        assert all(reason.split()[0] in ("privacy", "stakes", "compute", "tasks", "evidence") for reason in r.reasons)


# --- constraints recorded in a run YAML: flags may only narrow them ------------------------------


def test_tighten_narrows_the_record_and_refuses_to_widen_it():
    strict = {"compute": "low", "privacy": "strict", "stakes": "high", "weights": "any"}
    assert tighten(strict, {}) == Constraints(compute="low", privacy="strict", stakes="high", weights="any")
    assert tighten(strict, {"weights": "adapters", "compute": "low"}).weights == "adapters"
    assert tighten({"compute": "medium"}, {"compute": "low"}).compute == "low"
    for flag, value, recorded in (("compute", "high", "low"), ("compute", "medium", "low"), ("privacy", "normal", "strict"),
                                  ("stakes", "normal", "high")):
        with pytest.raises(ConfigError, match=rf"--{flag} {value} would widen the constraints recorded in s.yaml "
                                              rf"\({flag} {recorded}\)"):
            tighten(strict, {flag: value}, source="s.yaml")
    with pytest.raises(ConfigError, match=r"--full-weights would widen .* \(weights adapters\)"):
        tighten({"weights": "adapters"}, {"weights": "full"})
    with pytest.raises(ConfigError, match="compute low rules out full-weight"):
        tighten(strict, {"weights": "full"})
    # nothing recorded: the widest, and every flag is a narrowing
    assert tighten(None, {}) == Constraints(compute="high", privacy="normal", stakes="normal", weights="any")
    assert tighten(None, {"compute": "medium"}, tasks=2) == Constraints(compute="medium", tasks=2)
    with pytest.raises(ConfigError, match="--compute 'huge': choose one of"):
        tighten(None, {"compute": "huge"})


def test_the_run_yaml_constraints_key_takes_the_rules_values():
    from typing import get_args

    from retain.config import GuideConstraints
    from retain.guide import rules

    for key, literal in (("compute", rules.Compute), ("privacy", rules.Privacy), ("stakes", rules.Stakes),
                         ("weights", rules.Weights)):
        assert set(get_args(GuideConstraints.model_fields[key].annotation)) == set(get_args(literal))
        assert GuideConstraints.model_fields[key].default == rules.WIDEST[key]  # unset = not constrained


# --- evidence ----------------------------------------------------------------------------------


def _evidence(rows: dict[str, tuple[float, float, float]]) -> Evidence:
    return Evidence("stories-contracts", 300, "2026-01-01T00:00:00+00:00", "0.1.0",
                    {k: EvidenceRow(new, before, ret) for k, (before, new, ret) in rows.items()})


def test_evidence_breaks_ties_and_moves_hybrids():
    c = Constraints(compute="high", weights="full")
    ev = _evidence({"full": (0.2, 0.6, 0.3), "full+ewc": (0.2, 0.4, 0.95), "full+importance": (0.2, 0.5, 0.93)})
    allowed = rank(c, ev)[0]
    labels = [r.hybrid.label for r in allowed]
    # both keep the floor (+1 evidence); importance learned more; full lost its general ability (-1)
    assert labels[:2] == ["full+importance", "full+ewc"]
    assert labels.index("full") > labels.index("full+ewc")
    top = allowed[0]
    assert top.evidence.new_task_gain == pytest.approx(0.3)
    assert any("evidence: kept 93.0%" in r for r in top.reasons)


def test_high_stakes_raises_the_evidence_floor():
    ev = _evidence({"full+ewc": (0.2, 0.4, 0.92)})
    normal = assess(find_hybrid("full+ewc"), Constraints(), ev)
    high = assess(find_hybrid("full+ewc"), Constraints(stakes="high"), ev)
    assert any(r.startswith("evidence: kept 92.0%") for r in normal.reasons)
    assert high.excluded  # no lwf/fip; and the floor would be 0.95 anyway
    assert Constraints(stakes="high").retention_floor == 0.95


def test_evidence_from_results_and_round_trip(tmp_path):
    from retain.results.schema import Results, StrategyRun, Summary

    def run(name, before, after, retention):
        return StrategyRun(name=name, task_names=["contracts"], records=[],
                           summary=Summary(new_task_score=after, new_task_score_before=before, general_retention=retention))

    old = Results(scenario="stories-contracts", base_model="m", created="2026-01-01T00:00:00+00:00",
                  runs=[run("full", 0.1, 0.5, 0.3), run("lora", 0.1, 0.4, 0.5)])
    new = Results(scenario="stories-contracts", base_model="m", created="2026-02-01T00:00:00+00:00",
                  runs=[run("lora", 0.1, 0.45, 0.6)])
    ev = evidence_from_results([old, new])
    assert ev.created.startswith("2026-02-01")
    assert ev.row("lora").general_retention == 0.6  # the later file wins
    assert ev.row("full").new_task_gain == pytest.approx(0.4)
    path = tmp_path / "evidence.json"
    path.write_text(ev.to_json())
    assert load_evidence(path) == ev


def test_packaged_evidence_names_catalogue_hybrids():
    ev = load_evidence()
    if ev is None:
        pytest.skip("no packaged evidence table")
    keys = {h.key for h in CATALOGUE}
    assert ev.rows and set(ev.rows) <= keys
    assert ev.scenario == "stories-contracts" and ev.retain_version and ev.created


def _split_run(name, seed, select, report, interval=None):
    """A run with a select summary (select: (before, after, retention)) and a report summary with intervals."""
    from retain.results.schema import StrategyRun, Summary

    def summary(before, after, retention, with_interval):
        extra = {} if not with_interval else {"general_retention_interval": interval, "gain_interval": [0.1, 0.3],
                                             "new_task_score_interval": [after - 0.02, after + 0.02]}
        return Summary(new_task_score=after, new_task_score_before=before, general_retention=retention,
                       gain=after - before, **extra)

    return StrategyRun(name=name, task_names=["contracts"], records=[], seed=seed,
                       summary=summary(*report, interval is not None), select_summary=summary(*select, False))


def test_evidence_ranks_on_select_and_keeps_report_figures_apart(tmp_path):
    from retain.results.schema import Results

    res = Results(scenario="stories-contracts", base_model="m", created="2026-03-01T00:00:00+00:00",
                  runs=[_split_run("lora", 0, (0.10, 0.50, 0.97), (0.20, 0.45, 0.95), [0.94, 0.96])])
    row = evidence_from_results([res]).row("lora")
    assert (row.new_task_score_before, row.new_task_score, row.general_retention) == (0.10, 0.50, 0.97)  # select ranks
    assert row.new_task_gain == pytest.approx(0.40)
    assert row.report["general_retention"] == 0.95 and row.report["general_retention_interval"] == [0.94, 0.96]
    assert row.report["gain"] == pytest.approx(0.25) and row.report["seeds"] == [0]
    assert "general retention 0.950 [0.940, 0.960]" in row.describe() and "report part, seed 0" in row.describe()
    path = tmp_path / "evidence.json"
    path.write_text(evidence_from_results([res]).to_json())
    assert json.loads(path.read_text())["evidence_version"] == 2
    assert load_evidence(path).row("lora") == row


def test_evidence_over_seeds_uses_the_aggregate():
    from retain.results.aggregate import aggregate_seeds
    from retain.results.schema import Results

    runs = [_split_run("lora", s, (0.10, 0.50 + s / 100, 0.97), (0.20, 0.45, 0.95 - s / 100)) for s in (0, 1, 2)]
    res = Results(scenario="stories-contracts", base_model="m", runs=runs, aggregates=aggregate_seeds(runs))
    row = evidence_from_results([res]).row("lora")
    assert row.new_task_score == pytest.approx(0.51) and row.general_retention == pytest.approx(0.97)  # select means
    assert row.new_task_score_before == pytest.approx(0.10)
    assert row.report["seeds"] == [0, 1, 2] and row.report["general_retention"] == pytest.approx(0.94)
    assert "3 seeds" in row.describe()


def test_an_evidence_table_from_before_the_split_still_loads(tmp_path):
    old = {"evidence_version": 1, "scenario": "stories-contracts", "steps": 300, "created": "2026-01-01T00:00:00+00:00",
           "retain_version": "0.1.0", "hybrids": {"lora": {"new_task_score": 0.5, "new_task_score_before": 0.2,
                                                           "general_retention": 0.9, "kl_from_base": 0.1,
                                                           "seconds_per_step": 0.2}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    row = load_evidence(path).row("lora")
    assert row.report is None and row.general_retention == 0.9
    assert row.describe() == "general retention 0.900, new-task score 0.200 → 0.500 (gain +0.300)"


# --- ladder and search space ------------------------------------------------------------------------


def test_ladder_follows_the_prototyping_path():
    labels = [h.label for h in ladder(Constraints())]
    assert labels[:4] == ["lora", "lora+lwf", "lora+lwf+replay", "lora+fip"]
    strict = [h.label for h in ladder(Constraints(privacy="strict"))]
    assert "lora+lwf+synthetic-replay" in strict and not any("+replay" in x for x in strict)
    assert [h.label for h in ladder(Constraints(stakes="high"))][0] == "lora+lwf"
    assert "full+fip" not in [h.label for h in ladder(Constraints(compute="low"))]


def test_knobs_come_from_the_strategy_classes(monkeypatch):
    from retain.strategies.lwf import LearningWithoutForgetting

    k = knob("lwf")
    assert (k.key, k.low, k.high, k.log) == ("alpha", LearningWithoutForgetting.strength.low,
                                             LearningWithoutForgetting.strength.high, True)
    assert k.default == LearningWithoutForgetting.Config.model_fields["alpha"].default
    monkeypatch.setattr(LearningWithoutForgetting, "strength", Strength("alpha", 2.0, 5.0, log=False))
    moved = knob("lwf")
    assert (moved.low, moved.high, moved.log, moved.default) == (2.0, 5.0, False, 2.0)  # default clipped into range
    assert knob("lora") is None and knob("full") is None


def test_fixed_settings_are_not_searched_and_specs_layer_settings():
    h = hybrid("lora+lwf@lwf.alpha=3", "")
    assert knobs(h) == []
    h = find_hybrid("lora+lwf+replay@lwf.anchor=general@lwf.teacher=adapters_off")
    assert [k.label for k in knobs(h)] == ["lwf.alpha", "replay.ratio"]
    specs = strategy_specs(h, {"lwf.alpha": 0.5, "replay.ratio": 0.2},
                           own={"lora": {"r": 16}, "lwf": {"temperature": 3.0, "anchor": "task"}})
    assert specs == [
        {"name": "lora", "r": 16},
        {"name": "lwf", "temperature": 3.0, "anchor": "general", "teacher": "adapters_off", "alpha": 0.5},
        {"name": "replay", "ratio": 0.2},
    ]


def test_synthetic_replay_gets_prompts_from_general_text_only_when_unset():
    texts = ["Once upon a time there was", "Once upon a time there was", "  The big dog ran  home", ""]
    assert general_prompts(texts) == ["Once upon a time", "The big dog ran"]
    filled = fill_from_run([{"name": "synthetic-replay"}, {"name": "lora"}], texts)
    assert filled[0]["prompts"] == ["Once upon a time", "The big dog ran"]
    own = fill_from_run([{"name": "synthetic-replay", "prompts": ["mine"]}], texts)
    assert own[0]["prompts"] == ["mine"]


def test_evidence_of_a_hybrid_that_barely_learned_counts_against_it():
    ev = _evidence({"full": (0.2, 0.6, 0.3), "lora+ewc-lora": (0.2, 0.201, 1.0), "lora+lwf@lwf.anchor=general@lwf.teacher=adapters_off": (0.2, 0.45, 0.96)})
    still = assess(find_hybrid("lora+ewc-lora"), Constraints(), ev)
    assert any("learned little at default strength (new-task gain +0.001, best +0.400)" in r for r in still.reasons)
    top = rank(Constraints(compute="low"), ev)[0][0]
    assert top.hybrid.label == "lora+lwf"  # kept the floor and learned; ewc-lora at its default barely moved


def test_among_hybrids_below_the_floor_the_one_that_kept_more_ranks_first():
    ev = _evidence({"full+fip": (0.2, 0.6, 0.78), "full+lwf@lwf.anchor=general@lwf.teacher=copy": (0.2, 0.55, 0.94)})
    allowed = rank(Constraints(compute="high", stakes="high", weights="full"), ev)[0]
    labels = [r.hybrid.key for r in allowed]
    assert labels.index("full+lwf@lwf.anchor=general@lwf.teacher=copy") < labels.index("full+fip")


@pytest.mark.parametrize(("key", "extra"), [
    ("full+replay@replay.mode=append@replay.ratio=0.5", 1.0),  # one replayed row per task row: twice the rows
    ("full+replay@replay.mode=append@replay.ratio=0.2", 0.25),
    ("full+replay@replay.mode=replace@replay.ratio=0.5", 0.0),  # the same rows per step
])
def test_append_replay_declares_the_rows_it_adds(key, extra):
    assert extra_passes(hybrid(key, "")) == pytest.approx(extra)
