"""Synthetic replay: generation is seeded and isolated, near-duplicates go, k-means picks diverse examples,
the saved sets hold no real training text beyond the demonstrations, and a LoRA run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES
from resume_utils import assert_kill_resume_matches

from retain.config import DataConfig, load_config_dict
from retain.data import IGNORE_INDEX, load_records
from retain.strategies.synthetic_replay.generation import (
    SamplingSettings,
    diverse_subset,
    drop_near_duplicates,
    example_as_demonstration,
    generate_candidates,
    icl_prompt,
    jaccard,
    kmeans,
    load_jsonl,
    proportional_quotas,
    records_to_examples,
    relabel,
    shingles,
)
from retain.train import finetune
from retain.train.checkpoint import latest_checkpoint, load_checkpoint

FAST = SamplingSettings(max_new_tokens=10, completion_max_new_tokens=4, batch_size=8)


def test_shingle_jaccard_by_hand():
    assert shingles("abcdef", 5) == {"abcde", "bcdef"}
    assert shingles("Ab  c", 5) == {"ab c"}  # normalised, shorter than n
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_near_duplicates_are_dropped_and_the_first_kept():
    texts = [
        "the cat sat on the mat today",
        "The cat sat on the mat today!",  # same text up to case and punctuation
        "a completely different sentence here",
        "the cat sat on the mat today",
        "the dog ran in the park at noon",
    ]
    assert drop_near_duplicates(texts, threshold=0.8) == [0, 2, 4]
    assert drop_near_duplicates(texts, threshold=1.0) == [0, 1, 2, 4]


def _directional_blobs(sizes, dim=8, seed=0, spread=0.05):
    """Points around a few directions, at random norms (L2 normalization must make norm irrelevant)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.eye(dim)[: len(sizes)]
    blobs = [
        (d + spread * torch.randn(n, dim, generator=generator)) * (1 + 4 * torch.rand(n, 1, generator=generator))
        for d, n in zip(directions, sizes)
    ]
    return torch.cat(blobs)


def test_proportional_quotas_by_hand():
    assert proportional_quotas([5, 3, 2], 4) == [2, 1, 1]  # round(2.0), round(1.2), round(0.8)
    assert proportional_quotas([66, 66, 68, 1, 1], 40) == [13, 13, 14, 0, 0]  # 13.07, 13.07, 13.47, 0.2
    # round(0.5) = 1 for each singleton and round(3.5) = 4: 7 > 5, so seats go back from the clusters
    # with the fewest members per seat (a singleton, 1/1), lower index first
    assert proportional_quotas([1, 1, 1, 7], 5) == [0, 0, 1, 4]
    # short: the seat goes to the cluster with the most members per seat it would then give
    assert proportional_quotas([30, 30, 1], 3) == [2, 1, 0]  # rounds to 1, 1, 0; 30/2 beats 1/1, lower index
    assert sum(proportional_quotas([3, 2], 10)) == 5  # never more than there are points


def test_kmeans_selection_is_proportional_and_nearest_the_centroids():
    points = _directional_blobs([30, 20, 10])
    chosen = diverse_subset(points, 12, seed=1, clusters=3)
    assert len(chosen) == 12
    blob = lambda i: 0 if i < 30 else (1 if i < 50 else 2)  # noqa: E731
    assert [sum(blob(i) == b for i in chosen) for b in range(3)] == [6, 4, 2]  # 12 * 30/60, 20/60, 10/60
    unit = points / points.norm(dim=1, keepdim=True)
    for b, (lo, hi) in enumerate([(0, 30), (30, 50), (50, 60)]):
        centre = unit[lo:hi].mean(0)
        kept = [i for i in chosen if lo <= i < hi]
        distances = (unit[lo:hi] - centre).norm(dim=1)
        nearest = sorted((torch.argsort(distances)[: len(kept)] + lo).tolist())
        assert kept == nearest, b
    assert diverse_subset(points, 100) == list(range(60))


def test_planted_outliers_are_not_kept():
    """SSR keeps representative points. One cluster per kept example on raw states (the previous
    selection) keeps every one of 20 planted outliers here; proportional quotas over 20 clusters of
    the normalized states keep none, for every seed tried."""
    for seed in range(3):
        points = _directional_blobs([120, 100, 100, 80], dim=16, seed=seed)
        generator = torch.Generator().manual_seed(3 + seed)
        outliers = torch.randn(20, 16, generator=generator) * 10  # scattered directions, large norms
        features = torch.cat([points, outliers])
        chosen = diverse_subset(features, 40, seed=0)
        assert len(chosen) == 40
        assert not [i for i in chosen if i >= 400], f"seed {seed}: outliers were kept"
        # the previous selection, for contrast: 40 clusters, the member nearest each centroid
        centroids, assign = kmeans(features, 40, seed=0)
        distances = torch.cdist(features, centroids)
        old = [int(m[distances[m, j].argmin()]) for j in range(40) if len(m := (assign == j).nonzero().flatten())]
        assert sum(i >= 400 for i in old) == 20


