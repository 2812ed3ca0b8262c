"""The eval type registry: every registered type runs, refuses keys of other types, and reports every
mistake a user can make as a ConfigError/DataError naming the file, record or key."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_eval_fixtures import SENTENCES, tiny_model, tiny_tokenizer  # noqa: E402

from retain.errors import ConfigError, DataError  # noqa: E402
from retain.eval import suite as S  # noqa: E402
from retain.eval.tasks import EvalTaskConfig, LossEval, NextTokenAccuracyEval, eval_types  # noqa: E402
from retain.results.schema import Score  # noqa: E402

LM_EVAL_TASK = """task: retain_tiny_types
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "story.txt").write_text("\n".join(SENTENCES))
    mc = [{"prompt": "Tom liked to", "choices": ["play", "sleep"], "label": 0},
          {"prompt": "The quick brown fox", "choices": ["jumps", "sleeps"], "label": "sleeps"}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in ["Once upon", "Tom"]))
    tasks = tmp_path / "lm_tasks"
    tasks.mkdir()
    (tasks / "retain_tiny_types.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "mc.jsonl"))
    return tmp_path


#: One minimal suite entry per registered type, the result keys it yields, and a key of another type.
EXAMPLES: dict[str, tuple[dict, list[str], str]] = {
    "loss": ({"data": {"path": "story.txt"}, "max_length": 16}, ["e", "e.perplexity"], "choices"),
    "next_token_accuracy": ({"data": {"path": "story.txt"}, "max_length": 16}, ["e"], "match"),
    "multiple_choice": ({"data": {"path": "mc.jsonl"}, "length_normalize": "token"}, ["e"], "max_new_tokens"),
    "generation": ({"data": {"path": "qa.jsonl"}, "max_new_tokens": 3, "match": "contains"}, ["e"], "choices"),
    "lm_eval": ({"lm_eval_tasks": ["retain_tiny_types"], "include_path": "lm_tasks"}, ["e"], "data"),
}


@pytest.mark.parametrize("name", sorted(eval_types()))
def test_every_registered_type_runs_and_refuses_foreign_keys(name, files, model, tok, monkeypatch):
    if name not in EXAMPLES:
        pytest.fail(f"eval type '{name}' is registered but has no example in EXAMPLES: add one")
    entry, keys, foreign = EXAMPLES[name]
    if name == "lm_eval":
        if importlib.util.find_spec("lm_eval") is None:
            pytest.skip("lm-eval not installed")
        monkeypatch.setenv("HF_DATASETS_CACHE", str(files / "hf_cache"))
    raw = {"name": "e", "type": name, **entry}
    suite = S.load_suite_dict({"tasks": [raw]}, base=files)
    assert type(suite.tasks[0]) is eval_types()[name] and isinstance(suite.tasks[0], EvalTaskConfig)
    scores = S.evaluate_suite(model, tok, suite, batch_size=2)
    assert list(scores) == keys and all(isinstance(s, Score) and s.n > 0 for s in scores.values())
    assert len(S.suite_hash(suite)) == 64

    with pytest.raises(ConfigError) as err:
        S.load_suite_dict({"tasks": [{**raw, foreign: 1}]}, source="suite.yaml", base=files)
    message = str(err.value)
    assert f"unknown key 'tasks[0].{foreign}'" in message and f"for type '{name}'" in message and "suite.yaml" in message
    assert "valid keys" in message and "name, type, role, train_task" in message


def test_no_example_for_an_unregistered_type():
    assert set(EXAMPLES) == set(eval_types()), "EXAMPLES lists a type that is not registered"


def test_foreign_key_message_suggests_the_closest_valid_key(files):
    entry = {"name": "e", "type": "multiple_choice", "data": {"path": "mc.jsonl"}, "choice": ["No", "Yes"]}
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\[0\].choice'; did you mean 'choices'\?"):
        S.load_suite_dict({"tasks": [entry]}, base=files)


def test_unknown_type_lists_registered_types():
    with pytest.raises(ConfigError) as err:
        S.load_suite_dict({"tasks": [{"name": "e", "type": "los", "data": {"path": "x.txt"}}]})
    message = str(err.value)
    assert "'tasks[0].type': unknown eval type 'los'; did you mean 'loss'?" in message
    assert all(name in message for name in eval_types())
    with pytest.raises(ConfigError, match=r"missing required key 'tasks\[0\].type' \(one of: generation"):
        S.load_suite_dict({"tasks": [{"name": "e", "data": {"path": "x.txt"}}]})


def test_scenario_style_construction_validates_fields(files):
    task = LossEval(name="l", data={"path": str(files / "story.txt")}, max_examples=2)
    assert task.type == "loss" and S.SuiteConfig(tasks=[task]).tasks[0] is task
    with pytest.raises(ValueError, match="choices"):
        LossEval(name="l", data={"path": "x.txt"}, choices=["a"])


# --------------------------------------------------------------------------------------------
# loss + next-token accuracy: one forward pass over shared windows


def _count_forwards(model):
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(1))


