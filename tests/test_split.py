"""Every eval's items split into a select part (what chooses) and a report part (what is reported)."""

from __future__ import annotations

import json

import pytest

from retain.config import DataConfig
from retain.eval.split import SplitConfig, is_shared, part_indices, split_indices
from retain.eval.suite import SuiteConfig, evaluate_suite, evaluate_task
from retain.eval.tasks.choice import MultipleChoiceEval
from retain.eval.tasks.text import NextTokenAccuracyEval


@pytest.mark.parametrize("n", [6, 7, 48, 603])
def test_the_parts_are_disjoint_cover_the_pool_and_do_not_move(n):
    split = SplitConfig()
    select, report = split_indices(n, split)
    assert not set(select) & set(report) and sorted(select + report) == list(range(n))
    assert select == sorted(select) and report == sorted(report)
    assert abs(len(select) - n / 3) <= 1  # a third selects
    assert split_indices(n, SplitConfig()) == (select, report)  # the same for every run, strategy and seed
    assert split_indices(n, SplitConfig(seed=1)) != (select, report)
    assert part_indices(n, "select", split) == select and part_indices(n, "all", split) == list(range(n))


def test_a_pool_too_small_to_split_serves_both_parts_and_says_so():
    assert split_indices(5, SplitConfig()) == (list(range(5)), list(range(5)))
    assert is_shared(5, SplitConfig()) and not is_shared(6, SplitConfig())


@pytest.fixture
def evals(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"the cat sat on the mat number {i} and then it slept."}) + "\n"
                            for i in range(40)))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"prompt": f"is {i} even?", "label": "Yes" if i % 2 == 0 else "No"}) + "\n"
                                 for i in range(30)))
    return [
        NextTokenAccuracyEval(name="acc", data=DataConfig(path=str(text), max_length=16)),
        MultipleChoiceEval(name="yes_no", role="task", train_task="t", data=DataConfig(path=str(questions)),
                           choices=["No", "Yes"]),
    ]


def test_one_pass_reports_the_report_part_with_the_select_value_beside_it(llama, tokenizer, evals):
    split = SplitConfig()
    for task in evals:
        (key, both), = evaluate_task(llama, tokenizer, task, part="both", split=split).items()
        select = evaluate_task(llama, tokenizer, task, part="select", split=split)[key]
        report = evaluate_task(llama, tokenizer, task, part="report", split=split)[key]
        whole = evaluate_task(llama, tokenizer, task, part="all", split=split)[key]
        assert both.part == "report" and both.value == pytest.approx(report.value) and both.n == report.n
        assert both.select.value == pytest.approx(select.value) and both.select.n == select.n
        assert select.n + report.n == whole.n  # the two parts are the whole pool, nothing shared
        assert len(both.items.num) == len(split_indices(len(whole.items.num), split)[1])  # report items only
        assert both.on("select").value == both.select.value


def test_evaluate_suite_scores_the_parts_it_is_asked_for(llama, tokenizer, evals):
    suite = SuiteConfig(tasks=evals)
    select = evaluate_suite(llama, tokenizer, suite, part="select")
    assert {s.part for s in select.values()} == {"select"}
    assert {s.part for s in evaluate_suite(llama, tokenizer, suite).values()} == {"all"}


def test_a_results_file_from_before_the_split_still_loads(tmp_path):
    """Schema 1.1: scores without parts, items or select values; summaries without intervals."""
    from retain.results.schema import Results

    score = {"value": 0.5, "metric": "accuracy", "higher_is_better": True, "bounded": True, "role": "general", "n": 10}
    old = {"schema_version": "1.1", "base_model": "m", "runs": [{
        "name": "full", "task_names": ["t"], "matrix": [[0.1], [0.4]],
        "records": [{"index": 0, "scores": {"g": score}}, {"index": 1, "task": "t", "scores": {"g": {**score, "value": 0.4}}}],
        "summary": {"general_retention": 0.8},
    }]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    run = Results.load(path).runs[0]
    assert run.records[1].scores["g"].part == "all" and run.records[1].scores["g"].items is None
    assert run.summary.general_retention == 0.8 and run.summary.general_retention_interval is None
    assert run.select_summary is None and run.warnings == []
