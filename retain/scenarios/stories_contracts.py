"""Stories -> contracts on real data: teach stories260K contract language, measure what it forgets.

Splits (documented because replay pools and anchors must never touch scored text):

- Contract clauses: the ``text`` column of every CUAD task's train.tsv and test.tsv, deduplicated
  across tasks (the same clause appears in several), then split by text 90/10 with a hash of the text
  (``sha256(text) % 10 == 0`` is held out). Training uses the 90%; the held-out 10% is scored (loss,
  next-token accuracy) and is the only source of the Yes/No multiple-choice questions, which come from
  every task folder present whose held-out clauses carry both labels (question: the first line of its
  ``base_prompt.txt``).
- TinyStories validation text: split into stories at blank lines; stories at even positions are the
  evaluation half (loss, next-token accuracy, KL probes); odd positions form ``general_data``, the
  pool that replay, distillation anchors and Fisher calibration may use.
- Shakespeare (optional second task): the first 90% of lines train, the last 10% are scored.

Any folder with this layout works (``--data-dir``): ``stories260k/`` (stories260K.bin, tok512.bin),
``legalbench-cuad/<task>/`` (train.tsv and/or test.tsv with ``label``/``text`` columns, base_prompt.txt),
``tinystories-val/tinystories_val.txt`` and, for ``--shakespeare``, ``tinyshakespeare/input.txt``. The
prepared files live in the cache under a folder named by a hash of those input files, so two data
folders never share prepared files, and they are written atomically, so two benches can run at once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

from retain.config import DataConfig, TaskConfig
from retain.errors import ConfigError, DataError
from retain.eval.suite import SuiteConfig
from retain.eval.tasks import LossEval, MultipleChoiceEval, NextTokenAccuracyEval
from retain.scenarios.base import Scenario, default_data_dir, register_scenario

log = logging.getLogger("retain")

SCENARIO_VERSION = 2
LABELS = ("No", "Yes")
SAMPLE_PROMPTS = ["Once upon a time", "One day, a little girl named Lily", "The big dog was"]


def _held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10 == 0


def _read_tsv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 24)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [dict(row) for row in csv.DictReader(handle, delimiter="\t")]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as a UTF-8 TSV file with label and text columns ({err})") from None


def _question(task_dir: Path) -> str | None:
    path = task_dir / "base_prompt.txt"
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    return lines[0].strip() if lines and lines[0].strip() else None


def task_dirs(cuad_dir: Path) -> list[Path]:
    """CUAD task folders: sub-folders holding a train.tsv or a test.tsv."""
    return sorted(p for p in cuad_dir.iterdir() if p.is_dir() and any((p / n).is_file() for n in ("train.tsv", "test.tsv")))


def _text(row: dict[str, str | None]) -> str:
    return (row.get("text") or "").strip()


def contract_splits(cuad_dir: Path) -> tuple[list[str], list[str]]:
    """Unique clause texts across all CUAD tasks, split 90/10 by a hash of the text."""
    texts: set[str] = set()
    for task_dir in task_dirs(cuad_dir):
        for name in ("train.tsv", "test.tsv"):
            if (task_dir / name).is_file():
                texts.update(_text(row) for row in _read_tsv(task_dir / name))
    ordered = sorted(t for t in texts if t)
    return [t for t in ordered if not _held_out(t)], [t for t in ordered if _held_out(t)]


def multiple_choice_rows(cuad_dir: Path, held_out: set[str]) -> list[dict[str, str]]:
    """Zero-shot Yes/No questions, only on held-out clauses (never trained on), from every task folder
    that has a question (base_prompt.txt) and both labels among its held-out test clauses."""
    rows = []
    for task_dir in task_dirs(cuad_dir):
        question = _question(task_dir)
        if question is None or not (task_dir / "test.tsv").is_file():
            continue
        found = [
            {"prompt": f"{question}\n\nClause: {_text(row)}\nLabel:", "label": (row.get("label") or "").strip(), "task": task_dir.name}
            for row in _read_tsv(task_dir / "test.tsv")
            if _text(row) in held_out and (row.get("label") or "").strip() in LABELS
        ]
        if {r["label"] for r in found} == set(LABELS):
            rows += found
    return rows


def story_splits(path: Path) -> tuple[list[str], list[str]]:
    """(evaluation stories, pool stories): alternating blank-line-separated stories."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    return stories[0::2], stories[1::2]