def test_loss_and_accuracy_over_the_same_windows_share_one_pass(files, model, tok):
    data = str(files / "story.txt")
    loss = LossEval(name="loss", data={"path": data, "max_length": 16})
    acc = NextTokenAccuracyEval(name="acc", data={"path": data}, max_length=16)  # same windows, said differently
    calls, handle = _count_forwards(model)
    try:
        alone = {**S.evaluate_task(model, tok, loss, batch_size=4)}
        one_eval = len(calls)
        alone.update(S.evaluate_task(model, tok, acc, batch_size=4))
        assert len(calls) == 2 * one_eval > 0  # separately: each eval runs its own pass
        calls.clear()
        together = S.evaluate_suite(model, tok, S.SuiteConfig(tasks=[loss, acc]), batch_size=4)
        assert len(calls) == one_eval  # in one suite: the windows are scored once
    finally:
        handle.remove()
    assert together == alone and list(together) == ["loss", "loss.perplexity", "acc"]


def test_different_windows_are_not_shared(files, model, tok):
    data = str(files / "story.txt")
    suite = S.SuiteConfig(tasks=[LossEval(name="a", data={"path": data}, max_length=16),
                                 NextTokenAccuracyEval(name="b", data={"path": data}, max_length=12)])
    calls, handle = _count_forwards(model)
    try:
        S.evaluate_suite(model, tok, suite, batch_size=64)
    finally:
        handle.remove()
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------
# Every user mistake is a ConfigError/DataError that names where it is


def _suite_file(folder: Path, entry: str) -> Path:
    path = folder / "suite.yaml"
    path.write_text(f"tasks:\n  - {entry}\n")
    return path


def test_missing_suite_file(tmp_path):
    with pytest.raises(ConfigError, match="eval suite file not found: .*nope.yaml"):
        S.load_suite(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "entry, key",
    [("{name: a, type: loss, data: {path: missing.txt}}", "tasks[0].data.path"),
     ("{name: a, type: lm_eval, lm_eval_tasks: [x], include_path: no_such_folder}", "tasks[0].include_path")],
)
def test_missing_data_file_is_refused_at_load(tmp_path, entry, key):
    path = _suite_file(tmp_path, entry)
    with pytest.raises(ConfigError) as err:
        S.load_suite(path)
    assert str(path) in str(err.value) and f"'{key}': no such file or folder" in str(err.value)


def test_bad_prompt_template_is_refused_at_load(files):
    path = _suite_file(files, '{name: a, type: generation, data: {path: qa.jsonl}, prompt_template: "Q: {prompt"}')
    with pytest.raises(ConfigError, match=r"'tasks\[0\].prompt_template': not a usable template"):
        S.load_suite(path)
    path = _suite_file(files, '{name: a, type: generation, data: {path: qa.jsonl}, prompt_template: "Q: {}"}')
    with pytest.raises(ConfigError, match="positional"):
        S.load_suite(path)


@pytest.mark.parametrize(
    "entry, match",
    [
        ("{name: a, type: generation, data: {path: qa.jsonl}, target_field: answer}",
         r"eval 'a': .*qa.jsonl.* has no field 'answer' \(fields: prompt, target\). Set target_field"),
        ("{name: a, type: generation, data: {path: qa.jsonl}, prompt_template: 'Q: {question}'}",
         r"has no field 'question'.*Set prompt_template"),
        ("{name: a, type: multiple_choice, data: {path: mc.jsonl}, choices: [x, y]}",
         r"eval 'a': .*mc.jsonl.*: label 0 is neither|label 'sleeps' is neither"),
        ("{name: a, type: multiple_choice, data: {path: qa.jsonl}, choices_field: target}",
         r"field 'target' must be a non-empty list of choices"),
        ("{name: a, type: loss, data: {path: mc.jsonl, text_field: body}}",
         r"has no field"),
    ],
)
def test_data_mistakes_name_the_record_and_field(files, model, tok, entry, match):
    suite = S.load_suite(_suite_file(files, entry))
    with pytest.raises((DataError, ConfigError), match=match):
        S.evaluate_suite(model, tok, suite)


def test_label_not_among_choices_names_the_record(files, model, tok):
    (files / "bad.jsonl").write_text(json.dumps({"prompt": "p", "choices": ["a", "b"], "label": "c"}) + "\n")
    suite = S.load_suite(_suite_file(files, "{name: a, type: multiple_choice, data: {path: bad.jsonl}}"))
    with pytest.raises(DataError, match=r"eval 'a': .*bad.jsonl.*1.*label 'c' is neither a choice \['a', 'b'\]"):
        S.evaluate_suite(model, tok, suite)
