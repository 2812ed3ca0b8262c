"""Report pipeline on a small handmade Results: matrix, summary, file round-trip, HTML, markdown, gate."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from retain.report import gate, html, markdown, plots
from retain.results import summary
from retain.results.schema import SCHEMA_VERSION, Drift, ItemScores, Results, Score, StepRecord

TASKS = ["stories", "contracts"]


def task(value: float, name: str, *, bounded: bool = True, metric: str = "next_token_accuracy") -> Score:
    return Score(value=value, metric=metric, higher_is_better=metric != "loss", bounded=bounded,
                 role="task", train_task=name, n=100)


def general(nta: float, err: float, ppl: float = 12.0) -> dict[str, Score]:
    return {
        "general_nta": Score(value=nta, metric="next_token_accuracy", higher_is_better=True, bounded=True,
                             role="general", n=500),
        # bounded but lower is better: enters the general score as 1 - err
        "general_err": Score(value=err, metric="error_rate", higher_is_better=False, bounded=True,
                             role="general", n=500),
        # unbounded: reported, never averaged into the general score
        "general_ppl": Score(value=ppl, metric="perplexity", higher_is_better=False, bounded=False,
                             role="general", n=500),
    }


def record(index: int, stories: float, contracts: float, nta: float, err: float, **kw) -> StepRecord:
    scores = {
        # An unbounded loss listed first and a second bounded score listed later: neither is primary.
        "stories_loss": task(2.0, "stories", bounded=False, metric="loss"),
        "stories_acc": task(stories, "stories"),
        "stories_acc_other": task(0.01, "stories"),
        "contracts_acc": task(contracts, "contracts"),
        **general(nta, err, kw.pop("ppl", 12.0)),
    }
    return StepRecord(index=index, task=None if index == 0 else TASKS[index - 1], global_step=10 * index,
                      scores=scores, **kw)


BASE_SAMPLES = {"Once upon a time": "there was <script>alert(1)</script>"}


def full_records() -> list[StepRecord]:
    # general = mean(nta, 1 - err): base (0.50 + 0.60)/2 = 0.55, step 1 0.475, step 2 0.40
    return [
        record(0, 0.30, 0.20, 0.50, 0.40, samples=BASE_SAMPLES),
        record(1, 0.80, 0.25, 0.45, 0.50, seconds=5.0, seconds_per_step=0.5, peak_memory_bytes=10**9,
               drift=Drift(kl_from_base=0.10, ppl_delta=0.5, weight_rel_l2=0.01)),
        record(2, 0.60, 0.90, 0.40, 0.60, seconds=7.0, seconds_per_step=0.7, peak_memory_bytes=2 * 10**9,
               drift=Drift(kl_from_base=0.30, ppl_delta=1.5, weight_rel_l2=0.02), ppl=float("inf"),
               samples={"Once upon a time": "a contract & <b>clause</b>"}),
    ]


def lora_records() -> list[StepRecord]:
    # general: base 0.55, step 1 (0.50 + 0.58)/2 = 0.54, step 2 (0.49 + 0.57)/2 = 0.53
    return [
        record(0, 0.30, 0.20, 0.50, 0.40, samples=BASE_SAMPLES),
        record(1, 0.70, 0.22, 0.50, 0.42, seconds_per_step=0.2, peak_memory_bytes=5 * 10**8,
               drift=Drift(kl_from_base=0.02)),
        record(2, 0.68, 0.80, 0.49, 0.43, seconds_per_step=0.4, peak_memory_bytes=6 * 10**8,
               drift=Drift(kl_from_base=0.05, ppl_delta=0.1, weight_rel_l2=0.001)),
    ]


@pytest.fixture
def results() -> Results:
    return Results(
        scenario="stories→contracts",
        base_model="tiny-llama",
        runs=[
            summary.build_run("full", TASKS, full_records(), config={"lr": 1e-4}, trainable_params=1000),
            summary.build_run("lora", TASKS, lora_records(), config={"r": 8}, trainable_params=50),
        ],
    )


# --- matrix and summary ------------------------------------------------------------------------


def test_build_matrix_picks_first_bounded_task_score() -> None:
    R = summary.build_matrix(full_records(), TASKS)
    assert R == [[0.30, 0.20], [0.80, 0.25], [0.60, 0.90]]  # values copied, so exact


def test_build_matrix_keeps_shape_for_missing_records() -> None:
    R = summary.build_matrix(full_records()[:2], TASKS)
    assert R[2] == [None, None]
    with pytest.raises(ValueError, match="exceeds"):
        summary.build_matrix(full_records(), TASKS[:1])


def test_general_score_orients_and_ignores_unbounded() -> None:
    recs = full_records()
    assert summary.general_score(recs[0]) == pytest.approx(0.55)
    assert summary.general_score(recs[2]) == pytest.approx(0.40)
    assert summary.general_score(StepRecord(index=0)) is None


def test_summarize_matches_hand_computation() -> None:
    s = summary.summarize(full_records(), TASKS, trainable_params=1000)
    assert s.new_task_score == pytest.approx(0.90)
    assert s.new_task_score_before == pytest.approx(0.20)
    assert s.general_before == pytest.approx(0.55)
    assert s.general_after == pytest.approx(0.40)
    assert s.general_retention == pytest.approx(0.40 / 0.55)
    assert s.acc == pytest.approx((0.60 + 0.90) / 2)
    assert s.bwt == pytest.approx(0.60 - 0.80)
    assert s.fwt == pytest.approx(0.25 - 0.20)
    assert s.forgetting == pytest.approx(0.80 - 0.60)
    assert (s.kl_from_base, s.ppl_delta, s.weight_rel_l2) == pytest.approx((0.30, 1.5, 0.02))
    assert s.seconds_per_step == pytest.approx(0.6)
    assert s.peak_memory_bytes == 2 * 10**9
    assert s.trainable_params == 1000


def test_single_task_summary_has_no_bwt() -> None:
    recs = [record(0, 0.3, 0.2, 0.5, 0.4), record(1, 0.8, 0.2, 0.45, 0.5)]
    s = summary.summarize(recs, TASKS[:1])
    assert s.acc == pytest.approx(0.8)
    assert s.bwt is None and s.fwt is None and s.forgetting is None
    assert s.kl_from_base is None


# --- file round trip ---------------------------------------------------------------------------


def test_save_load_round_trip(results: Results, tmp_path: Path) -> None:
    path = results.save(tmp_path / "out" / "results.json")
    loaded = Results.load(path)
    assert loaded == results
    assert math.isinf(loaded.runs[0].records[2].scores["general_ppl"].value)
    data = json.loads(path.read_text())  # strict JSON despite the infinite perplexity
    assert data["schema_version"] == SCHEMA_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


def test_newer_minor_version_loads_and_unknown_major_is_refused(results: Results, tmp_path: Path) -> None:
    data = json.loads(results.to_json())
    data["schema_version"] = "1.7"
    data["field_from_the_future"] = 1
    ok = tmp_path / "minor.json"
    ok.write_text(json.dumps(data))
    assert Results.load(ok).base_model == "tiny-llama"

    data["schema_version"] = "2.0"
    bad = tmp_path / "major.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"major\.json.*'2\.0'"):
        Results.load(bad)


# --- HTML --------------------------------------------------------------------------------------


def test_html_is_self_contained_and_complete(results: Results, tmp_path: Path) -> None:
    page = html.render_html(results)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page
    assert page.count("<svg") >= 4  # two heatmaps, the scatter, the retention plot
    assert "0.200 → 0.900" in page  # full: new task before → after
    assert "0.550 → 0.400" in page  # full: general before → after
    assert f"{0.40 / 0.55:.3f}" in page and f"{0.53 / 0.55:.3f}" in page
    assert "Pareto front" in page
    assert "stories→contracts" in page and "tiny-llama" in page


def test_html_escapes_samples(results: Results) -> None:
    page = html.render_html(results)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a contract &amp; &lt;b&gt;clause&lt;/b&gt;" in page


def test_write_report_is_atomic_file(results: Results, tmp_path: Path) -> None:
    out = html.write_report(results, tmp_path / "report.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_sweeps_found_from_run_names(results: Results) -> None:
    base = results.runs[1]
    sweep_runs = [base.model_copy(update={"name": f"lora@alpha={a}"}) for a in (1.0, 0.5)]
    swept = results.model_copy(update={"runs": results.runs + sweep_runs})
    series = summary.sweep_series(swept)
    assert list(series) == ["alpha"]
    label, xs, ys = series["alpha"][0]
    assert label == "lora: new task" and xs == [0.5, 1.0]
    assert "Sweep over alpha" in html.render_html(swept)


# --- plots -------------------------------------------------------------------------------------


def test_pareto_front_both_higher_is_better() -> None:
    pts = [("a", 0.9, 0.70), ("b", 0.8, 0.95), ("c", 0.7, 0.90), ("d", 0.9, 0.60)]
    assert [p[0] for p in plots.pareto_front(pts)] == ["b", "a"]


def test_heatmap_leaves_missing_cells_blank() -> None:
    svg = plots.heatmap_svg([[0.31, None], [0.82, 0.27]], ["x", "y"], title="t")
    assert svg.startswith("<svg") and "0.31" in svg and "0.27" in svg
    assert "nan" not in svg.lower().replace("nanum", "")
    assert "after training task" in svg and "evaluated on" in svg
    assert plots.figure_to_png_base64(plots.heatmap_figure([[0.1], [0.2]], ["x"]))[:4] == "iVBO"


# --- markdown and terminal ---------------------------------------------------------------------


def test_markdown_table_has_a_row_per_strategy(results: Results) -> None:
    table = markdown.summary_table_markdown(results)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(results.runs)
    assert lines[2].startswith("| full |") and lines[3].startswith("| lora |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_markdown_marks_missing_and_escapes_pipes(results: Results) -> None:
    run = results.runs[1]
    no_kl = run.summary.model_copy(update={"kl_from_base": None})
    odd = run.model_copy(update={"name": "a|b", "summary": no_kl})
    table = markdown.summary_table_markdown(results.model_copy(update={"runs": [odd]}))
    row = table.strip().splitlines()[-1]
    assert row.startswith("| a\\|b |") and "—" in row


def test_number_formatting() -> None:
    assert summary.fmt_num(None) == summary.fmt_num(float("nan")) == "—"
    assert summary.fmt_num(0.72727) == "0.727" and summary.fmt_num(0.00123) == "0.00123"
    assert summary.fmt_num(float("inf")) == "∞" and summary.fmt_num(0) == "0.000"
    assert summary.fmt_bytes(2 * 1024**3) == "2.0 GiB" and summary.fmt_bytes(512) == "512 B"
    assert summary.fmt_count(50) == "50" and summary.fmt_count(1_234_567) == "1.2M"


def test_print_summary_uses_rich(results: Results) -> None:
    console = Console(file=io.StringIO(), width=250, record=True)
    markdown.print_summary(results, console)
    text = console.export_text()
    assert "full" in text and "lora" in text and "retention" in text


# --- gate --------------------------------------------------------------------------------------


def test_gate_names_strategy_bound_and_value(results: Results) -> None:
    assert gate.check_gate(results, confidence=0, min_general_retention=0.8) == [
        "full: general retention 0.727 < min 0.800"
    ]
    assert gate.check_gate(results, confidence=0, max_forgetting=0.1) == ["full: forgetting 0.200 > max 0.100"]
    assert gate.check_gate(results, confidence=0, max_kl=0.01) == [
        "full: KL from base 0.300 > max 0.010",
        "lora: KL from base 0.050 > max 0.010",
    ]
    assert gate.check_gate(results, confidence=0, min_new_task=0.85) == ["lora: new-task score 0.800 < min 0.850"]


def test_gate_passes_within_bounds(results: Results) -> None:
    bounds = {"max_forgetting": 0.5, "min_new_task": 0.5, "min_general_retention": 0.5, "max_kl": 1.0}
    assert gate.check_gate(results, confidence=0, **bounds) == []
    assert gate.check_gate(results, confidence=0, strategy="lora", min_general_retention=0.9, max_forgetting=0.05) == []
    assert gate.check_gate(results, confidence=0) == []


def test_gate_missing_values_and_unknown_strategy(results: Results) -> None:
    run = results.runs[1]
    blind = results.model_copy(update={"runs": [run.model_copy(update={
        "summary": run.summary.model_copy(update={"kl_from_base": None})})]})
    assert gate.check_gate(blind, confidence=0, max_kl=0.1) == ["lora: KL from base not measured (max 0.100)"]
    assert "no such strategy" in gate.check_gate(results, confidence=0, strategy="ewc", max_kl=1.0)[0]


def test_gate_single_task_bounds_general_drop() -> None:
    recs = [record(0, 0.3, 0.2, 0.5, 0.4), record(1, 0.8, 0.2, 0.45, 0.5)]  # general 0.55 -> 0.475
    single = Results(base_model="m", runs=[summary.build_run("full", TASKS[:1], recs)])
    drop = 1 - 0.475 / 0.55
    assert gate.check_gate(single, confidence=0, max_forgetting=0.2) == []
    assert gate.check_gate(single, confidence=0, max_forgetting=0.1) == [
        f"full: general drop (1 - retention) {drop:.3f} > max 0.100"
    ]


def _general_record(index: int, hits: list[float], tokens: list[float]) -> StepRecord:
    items = ItemScores(num=hits, den=tokens)
    return StepRecord(index=index, task=None if index == 0 else "t", scores={
        "general": Score(value=items.value(), metric="next_token_accuracy", higher_is_better=True, bounded=True,
                         role="general", part="report", items=items),
    })


def test_gate_checks_the_worse_end_of_the_interval():
    """Retention near 0.996 on noisy windows: the point passes a 0.99 floor, the interval's low end does not."""
    rng = np.random.default_rng(0)
    tokens = [100.0] * 60
    base = [float(x) for x in rng.integers(40, 80, size=60)]
    after = [b * 0.985 + float(e) for b, e in zip(base, rng.normal(0, 3, size=60))]  # retention 0.996 [0.983, 1.010]
    records = [_general_record(0, base, tokens), _general_record(1, after, tokens)]
    run = summary.build_run("full", ["t"], records)
    low, high = run.summary.general_retention_interval
    assert low < 0.99 < run.summary.general_retention < high
    results = Results(base_model="m", runs=[run])
    assert gate.check_gate(results, min_general_retention=0.99, confidence=0) == []
    (violation,) = gate.check_gate(results, min_general_retention=0.99)
    assert violation.startswith(f"full: general retention {summary.fmt_num(low)} (the lower end of") and "< min 0.990" in violation
    (drop,) = gate.check_gate(results, max_forgetting=0.01)  # one task: 1 - retention, its upper end is 1 - low
    assert f"general drop (1 - retention) {summary.fmt_num(1 - low)} (the upper end" in drop


