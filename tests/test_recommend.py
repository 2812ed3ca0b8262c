"""``retain recommend``: output with reasons and evidence, the run YAML it writes, refused values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retain.cli import app
from retain.guide.catalogue import CATALOGUE, find_hybrid
from retain.guide.rules import Constraints, recommend
from retain.guide.template import PLACEHOLDERS, fill_placeholders, placeholders_in, run_yaml
from retain.train.run import load_run_config

runner = CliRunner()


def _sections(output: str) -> dict[str, str]:
    """'recommended' / 'alternative N' -> the lines of that block."""
    blocks = re.split(r"\n(?=recommended: |alternative \d: |ruled out:)", output)
    return {b.split(":")[0]: b for b in blocks if b.startswith(("recommended", "alternative"))}


def test_recommend_prints_a_hybrid_alternatives_reasons_and_evidence():
    result = runner.invoke(app, ["recommend", "--compute", "low", "--privacy", "strict", "--stakes", "high"])
    assert result.exit_code == 0, result.output
    sections = _sections(result.output)
    assert set(sections) == {"recommended", "alternative 1", "alternative 2"}
    for block in sections.values():
        head = block.splitlines()[0]
        assert "replay" not in head.replace("synthetic-replay", "")
        assert "lwf" in head or "fip" in head
        assert "- stakes high →" in block
        assert "measured:" in block
    assert "ruled out:" in result.output
    assert re.search(r"full\+replay\s+privacy strict", result.output)
    assert "constraints: compute low, privacy strict, stakes high" in result.output


def test_recommend_evidence_line_quotes_the_packaged_table():
    from retain.guide.evidence import load_evidence

    evidence = load_evidence()
    if evidence is None:
        pytest.skip("no packaged evidence table")
    result = runner.invoke(app, ["recommend", "--compute", "high", "--full-weights"])
    assert result.exit_code == 0, result.output
    assert f"retain {evidence.retain_version}" in result.output and evidence.created[:10] in result.output
    top = recommend(Constraints(compute="high", weights="full"), evidence)[0]
    if top.evidence is not None:
        assert f"measured: {top.evidence.describe()}" in " ".join(_sections(result.output)["recommended"].split())


def test_recommend_refuses_an_unknown_level():
    result = runner.invoke(app, ["recommend", "--compute", "huge"])
    assert result.exit_code == 2
    assert "--compute 'huge': choose one of low, medium, high" in result.output


def _suite(folder: Path, data: Path) -> Path:
    path = folder / "suite.yaml"
    path.write_text(
        "tasks:\n"
        f"  - {{name: general_acc, type: next_token_accuracy, data: {{path: {data}, max_length: 32}}}}\n"
        f"  - {{name: task_acc, type: next_token_accuracy, role: task, train_task: task1, data: {{path: {data}, max_length: 32}}}}\n"
    )
    return path


def _fill(text: str, tmp_path: Path, model: Path, data: Path) -> str:
    values = {"model": str(model), "general_data": str(data), "suite": str(_suite(tmp_path, data)),
              "prompts": "Once upon a time", **{f"task{i}_data": str(data) for i in range(1, 5)}}
    return fill_placeholders(text, values)


def test_recommend_out_writes_a_yaml_that_loads_once_placeholders_are_replaced(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "run.yaml"
    result = runner.invoke(app, ["recommend", "--privacy", "strict", "--tasks", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert placeholders_in(text) == ["model", "task1_data", "task2_data", *(
        ["prompts"] if "synthetic-replay" in text else []), "general_data", "suite"]
    for key in placeholders_in(text):
        assert f"#   {key}" in text  # listed in the header
    from retain.errors import ConfigError
    from retain.guide.evidence import load_evidence

    with pytest.raises(ConfigError, match=r"placeholders at model.name_or_path, tasks\[0\].data.path") as refused:
        load_run_config(out)  # unfilled: named by key, not reported as a missing file
    assert "<REPLACE" in refused.value.hint
    top = recommend(Constraints(privacy="strict", tasks=2), load_evidence())[0].hybrid
    filled = tmp_path / "filled.yaml"
    filled.write_text(_fill(text, tmp_path, tiny_model_dir, text_file))
    config = load_run_config(filled)
    assert [s.name for s in config.strategies] == list(top.names)
    assert [t.name for t in config.tasks] == ["task1", "task2"]


@pytest.mark.parametrize("key", [h.key for h in CATALOGUE])
def test_every_catalogue_hybrid_writes_a_valid_run_yaml(key, tmp_path, tiny_model_dir, text_file):
    h = find_hybrid(key)
    text = run_yaml(h, tasks=2, header="test")
    assert set(placeholders_in(text)) <= {*PLACEHOLDERS, "task1_data", "task2_data"}
    path = tmp_path / "run.yaml"
    path.write_text(_fill(text, tmp_path, tiny_model_dir, text_file))
    config = load_run_config(path)  # strategies, their settings and needs all validate
    assert json.dumps(config.model_dump(mode="json")).count("<REPLACE") == 0


def test_recommend_out_records_the_constraints_and_never_replaces_a_file_unasked(tmp_path):
    import yaml

    out = tmp_path / "run.yaml"
    made = runner.invoke(app, ["recommend", "--compute", "low", "--privacy", "strict", "--adapters", "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert yaml.safe_load(out.read_text())["constraints"] == {
        "compute": "low", "privacy": "strict", "stakes": "normal", "weights": "adapters"}
    out.write_text(out.read_text() + "# my edits\n")
    edited = out.read_text()
    again = runner.invoke(app, ["recommend", "--out", str(out)])
    assert again.exit_code == 2
    assert f"--out {out} already exists" in " ".join(again.output.split()) and "--overwrite" in again.output
    assert "recommended:" not in again.output  # refused before anything else
    assert out.read_text() == edited
    replaced = runner.invoke(app, ["recommend", "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert "# my edits" not in out.read_text()
    assert yaml.safe_load(out.read_text())["constraints"]["compute"] == "medium"


def test_recommend_refuses_low_compute_with_full_weights_only():
    result = runner.invoke(app, ["recommend", "--compute", "low", "--full-weights"])
    assert result.exit_code == 2 and "compute low rules out full-weight hybrids" in result.output


def test_recommend_ranks_on_select_and_prints_report_figures_with_intervals(monkeypatch):
    from retain.guide.evidence import Evidence, EvidenceRow

    lwf = "lora+lwf@lwf.anchor=general@lwf.teacher=adapters_off"
    report = {"new_task_score": 0.41, "new_task_score_before": 0.18, "general_retention": 0.952, "gain": 0.23,
              "general_retention_interval": [0.947, 0.957], "new_task_score_interval": [0.39, 0.43],
              "gain_interval": [0.21, 0.25], "seeds": [0, 1, 2]}
    rows = {lwf: EvidenceRow(0.45, 0.18, 0.96, report=report), "lora+fip": EvidenceRow(0.30, 0.18, 0.97)}
    evidence = Evidence("stories-contracts", 300, "2026-03-01T00:00:00+00:00", "0.2.0", rows)
    monkeypatch.setattr("retain.guide.evidence.load_evidence", lambda path=None: evidence)
    result = runner.invoke(app, ["recommend", "--compute", "low", "--stakes", "high", "--privacy", "strict"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "ranked on the select part of every eval, printed on the report part with intervals" in text
    assert ("measured: general retention 0.952 [0.947, 0.957], new-task score 0.180 → 0.410 [0.390, 0.430] "
            "(gain +0.230 [+0.210, +0.250]); report part, 3 seeds") in text
    assert "gained +0.270 on the new task" in text  # the ranking's reason quotes the select figures
    assert "measured: general retention 0.970, new-task score 0.180 → 0.300 (gain +0.120)" in text  # a row without a split


def test_an_explicit_retention_floor_ranks_the_hybrids_that_keep_it_first():
    from retain.guide.evidence import Evidence, EvidenceRow

    joint = "full+replay@replay.mode=append@replay.ratio=0.5"
    der = "full+replay+lwf@replay.mode=append@replay.ratio=0.5@lwf.anchor=replay"
    evidence = Evidence("stories-contracts", 300, "2026", "0", {
        joint: EvidenceRow(0.55, 0.18, 0.955), der: EvidenceRow(0.51, 0.18, 0.985), "full": EvidenceRow(0.58, 0.18, 0.27)})
    default = recommend(Constraints(compute="high", weights="full"), evidence)
    strict = recommend(Constraints(compute="high", weights="full", min_general_retention=0.98), evidence)
    position = {h.hybrid.key: i for i, h in enumerate(default)}
    assert position[joint] < position[der]  # at the default floor (0.9) both keep it: the larger gain first
    assert strict[0].hybrid.key == der  # only DER keeps 0.98
    assert any("≥ 98%" in reason for reason in strict[0].reasons)
    assert Constraints(min_general_retention=0.98).retention_floor == 0.98
    assert Constraints(stakes="high").retention_floor == 0.95


def test_recommend_refuses_a_floor_outside_0_to_1():
    result = runner.invoke(app, ["recommend", "--min-general-retention", "98"])
    assert result.exit_code == 2
    assert "--min-general-retention 98" in result.output and "between 0 and 1" in result.output


def test_at_a_floor_of_098_the_packaged_evidence_recommends_der_at_one_to_one():
    """The one full-weight hybrid that kept 0.98 on stories-contracts (3 seeds, report part 0.985)."""
    from retain.guide.evidence import load_evidence

    evidence = load_evidence()
    if evidence is None:
        pytest.skip("no packaged evidence table")
    result = runner.invoke(app, ["recommend", "--compute", "high", "--full-weights", "--min-general-retention", "0.98"])
    assert result.exit_code == 0, result.output
    head = _sections(result.output)["recommended"].splitlines()[0]
    assert "full+replay+lwf@replay.mode=append@replay.ratio=0.5@lwf.anchor=replay" in head
    assert "general retention ≥ 0.98" in result.output
