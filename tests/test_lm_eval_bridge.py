"""lm-eval bridge: a local task (nothing downloaded) scores the in-memory model like retain does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'retain[lm-eval]')")

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_eval_fixtures import tiny_model, tiny_tokenizer  # noqa: E402

from retain.errors import ConfigError  # noqa: E402
from retain.eval import suite as S  # noqa: E402
from retain.eval.tasks import choice as MC  # noqa: E402
from retain.eval.tasks import loglikelihood as LL  # noqa: E402
from retain.eval.tasks.lm_eval import run_lm_eval  # noqa: E402

QUESTIONS = [
    ("Clause: the party shall notify the other party.\nAnswer:", ["No", "Yes"], 1),
    ("Clause: this agreement is governed by the laws of New York.\nAnswer:", ["No", "Yes"], 0),
    ("Tom liked to", ["play", "sleep", "run to the garden"], 0),
    ("The quick brown fox", ["jumps", "sleeps"], 1),
    ("One day the sun was", ["hot", "cold", "green"], 0),
    ("Once upon a time there was", ["a cat", "a little dog", "the sun"], 2),
    ("The contract may not be", ["assigned", "written", "red"], 0),
    ("His red ball", ["was", "is in the garden", "jumps"], 1),
]

TASK_YAML = """task: retain_tiny_mc
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
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "choices": c, "label": l}) + "\n" for p, c, l in QUESTIONS))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "retain_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tasks_dir


def test_lm_eval_accuracy_equals_retain_multiple_choice(local_task):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=3)
    examples = [MC.ChoiceExample(p, c, l) for p, c, l in QUESTIONS]
    ours = MC.multiple_choice(model, tok, examples, batch_size=4)

    results = run_lm_eval(model, tok, ["retain_tiny_mc"], include_path=str(local_task), batch_size=4)
    assert results["retain_tiny_mc"]["acc"] == pytest.approx(ours.value)
    assert results["retain_tiny_mc"]["n_samples"] == len(QUESTIONS)

    suite = S.load_suite_dict(
        {"tasks": [{"name": "tiny", "type": "lm_eval", "lm_eval_tasks": ["retain_tiny_mc"], "include_path": str(local_task)}]}
    )
    score = S.evaluate_suite(model, tok, suite, batch_size=4)["tiny"]
    assert score.value == pytest.approx(ours.value) and score.metric == "acc"
    assert score.bounded and score.higher_is_better and score.n == len(QUESTIONS)
    assert not model.training


def test_unknown_metric_is_reported(local_task):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    suite = S.load_suite_dict(
        {"tasks": [{"name": "tiny", "type": "lm_eval", "lm_eval_tasks": ["retain_tiny_mc"],
                    "include_path": str(local_task), "lm_eval_metric": "f1", "limit": 2}]}
    )
    with pytest.raises(ConfigError, match="no metric 'f1'.*acc"):
        S.evaluate_suite(model, tok, suite)


def test_per_choice_loglikelihoods_equal_hflm():
    """Stronger than equal accuracy: every (prompt, choice) log-likelihood matches lm-eval's HFLM."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=3)
    requests = [(p, " " + c) for p, choices, _ in QUESTIONS for c in choices]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    instances = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(requests)]
    theirs = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    pairs = [LL.encode_pair(tok, p, c) for p, c in requests]
    assert LL.continuation_logprobs(model, pairs, batch_size=5) == pytest.approx(theirs, abs=1e-4)


def test_unknown_lm_eval_task_is_a_config_error(local_task):
    tok = tiny_tokenizer()
    suite = S.load_suite_dict(
        {"tasks": [{"name": "tiny", "type": "lm_eval", "lm_eval_tasks": ["retain_tiny_mcq"], "include_path": str(local_task)}]}
    )
    with pytest.raises(ConfigError, match="eval 'tiny': lm-eval knows no task 'retain_tiny_mcq'.*did you mean 'retain_tiny_mc'"):
        S.evaluate_suite(tiny_model(len(tok)), tok, suite)
