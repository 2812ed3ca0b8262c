"""Eval primitives, drift, cache and suite loading on tiny random models (CPU, in-memory data)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_eval_fixtures import SENTENCES, tiny_model, tiny_tokenizer  # noqa: E402

from retain.errors import ConfigError  # noqa: E402
from retain.eval import cache, drift  # noqa: E402
from retain.eval import suite as S  # noqa: E402
from retain.eval.tasks import choice as MC  # noqa: E402
from retain.eval.tasks import generate as G  # noqa: E402
from retain.eval.tasks import loglikelihood as LL  # noqa: E402
from retain.eval.tasks import text as TX  # noqa: E402
from retain.results.schema import Score  # noqa: E402

TEXTS = SENTENCES * 3


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


# --------------------------------------------------------------------------------------------
# helpers: straightforward, unbatched reference computations


def manual_window_stats(model, windows):
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            out = model(input_ids=ids, labels=ids)
            k = len(w) - 1
            nll += float(out.loss) * k  # HF loss is the mean over the k predicted tokens
            hits += int((out.logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())
            n += k
    return nll, hits, n


def manual_logprob(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    start = len(context)
    return sum(float(logprobs[start - 1 + j, t]) for j, t in enumerate(continuation))


# --------------------------------------------------------------------------------------------
# loss / perplexity / next-token accuracy


def test_text_windows_concatenate_with_bos_and_drop_tiny_tail(tok):
    ids = [i for t in TEXTS for i in tok(t)["input_ids"]]
    windows = TX.text_windows(tok, TEXTS, 16)
    assert [i for w in windows for i in w] == ids[: sum(map(len, windows))]
    assert all(len(w) == 16 for w in windows[:-1]) and len(windows[-1]) >= 2
    assert ids.count(tok.bos_token_id) == len(TEXTS)


def test_loss_matches_model_cross_entropy_and_perplexity_is_exp(model, tok):
    windows = TX.text_windows(tok, TEXTS, 24)
    assert len(windows[-1]) < 24  # a partial last window exercises right padding
    nll, _, n = manual_window_stats(model, windows)
    loss, ppl = TX.loss(model, tok, TEXTS, max_length=24, batch_size=4)
    assert loss.n == ppl.n == n
    assert loss.value == pytest.approx(nll / n, rel=1e-5)
    assert ppl.value == pytest.approx(math.exp(loss.value), rel=1e-9)
    assert (loss.metric, loss.higher_is_better, loss.bounded) == ("loss", False, False)
    assert (ppl.metric, ppl.higher_is_better) == ("perplexity", False)


def test_next_token_accuracy_matches_manual_argmax(model, tok):
    _, hits, n = manual_window_stats(model, TX.text_windows(tok, TEXTS, 24))
    acc = TX.next_token_accuracy(model, tok, TEXTS, max_length=24, batch_size=3)
    assert acc.value == pytest.approx(hits / n) and acc.n == n and acc.bounded and acc.higher_is_better


def test_batching_does_not_change_results(model, tok):
    one = TX.loss(model, tok, TEXTS, 20, batch_size=1)[0].value
    many = TX.loss(model, tok, TEXTS, 20, batch_size=7)[0].value
    assert many == pytest.approx(one, rel=1e-5)
    a1 = TX.next_token_accuracy(model, tok, TEXTS, 20, batch_size=1).value
    assert TX.next_token_accuracy(model, tok, TEXTS, 20, batch_size=5).value == a1


def test_max_windows_subsample_is_seeded(model, tok):
    a = TX.loss(model, tok, TEXTS, 16, max_windows=3, seed=1)[0]
    b = TX.loss(model, tok, TEXTS, 16, max_windows=3, seed=1)[0]
    assert a == b and a.n <= 3 * 15


def test_train_mode_restored_per_module(model, tok):
    model.train()
    model.model.layers[0].eval()  # a frozen part a strategy keeps in eval mode
    try:
        TX.loss(model, tok, SENTENCES[:2], 16)
        assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------
# multiple choice


def test_encode_pair_joint_tokenization(tok):
    ctx, cont = LL.encode_pair(tok, "Answer:", " Yes")
    assert ctx + cont == tok("Answer: Yes")["input_ids"]
    assert ctx == tok("Answer:")["input_ids"]
    assert LL.encode_pair(tok, "Answer: ", "Yes") == (ctx, cont)  # trailing space moves to the choice
    bos_ctx, bos_cont = LL.encode_pair(tok, "", "Yes")
    assert bos_ctx == [tok.bos_token_id] and bos_cont == tok("Yes", add_special_tokens=False)["input_ids"]


def test_continuation_logprobs_match_manual_with_shared_prefixes(model, tok):
    pairs = [
        LL.encode_pair(tok, "Tom liked to", " play"),
        LL.encode_pair(tok, "Tom liked to", " play"),  # duplicate
        LL.encode_pair(tok, "Tom liked to", " play in the garden"),  # extends the first
        LL.encode_pair(tok, "The contract may not", " be assigned"),
        LL.encode_pair(tok, "Once", " upon a time there was a little cat"),
    ]
    pairs += [LL.encode_pair(tok, "Tom liked to", c) for c in (" sleep", " run to the garden", " x")]  # shared context
    expected = [manual_logprob(model, c, x) for c, x in pairs]
    assert LL.supports_context_cache(model)
    for bs in (1, 2, 16):
        for share in (True, False):
            got = LL.continuation_logprobs(model, pairs, batch_size=bs, share_context=share)
            assert got == pytest.approx(expected, abs=1e-4), (bs, share)


def test_continuation_logprobs_truncate_from_the_left_like_lm_eval(model, tok):
    pairs = [LL.encode_pair(tok, SENTENCES[0] + " " + SENTENCES[1], c) for c in (" Yes", " No")]
    limit = 10
    expected = []
    for ctx, cont in pairs:
        full = (ctx + cont)[-(limit + 1):]
        expected.append(manual_logprob(model, full[: len(full) - len(cont)], cont))
    for share in (True, False):
        assert LL.continuation_logprobs(model, pairs, max_length=limit, share_context=share) == pytest.approx(expected, abs=1e-4)


def test_prefix_owners_cover_every_prefix():
    inputs = [(1, 2), (1, 2, 3), (1,), (2, 5), (1, 2, 3), (1, 4)]
    owners = LL._prefix_owners(inputs)
    for i, o in enumerate(owners):
        assert inputs[o][: len(inputs[i])] == inputs[i]
    assert {inputs[o] for o in owners} == {(1, 2, 3), (2, 5), (1, 4)}  # 3 forward passes for 6 inputs
    assert len(set(owners)) == 3


def _choice_lls(model, tok, prompt, choices):
    pairs = [LL.encode_pair(tok, prompt, " " + c) for c in choices]
    return [manual_logprob(model, c, x) for c, x in pairs], [len(x) for _, x in pairs]


def test_multiple_choice_picks_highest_loglikelihood(model, tok):
    questions = [
        ("Clause: the party shall notify the other party. Answer:", ["Yes", "No"]),
        ("Tom liked to", ["play", "sleep", "run away"]),
        ("The quick brown fox", ["jumps", "sleeps"]),
        ("One day the sun was", ["hot", "cold", "green"]),
    ]
    best, worst = [], []
    for prompt, choices in questions:
        lls, _ = _choice_lls(model, tok, prompt, choices)
        best.append({"prompt": prompt, "choices": choices, "label": choices[lls.index(max(lls))]})  # label as string
        worst.append({"prompt": prompt, "choices": choices, "label": lls.index(min(lls))})  # label as index
    assert MC.multiple_choice(model, tok, best, batch_size=3).value == 1.0
    result = MC.multiple_choice(model, tok, worst, batch_size=1)
    assert result.value == 0.0 and result.n == 4 and result.metric == "accuracy"


def test_length_normalisation_changes_the_pick_where_it_should(model, tok):
    candidates = ["Yes", "No", "play", "the garden with his red ball", "a little cat named Tom", "written consent"]
    prompt = "Answer:"
    lls, ntok = _choice_lls(model, tok, prompt, candidates)
    found = None
    for i in range(len(candidates)):
        for j in range(len(candidates)):
            raw_pick_i = lls[i] > lls[j]
            tok_pick_j = lls[j] / ntok[j] > lls[i] / ntok[i]
            if raw_pick_i and tok_pick_j:
                found = (i, j)
                break
        if found:
            break
    assert found, "the random tiny model should produce a pair where per-token normalisation flips the pick"
    i, j = found
    example = [{"prompt": prompt, "choices": [candidates[i], candidates[j]], "label": 1}]
    assert MC.multiple_choice(model, tok, example).value == 0.0
    normed = MC.multiple_choice(model, tok, example, normalize="token")
    assert normed.value == 1.0 and normed.metric == "accuracy_norm_token"
    assert MC.multiple_choice(model, tok, example, normalize="char").metric == "accuracy_norm_char"


def test_resolve_label():
    assert MC.resolve_label("Yes", ["No", "Yes"]) == 1
    assert MC.resolve_label(" Yes ", ["No", "Yes"]) == 1
    assert MC.resolve_label(0, ["No", "Yes"]) == 0
    assert MC.resolve_label("1", ["a", "b"]) == 1
    with pytest.raises(ValueError):
        MC.resolve_label("Maybe", ["No", "Yes"])


# --------------------------------------------------------------------------------------------
# generation


def test_generation_exact_and_contains(model, tok):
    prompts = ["Once upon a time", "Tom liked", "The contract", "One day the sun was hot and Tom went"]
    singles = [G.greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert G.greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=4) == singles  # left padding is exact
    targets = [G.cut_at_stop(s, ["\n"]) for s in singles]
    exact = G.generation(model, tok, prompts, targets, "exact", max_new_tokens=6, batch_size=3)
    assert exact.value == 1.0 and exact.metric == "exact_match" and exact.n == 4
    pieces = [t.strip()[:2] for t in targets]
    assert G.generation(model, tok, prompts, pieces, "contains", max_new_tokens=6).value == 1.0
    assert G.generation(model, tok, prompts, pieces, "exact", max_new_tokens=6).value < 1.0
    assert G.generation(model, tok, prompts, ["zzz-not-there"] * 4, "contains", max_new_tokens=6).value == 0.0


def test_generate_samples_keys_and_determinism(model, tok):
    prompts = ["Once upon a time", "The quick brown fox"]
    a = G.generate_samples(model, tok, prompts, max_new_tokens=5)
    assert list(a) == prompts and a == G.generate_samples(model, tok, prompts, max_new_tokens=5)


# --------------------------------------------------------------------------------------------
# drift


def _perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = other.model.layers[0].mlp.down_proj.weight
        w.add_(torch.randn(w.shape, generator=gen) * scale)
    return other


@pytest.mark.parametrize("top_k", [None, 8])
def test_kl_zero_for_self_and_positive_after_perturbation(model, tok, top_k):
    ref = drift.compute_probe_reference(model, tok, SENTENCES[:4] + ["Hi"], max_length=12, top_k=top_k, batch_size=2)
    assert all(lp.device.type == "cpu" for lp in ref.logprobs) and ref.top_k == top_k
    assert abs(drift.kl_from_reference(ref, model)) < 1e-6
    assert drift.kl_from_reference(ref, _perturbed(model)) > 1e-4


def test_top_k_kl_is_a_lower_bound(model, tok):
    other = _perturbed(model, 0.2)
    full = drift.kl_from_reference(drift.compute_probe_reference(model, tok, SENTENCES, 16), other)
    top = drift.kl_from_reference(drift.compute_probe_reference(model, tok, SENTENCES, 16, top_k=5), other)
    assert 0 < top <= full + 1e-6


def test_weight_rel_l2_zero_and_hand_computed(model):
    base = drift.snapshot_weights(model)
    assert drift.weight_rel_l2(base, model) == 0.0
    other = copy.deepcopy(model)
    delta = torch.full_like(other.lm_head.weight, 0.01)
    with torch.no_grad():
        other.lm_head.weight.add_(delta)
    norm0 = math.sqrt(sum(float(w.double().pow(2).sum()) for w in model.state_dict().values()))
    expected = float(delta.double().norm()) / norm0
    assert drift.weight_rel_l2(base, other) == pytest.approx(expected, rel=1e-6)


def test_effective_weights_of_lora_equal_merged_weights(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    effective = drift.effective_weights(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(effective) == set(merged) == set(model.state_dict())
    for name, weight in merged.items():
        torch.testing.assert_close(effective[name], weight, rtol=1e-5, atol=1e-6)
    assert drift.weight_rel_l2(drift.snapshot_weights(model), peft_model) > 0
    with peft_model.disable_adapter():
        assert drift.weight_rel_l2(drift.snapshot_weights(model), peft_model) == 0.0


def test_ppl_delta():
    assert drift.ppl_delta(10.0, 12.5) == 2.5


# --------------------------------------------------------------------------------------------
# cache


def test_fingerprint_changes_with_a_weight(model, tok):
    fp = cache.model_fingerprint(model)
    assert fp == cache.model_fingerprint(copy.deepcopy(model))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    assert cache.model_fingerprint(other) != fp
    assert cache.model_fingerprint(model, tok) != fp


def test_cached_scores_compute_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": Score(value=0.5, metric="accuracy", higher_is_better=True, bounded=True, role="general", n=2)}

    first = cache.cached_scores(tmp_path, "a" * 64, "b" * 64, compute)
    second = cache.cached_scores(tmp_path, "a" * 64, "b" * 64, compute)
    assert first == second and len(calls) == 1
    assert (tmp_path / "eval" / f"{'a' * 16}-{'b' * 16}.json").is_file()
    cache.cached_scores(tmp_path, "c" * 64, "b" * 64, compute)
    assert len(calls) == 2


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RETAIN_CACHE_DIR", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path


# --------------------------------------------------------------------------------------------
# suites


def _write_suite(folder: Path) -> Path:
    data = folder / "data"
    data.mkdir()
    (data / "story.txt").write_text("\n".join(SENTENCES))
    clauses = [("The contract may not be assigned without consent.", "Yes"), ("Tom liked to play.", "No"), ("The party shall notify the other party.", "Yes")]
    (data / "cuad.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in clauses))
    (data / "qa.jsonl").write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in ["Once upon", "Tom liked"]))
    suite = folder / "suite.yaml"
    suite.write_text(
        """