def input_files(data_dir: Path, with_shakespeare: bool) -> list[Path]:
    """Every file the prepared data is made from (what the cache key hashes)."""
    cuad = data_dir / "legalbench-cuad"
    files = [p / n for p in task_dirs(cuad) for n in ("train.tsv", "test.tsv", "base_prompt.txt") if (p / n).is_file()]
    files.append(data_dir / "tinystories-val" / "tinystories_val.txt")
    if with_shakespeare:
        files.append(data_dir / "tinyshakespeare" / "input.txt")
    return files


def check_layout(data_dir: Path, with_shakespeare: bool) -> None:
    """Name every missing piece of the layout at once, before anything is prepared."""
    missing = [str(p) for p in (data_dir / "stories260k" / "stories260K.bin", data_dir / "stories260k" / "tok512.bin",
                                data_dir / "tinystories-val" / "tinystories_val.txt") if not p.is_file()]
    cuad = data_dir / "legalbench-cuad"
    if not cuad.is_dir() or not task_dirs(cuad):
        missing.append(f"{cuad}/<task>/train.tsv or test.tsv")
    if with_shakespeare and not (data_dir / "tinyshakespeare" / "input.txt").is_file():
        missing.append(str(data_dir / "tinyshakespeare" / "input.txt"))
    if missing:
        raise ConfigError(
            f"{data_dir} does not have the stories-contracts layout; missing: {', '.join(missing)}",
            hint="pass --data-dir PATH (the folder holding stories260k/, legalbench-cuad/, tinystories-val/, tinyshakespeare/), "
            "or set RETAIN_DATA_DIR",
        )


def cache_key(data_dir: Path, with_shakespeare: bool) -> str:
    """sha256 over each input file's name (relative to the data folder) and content, and the scenario version."""
    from retain.io import file_sha256

    listing = [(str(p.relative_to(data_dir)), file_sha256(p)) for p in input_files(data_dir, with_shakespeare)]
    payload = json.dumps({"version": SCENARIO_VERSION, "shakespeare": with_shakespeare, "files": listing})
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    from retain.io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


NAMES = ("contracts_train", "contracts_heldout", "contracts_mc", "stories_eval", "stories_pool",
         "shakespeare_train", "shakespeare_heldout")


def write_data(data_dir: Path, out: Path, with_shakespeare: bool = True) -> dict[str, Path]:
    """The prepared JSONL files in ``out``; a folder already complete (its ``manifest.json``) is reused.

    Every file is written atomically (unique temporary name, then a rename), so two processes
    preparing the same folder at once both end with complete, identical files.
    """
    from retain.io import atomic_write_json

    paths = {name: out / f"{name}.jsonl" for name in NAMES}
    if (out / "manifest.json").is_file():
        return {k: v for k, v in paths.items() if v.is_file()}
    cuad = data_dir / "legalbench-cuad"
    train_clauses, held_clauses = contract_splits(cuad)
    if not train_clauses or not held_clauses:
        raise DataError(
            f"{cuad}: {len(train_clauses) + len(held_clauses)} unique clauses give {len(held_clauses)} held out "
            f"and {len(train_clauses)} to train on (about 1 in 10 is held out by a hash of its text); add clauses"
        )
    eval_stories, pool_stories = story_splits(data_dir / "tinystories-val" / "tinystories_val.txt")
    if not pool_stories:
        raise DataError(f"{data_dir / 'tinystories-val' / 'tinystories_val.txt'}: needs at least two stories separated by a blank line")
    written = {
        "contracts_train": _write_jsonl(paths["contracts_train"], [{"text": t} for t in train_clauses]),
        "contracts_heldout": _write_jsonl(paths["contracts_heldout"], [{"text": t} for t in held_clauses]),
        "stories_eval": _write_jsonl(paths["stories_eval"], [{"text": s} for s in eval_stories]),
        "stories_pool": _write_jsonl(paths["stories_pool"], [{"text": s} for s in pool_stories]),
    }
    questions = multiple_choice_rows(cuad, set(held_clauses))
    if questions:
        written["contracts_mc"] = _write_jsonl(paths["contracts_mc"], questions)
    if with_shakespeare:
        lines = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        cut = max(1, int(len(lines) * 0.9))
        written["shakespeare_train"] = _write_jsonl(paths["shakespeare_train"], [{"text": "".join(lines[:cut])}])
        written["shakespeare_heldout"] = _write_jsonl(paths["shakespeare_heldout"], [{"text": "".join(lines[cut:]) or lines[-1]}])
    tasks = sorted({q["task"] for q in questions})
    atomic_write_json(out / "manifest.json", {"data_dir": str(data_dir), "question_tasks": tasks, "files": sorted(written)})
    return written