def test_gate_fails_a_non_finite_value_and_a_value_without_interval(results: Results) -> None:
    run = results.runs[1]
    nan = results.model_copy(update={"runs": [run.model_copy(update={
        "summary": run.summary.model_copy(update={"general_retention": float("nan")})})]})
    assert gate.check_gate(nan, min_general_retention=0.9, confidence=0) == [
        "lora: general retention is nan (not a finite number), which fails min 0.900"]
    (old,) = gate.check_gate(results, strategy="lora", min_general_retention=0.5)  # records without items
    assert "has no interval" in old and "--confidence 0" in old


# --- what a person reads (issue 20, item 13) -----------------------------------------------------


def test_the_scores_at_every_step_are_split_into_tables_that_fit(results: Results) -> None:
    """Many evals made one table too wide for the page (ppl delta and peak memory were cut off)."""
    run = results.runs[0]
    many = {f"eval_{i}": Score(value=0.5, metric="accuracy", higher_is_better=True, bounded=True, role="general", n=1)
            for i in range(9)}
    records = [r.model_copy(update={"scores": {**r.scores, **many}}) for r in run.records]
    page = html.render_html(results.model_copy(update={"runs": [run.model_copy(update={"records": records})]}))
    section = page[page.index("Scores at every step"): page.index("Sample generations")]
    widths = [len(re.findall("<th>", table)) for table in section.split("<table>")[1:]]
    assert len(widths) >= 3 and max(widths) <= 3 + max(html.SCORE_COLUMNS_PER_TABLE, 7), widths  # 7 training columns
    assert "peak memory" in section and "ppl Δ" in section
    assert f"results schema {SCHEMA_VERSION}" in page