tasks:
  - name: story
    type: loss
    data: {path: data/story.txt}
    max_length: 16
  - name: story_acc
    type: next_token_accuracy
    data: {path: data/story.txt, max_length: 16}
  - name: cuad
    type: multiple_choice
    role: task
    train_task: cuad_train
    data: {path: data/cuad.jsonl}
    prompt_template: "Clause: {text}\\nAnswer:"
    choices: ["No", "Yes"]
    max_examples: 2
  - name: qa
    type: generation
    data: {path: data/qa.jsonl}
    match: contains
    max_new_tokens: 4
sample_prompts: ["Once upon a time"]
probe_prompts: ["Tom liked to"]
"""
    )
    return suite


def test_suite_loads_resolves_paths_and_evaluates(tmp_path, model, tok, monkeypatch):
    monkeypatch.chdir("/")  # relative paths must not depend on the working directory
    suite = S.load_suite(_write_suite(tmp_path))
    assert suite.tasks[0].data.path == str((tmp_path / "data" / "story.txt").resolve())
    scores = S.evaluate_suite(model, tok, suite, batch_size=4)
    assert list(scores) == ["story", "story.perplexity", "story_acc", "cuad", "qa"]
    assert scores["story.perplexity"].value == pytest.approx(math.exp(scores["story"].value))
    assert scores["cuad"].role == "task" and scores["cuad"].train_task == "cuad_train" and scores["cuad"].n == 2
    assert scores["story_acc"].n == scores["story"].n  # same 16-token windows
    assert all(isinstance(s, Score) for s in scores.values())


def test_suite_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks:\n  - name: a\n    type: loss\n    data: {path: x.txt}\n    max_exampels: 3\n")
    with pytest.raises(ConfigError) as err:
        S.load_suite(path)
    assert "tasks[0].max_exampels" in str(err.value) and str(path) in str(err.value) and "max_examples" in str(err.value)


def test_suite_semantic_errors_and_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("tasks:\n  - name: a\n    type: multiple_choice\n    role: task\n")
    with pytest.raises(ConfigError, match=r"missing required key 'tasks\[0\].data'"):
        S.load_suite(path)
    path.write_text("tasks:\n  - {name: a, type: loss, role: task, data: {path: a.txt}}\n")
    with pytest.raises(ConfigError, match="role task needs train_task"):
        S.load_suite(path)
    (tmp_path / "a.txt").write_text("some text")
    path.write_text("tasks:\n  - {name: a, type: loss, data: {path: a.txt}}\n  - {name: a, type: loss, data: {path: a.txt}}\n")
    with pytest.raises(ConfigError, match="unique"):
        S.load_suite(path)
    suite = S.load_suite(path, overrides=["tasks[1].name=b", "tasks[0].max_examples=5"])
    assert [t.name for t in suite.tasks] == ["a", "b"] and suite.tasks[0].max_examples == 5


def test_suite_hash_follows_content_not_location(tmp_path):
    first = tmp_path / "one"
    first.mkdir()
    h1 = S.suite_hash(S.load_suite(_write_suite(first)))
    second = tmp_path / "two"
    second.mkdir()
    h2 = S.suite_hash(S.load_suite(_write_suite(second)))
    assert h1 == h2 and len(h1) == 64
    (second / "data" / "story.txt").write_text("changed text")
    assert S.suite_hash(S.load_suite(second / "suite.yaml")) != h1


def test_cuad_tsv_loads_as_multiple_choice(model, tok, data_dir):
    root = data_dir / "legalbench-cuad/cuad_anti_assignment"
    suite = S.load_suite_dict(
        {"tasks": [{"name": "cuad", "type": "multiple_choice", "data": {"path": str(root / "test.tsv")},
                    "prompt_template": "Clause: {text}\nAnswer:", "choices": ["No", "Yes"], "max_examples": 8}]}
    )
    score = S.evaluate_suite(model, tok, suite)["cuad"]
    assert score.n == 8 and 0.0 <= score.value <= 1.0


def test_a_continuation_keeps_the_space_a_sentencepiece_tokenizer_puts_on_its_first_token(data_dir, tmp_path):
    """'The little dog' + 'was' read 'The little dogwas' when the new tokens were decoded alone."""
    from retain.eval.tasks.generate import _continuation
    from retain.models.llama2c import ensure_stories260k
    from retain.models.loading import load_any

    _, tokenizer = load_any(str(ensure_stories260k(data_dir, tmp_path)))
    prompt = tokenizer.encode("The little dog")
    whole = tokenizer.encode("The little dog was happy")
    assert whole[: len(prompt)] == prompt
    new = whole[len(prompt):]
    assert not tokenizer.decode(new, skip_special_tokens=True).startswith(" ")  # the bug: the space is dropped
    assert _continuation(tokenizer, prompt, new) == " was happy"