@register_scenario("stories-contracts")
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
    if data_dir is None:
        raise ConfigError(
            "stories-contracts needs the real data (stories260k, tinystories-val, legalbench-cuad, tinyshakespeare): "
            "pass --data-dir PATH (the folder holding them), or set RETAIN_DATA_DIR"
        )
    check_layout(data_dir, with_shakespeare)
    cache = Path(cache_dir or default_cache_dir())
    base = ensure_stories260k(data_dir, cache)
    prepared = cache / "scenarios" / f"stories-contracts-v{SCENARIO_VERSION}-{cache_key(data_dir, with_shakespeare)[:16]}"
    paths = write_data(data_dir, prepared, with_shakespeare)
    # Every held-out window (603 stories, 526 contracts; a third of each selects, the rest is reported:
    # a retention interval of about +-0.003 on report windows) and 480 Yes/No questions (160/320). One
    # evaluation costs about 10 s on one core (1.9 s with the 48 windows and 160 questions before).
    windows = 24 if quick else None
    mc_examples = 24 if quick else 480
    tasks = [
        LossEval(name="stories_loss", data=DataConfig(path=str(paths["stories_eval"]), max_length=256), max_examples=windows),
        NextTokenAccuracyEval(name="stories_next_token", data=DataConfig(path=str(paths["stories_eval"]), max_length=256), max_examples=windows),
        LossEval(name="contracts_loss", role="task", train_task="contracts",
                 data=DataConfig(path=str(paths["contracts_heldout"]), max_length=256), max_examples=windows),
        NextTokenAccuracyEval(name="contracts_next_token", role="task", train_task="contracts",
                              data=DataConfig(path=str(paths["contracts_heldout"]), max_length=256), max_examples=windows),
    ]
    if "contracts_mc" in paths:
        tasks.append(MultipleChoiceEval(name="contracts_yes_no", role="task", train_task="contracts",
                                        data=DataConfig(path=str(paths["contracts_mc"])), choices=list(LABELS),
                                        prompt_field="prompt", max_examples=mc_examples, max_length=512))
    else:
        log.warning("%s: no CUAD task has both Yes and No among its held-out clauses: no Yes/No questions are scored",
                    data_dir / "legalbench-cuad")
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
        inputs=[str(data_dir), str(prepared)],
        tasks=train_tasks,
        suite=suite,
        general_data=DataConfig(path=str(paths["stories_pool"]), max_length=256),
        train={"batch_size": 8 if quick else 16, "lr": 3e-3, "warmup_steps": 5 if quick else 20,
               "steps_per_task": 15 if quick else 300},
        description="stories260K (TinyStories) fine-tuned on CUAD contract clauses"
        + (", then Shakespeare" if with_shakespeare else ""),
    )