def test_lines_and_points_stay_apart() -> None:
    """Lines on top of each other get their own marker and dash; the front plot names points in a
    legend (no labels written over each other); a 0.16% change is shown on a y-range of at least 0.05."""
    flat = [("full", [0, 1], [1.0, 1.0016]), ("lora", [0, 1], [1.0, 1.0016]), ("replay", [0, 1], [1.0, 1.0])]
    fig = plots.line_figure(flat, xlabel="x", ylabel="y", reference=1.0, min_span=plots.MIN_SCORE_SPAN)
    (ax,) = fig.axes
    low, high = ax.get_ylim()
    assert high - low >= plots.MIN_SCORE_SPAN - 1e-9
    lines = [line for line in ax.get_lines() if line.get_label() in ("full", "lora", "replay")]
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 3
    points = [("full", 0.9, 0.80), ("lora", 0.9, 0.801), ("replay", 0.5, 0.99)]
    (ax,) = plots.tradeoff_figure(points).axes
    assert not ax.texts  # no annotations on the points
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == ["full", "lora", "replay"]


def test_help_shows_no_bool_and_cuts_no_option_at_80_columns() -> None:
    from typer.testing import CliRunner

    from retain.cli import app

    runner = CliRunner()
    for command in (["gate"], ["train"], ["demo"], ["bench"], ["merge"], ["tune"], ["recommend"], ["eval"], ["report"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output and "…" not in result.output.replace("fip …", ""), result.output
        assert max(len(line) for line in result.output.splitlines()) <= 80, result.output
    assert "--min-general-retention" in runner.invoke(app, ["gate", "--help"], env={"COLUMNS": "80"}).output