def test_icl_prompt_layout():
    assert icl_prompt("Say hi.", ["hi there", " hello "], "\n\n") == "Say hi.\n\nhi there\n\nhello\n\n"
    assert icl_prompt("", ["x"], "|") == "x|"
    with pytest.raises(ValueError):
        icl_prompt("", [], "|")


def test_generation_is_seeded_and_leaves_the_run_rng_alone(llama, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate_candidates(llama, tokenizer, 6, FAST, prompts=["the cat", "a dog"], seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    again = generate_candidates(llama, tokenizer, 6, FAST, prompts=["the cat", "a dog"], seed=5)
    other = generate_candidates(llama, tokenizer, 6, FAST, prompts=["the cat", "a dog"], seed=6)
    assert first == again and first != other
    assert all(r["text"].startswith(("the cat", "a dog")) for r in first)
    pairs = generate_candidates(
        llama, tokenizer, 4, FAST, description="Add.", demonstrations=[{"prompt": "1+1=", "completion": " 2"}] * 2, seed=0
    )
    assert pairs and all(set(r) == {"prompt", "completion"} for r in pairs)
    with pytest.raises(ValueError, match="not a mix"):
        generate_candidates(llama, tokenizer, 2, FAST, demonstrations=["text", {"prompt": "a", "completion": "b"}])


def test_records_become_examples_with_prompt_masked(tokenizer):
    examples = records_to_examples([{"text": "abc"}, {"prompt": "q:", "completion": " a"}], tokenizer, 32)
    text, pair = examples
    assert tokenizer.decode(text.input_ids, skip_special_tokens=True) == "abc" and IGNORE_INDEX not in text.labels
    masked = sum(label == IGNORE_INDEX for label in pair.labels)
    assert masked == len(tokenizer("q:")["input_ids"]) and pair.labels[-1] == tokenizer.eos_token_id
    assert example_as_demonstration(pair, tokenizer) == {"prompt": "q:", "completion": " a"}
    assert example_as_demonstration(text, tokenizer) == "abc"


def _config(tiny_model_dir, text_file, pc_file, out, synthetic: dict):
    return load_config_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "tasks": [
                {"name": "stories", "data": {"path": str(text_file), "max_length": 64, "pack": False}},
                {"name": "sums", "data": {"path": str(pc_file), "max_length": 32}},
            ],
            "strategies": [{"name": "lora", "r": 4}, {"name": "synthetic-replay", **synthetic}],
            "train": {"steps_per_task": 3, "batch_size": 4, "lr": 1e-2, "progress": False},
            "output": {"dir": str(out)},
        }
    )


SYNTHETIC = {
    "tasks": {"stories": {"description": "Short sentences.", "demonstrations": ["the cat sat on the mat. #0"]}},
    "demonstrations_from_data": 1,
    "prompts": ["the", "a"],
    "per_source": 4,
    "max_new_tokens": 12,
    "completion_max_new_tokens": 4,
    "ratio": 0.25,
    "relabel": True,
}


@pytest.fixture(scope="module")
def synthetic_run(tiny_model_dir, tmp_path_factory):
    """One two-task LoRA run with synthetic replay, shared by the tests below (generation is the slow part)."""
    folder = tmp_path_factory.mktemp("synthetic")
    text_file, pc_file = folder / "stories.jsonl", folder / "sums.jsonl"
    text_file.write_text("".join(json.dumps({"text": SENTENCES[i % len(SENTENCES)] + f" #{i}"}) + "\n" for i in range(40)))
    pc_file.write_text(
        "".join(json.dumps({"prompt": f"q{i}: add {i} {i + 1} =", "completion": f" {2 * i + 1}"}) + "\n" for i in range(40))
    )
    outcome = finetune(_config(tiny_model_dir, text_file, pc_file, folder / "run", SYNTHETIC))
    return outcome, folder / "run", text_file, pc_file


