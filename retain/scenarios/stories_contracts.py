"""Stories -> contracts on real data: teach stories260K contract language, measure what it forgets.

Splits (documented because replay pools and anchors must never touch scored text):

- Contract clauses: the ``text`` column of every CUAD task's train.tsv and test.tsv, deduplicated
  across tasks (the same clause appears in several), then split by text 90/10 with a hash of the text
  (``sha256(text) % 10 == 0`` is held out). Training uses the 90%; the held-out 10% is scored (loss,
  next-token accuracy) and is the only source of the Yes/No multiple-choice questions.
- TinyStories validation text: split into stories at blank lines; stories at even positions are the
  evaluation half (loss, next-token accuracy, KL probes); odd positions form ``general_data``, the
  pool that replay, distillation anchors and Fisher calibration may use.
- Shakespeare (optional second task): the first 90% of lines train, the last 10% are scored.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from retain.config import DataConfig, TaskConfig
from retain.errors import ConfigError
from retain.eval.suite import SuiteConfig
from retain.eval.tasks import LossEval, MultipleChoiceEval, NextTokenAccuracyEval
from retain.scenarios.base import Scenario, default_data_dir

SCENARIO_VERSION = 1
MC_TASKS = ("cuad_governing_law", "cuad_anti_assignment", "cuad_audit_rights", "cuad_insurance")
SAMPLE_PROMPTS = ["Once upon a time", "One day, a little girl named Lily", "The big dog was"]


def _held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10 == 0


def _read_tsv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 24)
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _question(task_dir: Path) -> str:
    prompt = (task_dir / "base_prompt.txt").read_text(encoding="utf-8")
    return prompt.strip().splitlines()[0].strip()


def contract_splits(cuad_dir: Path) -> tuple[list[str], list[str]]:
    """Unique clause texts across all CUAD tasks, split 90/10 by a hash of the text."""
    texts: set[str] = set()
    for task_dir in sorted(p for p in cuad_dir.iterdir() if p.is_dir()):
        for name in ("train.tsv", "test.tsv"):
            if (task_dir / name).is_file():
                texts.update(row["text"].strip() for row in _read_tsv(task_dir / name) if row.get("text"))
    ordered = sorted(t for t in texts if t)
    return [t for t in ordered if not _held_out(t)], [t for t in ordered if _held_out(t)]


def multiple_choice_rows(cuad_dir: Path, held_out: set[str]) -> list[dict[str, str]]:
    """Zero-shot Yes/No questions, only on held-out clauses (never trained on)."""
    rows = []
    for task in MC_TASKS:
        task_dir = cuad_dir / task
        if not task_dir.is_dir():
            continue
        question = _question(task_dir)
        for row in _read_tsv(task_dir / "test.tsv"):
            text = row["text"].strip()
            if text in held_out:
                rows.append({"prompt": f"{question}\n\nClause: {text}\nLabel:", "label": row["label"].strip(), "task": task})
    return rows


def story_splits(path: Path) -> tuple[list[str], list[str]]:
    """(evaluation stories, pool stories): alternating blank-line-separated stories."""
    stories = [s.strip() for s in path.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    return stories[0::2], stories[1::2]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_data(data_dir: Path, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cuad = data_dir / "legalbench-cuad"
    train_clauses, held_clauses = contract_splits(cuad)
    eval_stories, pool_stories = story_splits(data_dir / "tinystories-val" / "tinystories_val.txt")
    lines = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    return {
        "contracts_train": _write_jsonl(out / "contracts_train.jsonl", [{"text": t} for t in train_clauses]),
        "contracts_heldout": _write_jsonl(out / "contracts_heldout.jsonl", [{"text": t} for t in held_clauses]),
        "contracts_mc": _write_jsonl(out / "contracts_mc.jsonl", multiple_choice_rows(cuad, set(held_clauses))),
        "stories_eval": _write_jsonl(out / "stories_eval.jsonl", [{"text": s} for s in eval_stories]),
        "stories_pool": _write_jsonl(out / "stories_pool.jsonl", [{"text": s} for s in pool_stories]),
        "shakespeare_train": _write_jsonl(out / "shakespeare_train.jsonl", [{"text": "".join(lines[:cut])}]),
        "shakespeare_heldout": _write_jsonl(out / "shakespeare_heldout.jsonl", [{"text": "".join(lines[cut:])}]),
    }


def build_stories_contracts(
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    quick: bool = False,
    with_shakespeare: bool = False,
    **_: object,
) -> Scenario:
    from retain.io import default_cache_dir
    from retain.models.llama2c import ensure_stories260k

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if data_dir is None or not (data_dir / "stories260k").is_dir():
        raise ConfigError(
            "stories-contracts needs the real data (stories260k, tinystories-val, legalbench-cuad, tinyshakespeare): "
            "pass --data-dir PATH (the folder holding them), or set RETAIN_DATA_DIR"
        )
    cache = Path(cache_dir or default_cache_dir())
    base = ensure_stories260k(data_dir, cache)
    paths = write_data(data_dir, cache / "scenarios" / f"stories-contracts-v{SCENARIO_VERSION}")
    windows = 8 if quick else 48
    mc_examples = 24 if quick else 160
    tasks = [
        LossEval(name="stories_loss", data=DataConfig(path=str(paths["stories_eval"]), max_length=256), max_examples=windows),
        NextTokenAccuracyEval(name="stories_next_token", data=DataConfig(path=str(paths["stories_eval"]), max_length=256), max_examples=windows),
        LossEval(name="contracts_loss", role="task", train_task="contracts",
                 data=DataConfig(path=str(paths["contracts_heldout"]), max_length=256), max_examples=windows),
        NextTokenAccuracyEval(name="contracts_next_token", role="task", train_task="contracts",
                              data=DataConfig(path=str(paths["contracts_heldout"]), max_length=256), max_examples=windows),
        MultipleChoiceEval(name="contracts_yes_no", role="task", train_task="contracts",
                           data=DataConfig(path=str(paths["contracts_mc"])), choices=["No", "Yes"], prompt_field="prompt",
                           max_examples=mc_examples, max_length=512),
    ]
    train_tasks = [TaskConfig(name="contracts", data=DataConfig(path=str(paths["contracts_train"]), max_length=256))]
    if with_shakespeare:
        train_tasks.append(TaskConfig(name="shakespeare", data=DataConfig(path=str(paths["shakespeare_train"]), max_length=256)))
        tasks += [
            LossEval(name="shakespeare_loss", role="task", train_task="shakespeare",
                     data=DataConfig(path=str(paths["shakespeare_heldout"]), max_length=256), max_examples=windows),
            NextTokenAccuracyEval(name="shakespeare_next_token", role="task", train_task="shakespeare",
                                  data=DataConfig(path=str(paths["shakespeare_heldout"]), max_length=256), max_examples=windows),
        ]
    stories_eval = [json.loads(line)["text"] for line in paths["stories_eval"].read_text(encoding="utf-8").splitlines()[:8]]
    suite = SuiteConfig(tasks=tasks, sample_prompts=SAMPLE_PROMPTS, probe_prompts=stories_eval, sample_max_new_tokens=40)
    return Scenario(
        name="stories-contracts",
        base_model=str(base),
        tasks=train_tasks,
        suite=suite,
        general_data=DataConfig(path=str(paths["stories_pool"]), max_length=256),
        train={"batch_size": 8 if quick else 16, "lr": 3e-3, "warmup_steps": 5 if quick else 20,
               "steps_per_task": 15 if quick else 300},
        description="stories260K (TinyStories) fine-tuned on CUAD contract clauses"
        + (", then Shakespeare" if with_shakespeare else ""),
    )
