"""Shared fixtures: tiny offline models and the real data directory (skipped with a reason if absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Tiny models gain nothing from a second thread, and two OpenMP threads on a shared 2-core machine
# can stall for milliseconds per op; subprocesses (kill/resume tests) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from retain.models.tiny import char_tokenizer, tiny_model  # noqa: E402
import retain.strategies  # noqa: E402,F401  (installs the path keys strategies declare, read by retain.config.load_config)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    candidate = Path(os.environ.get("RETAIN_DATA_DIR", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("real data not found: set RETAIN_DATA_DIR or place it at ../shared/data")
    return found


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches out of the user's home; one cache per test session so expensive imports are shared."""
    monkeypatch.setenv("RETAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def llama(tokenizer):
    return tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)


SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park!",
    "one two three four five.",
    "she sells sea shells by the sea shore.",
    "contracts shall be governed by the laws of delaware.",
    "the licensee may not assign this agreement.",
]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"text": SENTENCES[i % len(SENTENCES)] + f" #{i}"} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pc_file(tmp_path: Path) -> Path:
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"q{i}: add {i} {i + 1} =", "completion": f" {2 * i + 1}"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(model_dir: str, data: Path, out: Path, strategies, steps: int = 6, **train):
    """A small RunConfig dict for tests."""
    from retain.config import load_config_dict

    cfg = {
        "model": {"name_or_path": model_dir},
        "tasks": [{"name": "t1", "data": {"path": str(data), "max_length": 32}}],
        "strategies": strategies,
        "train": {"steps_per_task": steps, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 2, **train},
        "output": {"dir": str(out)},
    }
    return load_config_dict(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + character tokenizer, loadable with from_pretrained."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = char_tokenizer()
    tiny_model("llama", len(tok), seed=0, hidden=32, layers=2, heads=4).save_pretrained(out)
    tok.save_pretrained(out)
    return out