def test_saved_sets_hold_no_training_text_beyond_the_demonstrations(synthetic_run, tokenizer):
    _, run_dir, text_file, pc_file = synthetic_run
    folder = run_dir / "synthetic"
    manifest = json.loads((folder / "manifest.json").read_text())
    demos = {"stories": ["the cat sat on the mat. #0"], "sums": manifest["sums"]["demonstrations"]}
    assert len(demos["sums"]) == 1 and set(demos["sums"][0]) == {"prompt", "completion"}

    training = {
        "stories": [r["text"] for r in load_records(DataConfig(path=str(text_file)))],
        "sums": [r["prompt"] + r["completion"] for r in load_records(DataConfig(path=str(pc_file)))],
    }
    allowed = {"the cat sat on the mat. #0", demos["sums"][0]["prompt"] + demos["sums"][0]["completion"]}
    rows = []
    for source in ("@general", "stories", "sums"):
        records = load_jsonl(folder / f"{source}.jsonl")
        assert 0 < len(records) <= 4
        rows += [r.get("text", "") + r.get("prompt", "") + r.get("completion", "") for r in records]
    leaked = [t for texts in training.values() for t in texts if t not in allowed and any(t in row for row in rows)]
    assert not leaked, f"training text found in the synthetic sets: {leaked[:3]}"

    # what the run keeps in its checkpointed state is the synthetic data, not training examples
    state = load_checkpoint(latest_checkpoint(run_dir)).strategies["synthetic-replay"]
    kept = set()
    for entry in state["buffer"]["reservoirs"]:
        lengths = entry["lengths"].tolist()
        kept |= {tuple(ids.tolist()) for ids in entry["input_ids"].split(lengths)}
    assert [e["name"] for e in state["buffer"]["reservoirs"]] == ["@general", "stories", "sums"]
    assert len(kept) >= 3
    real = {tuple(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]) for texts in training.values() for t in texts}
    assert not kept & real


def test_relabelled_completions_are_the_latest_models_answers(synthetic_run, tokenizer):
    outcome, run_dir, _, _ = synthetic_run
    records = load_jsonl(run_dir / "synthetic" / "sums.jsonl")
    settings = SamplingSettings(max_new_tokens=12, completion_max_new_tokens=4, batch_size=16)
    assert relabel(outcome.model, tokenizer, records, settings) == records


def test_saved_sets_can_be_reused_without_generating(synthetic_run, tiny_model_dir, tmp_path, monkeypatch):
    _, first, text_file, pc_file = synthetic_run
    import retain.strategies.synthetic_replay as module

    def no_generation(*args, **kwargs):
        raise AssertionError("sets should have been loaded from reuse_dir")

    monkeypatch.setattr(module, "synthesize", no_generation)
    config = {**SYNTHETIC, "relabel": False, "reuse_dir": str(first / "synthetic")}
    finetune(_config(tiny_model_dir, text_file, pc_file, tmp_path / "second", config))
    for source in ("@general", "stories", "sums"):
        assert load_jsonl(tmp_path / "second" / "synthetic" / f"{source}.jsonl") == load_jsonl(first / "synthetic" / f"{source}.jsonl")


def test_unknown_task_name_is_refused(tiny_model_dir, text_file, pc_file, tmp_path):
    from retain.errors import ConfigError

    config = _config(tiny_model_dir, text_file, pc_file, tmp_path / "run", {"tasks": {"stroies": {"demonstrations": ["x"]}}})
    with pytest.raises(ConfigError, match="stroies"):
        finetune(config)


@pytest.mark.slow
def test_lora_plus_synthetic_replay_resumes_exactly_after_a_kill(tiny_model_dir, text_file, tmp_path):
    synthetic = {"name": "synthetic-replay", "prompts": ["the cat", "a dog"], "per_source": 6, "max_new_tokens": 12, "ratio": 0.25,
                 "demonstrations_from_data": 0}
    assert_kill_resume_matches(tmp_path, tiny_model_dir, text_file, [{"name": "lora", "r": 4}, synthetic])


def test_with_no_settings_it_synthesizes_from_task_data_and_general_openings(tiny_model_dir, text_file, pc_file, tmp_path):
    """Before: "nothing to synthesize from ... (got {})". Now 3 demonstrations per task and general openings."""
    from retain.strategies.registry import validate_run_config

    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"one two three four five six seven eight nine {i}"}) + "\n" for i in range(5)))
    validate_run_config(_config(tiny_model_dir, text_file, pc_file, tmp_path / "run", {}), "run")  # the name alone is enough
    small = {"per_source": 3, "max_new_tokens": 6, "completion_max_new_tokens": 3, "select": "first"}  # sizes only
    config = _config(tiny_model_dir, text_file, pc_file, tmp_path / "run", small).model_dump(mode="json")
    config = load_config_dict({**config, "general_data": {"path": str(general)}})
    finetune(config)
    manifest = json.loads((tmp_path / "run" / "synthetic" / "manifest.json").read_text())
    assert set(manifest) == {"@general", "stories", "sums", "@settings"}
    assert len(manifest["stories"]["demonstrations"]) == 3 and len(manifest["sums"]["demonstrations"]) == 3
    openings = manifest["@general"]["prompts"]
    assert len(openings) == 5 and all(p.startswith("one two three four five six seven eight") and len(p.split()) == 8 for p in openings)
