"""Cache of evaluation scores keyed by (model fingerprint, suite hash).

The base model is evaluated once per suite and reused by every strategy run and every later
invocation; a fingerprint over the actual weights (not a path or name) makes reuse safe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from retain.io import atomic_write_text, default_cache_dir
from retain.models.fingerprint import model_fingerprint
from retain.results.schema import Score

__all__ = ["cache_path", "cached_scores", "model_fingerprint"]

def cache_path(cache_dir: str | os.PathLike[str] | None, fingerprint: str, suite_hash: str) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "eval" / f"{fingerprint[:16]}-{suite_hash[:16]}.json"


def _read_cached(path: Path, fingerprint: str, suite_hash: str) -> dict[str, Score] | None:
    """Scores from a cache file, or None if it is missing, unreadable or for other keys."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("fingerprint") != fingerprint or data.get("suite_hash") != suite_hash:
            return None  # 16-hex-digit prefix collision: treat as a miss
        return {name: Score.model_validate(score) for name, score in data["scores"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def cached_scores(
    cache_dir: str | os.PathLike[str] | None,
    fingerprint: str,
    suite_hash: str,
    compute: Callable[[], dict[str, Score]],
) -> dict[str, Score]:
    """Return cached scores for (model, suite) or call ``compute`` once and store its result.

    Stored as JSON under ``cache_dir/eval/<fingerprint[:16]>-<suite_hash[:16]>.json``, written to a
    temp file then ``os.replace``d, so concurrent runs never read a half-written file.
    ``cache_dir=None`` uses :func:`default_cache_dir`.
    """
    path = cache_path(cache_dir, fingerprint, suite_hash)
    hit = _read_cached(path, fingerprint, suite_hash)
    if hit is not None:
        return hit
    scores = compute()
    payload = {
        "fingerprint": fingerprint,
        "suite_hash": suite_hash,
        "scores": {name: json.loads(score.model_dump_json()) for name, score in scores.items()},
    }
    atomic_write_text(path, json.dumps(payload, indent=2))
    return scores
