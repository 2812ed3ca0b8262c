"""``retain bench stories-contracts --data-dir D`` works on any folder with the layout: other CUAD task
folders (the Yes/No tasks are picked from those present), other stories; prepared files are cached
under a hash of the inputs, so two data folders never share them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retain.cli import app
from retain.errors import ConfigError
from retain.results.schema import Results
from retain.scenarios.stories_contracts import _held_out, build_stories_contracts, multiple_choice_rows

runner = CliRunner()

STORIES = [
    "Once upon a time, there was a little cat. The cat liked to play in the sun.",
    "Tom had a big red ball. He threw it to his friend Sue, and they laughed.",
    "The dog was sad because it rained. Then the sun came out and the dog was happy.",
    "Lily found a shiny stone in the park. She gave it to her mom.",
]


def _clauses(n: int, held: bool, start: int = 0) -> list[str]:
    """``n`` clause texts that the scenario's hash holds out (``held``) or trains on."""
    found, i = [], start
    while len(found) < n:
        text = f"The Licensee shall maintain insurance and keep records number {i} for the term of this Agreement."
        if _held_out(text) == held:
            found.append(text)
        i += 1
    return found


def _task(root: Path, name: str, rows: list[tuple[str, str]], question: str | None) -> None:
    folder = root / "legalbench-cuad" / name
    folder.mkdir(parents=True)
    table = "label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows)
    (folder / "test.tsv").write_text(table)
    (folder / "train.tsv").write_text("label\ttext\n" + "".join(f"Yes\t{t}\n" for t in _clauses(12, False, start=sum(map(ord, name)) * 100)))
    if question is not None:
        (folder / "base_prompt.txt").write_text(f"{question}\n\nClause: example\nLabel: Yes\n")


def make_data_dir(root: Path, shared: Path, stories: list[str]) -> Path:
    """A small folder in the benchmark's layout; stories260k is a link to the real model files."""
    root.mkdir(parents=True)
    (root / "stories260k").symlink_to(shared / "stories260k")
    held = _clauses(6, True)
    trained = _clauses(6, False)
    _task(root, "cuad_both_labels", [("Yes", held[0]), ("No", held[1]), ("Yes", held[2]), ("No", trained[0])], "Is there an insurance clause?")
    _task(root, "cuad_one_label", [("Yes", held[3]), ("Yes", held[4]), ("No", trained[1])], "Is there a cap?")
    _task(root, "cuad_no_question", [("Yes", held[5]), ("No", held[0])], None)
    (root / "tinystories-val").mkdir()
    (root / "tinystories-val" / "tinystories_val.txt").write_text("\n\n".join(stories * 4) + "\n")
    return root


def test_questions_come_from_the_tasks_present_with_both_labels(data_dir: Path, tmp_path: Path) -> None:
    root = make_data_dir(tmp_path / "d", data_dir, STORIES)
    rows = multiple_choice_rows(root / "legalbench-cuad", set(_clauses(6, True)))
    assert {r["task"] for r in rows} == {"cuad_both_labels"}
    assert sorted(r["label"] for r in rows) == ["No", "Yes", "Yes"]
    assert rows[0]["prompt"].startswith("Is there an insurance clause?\n\nClause: ")


def test_the_real_data_uses_every_task_with_both_labels(data_dir: Path) -> None:
    from retain.scenarios.stories_contracts import contract_splits

    _, held = contract_splits(data_dir / "legalbench-cuad")
    tasks = {r["task"] for r in multiple_choice_rows(data_dir / "legalbench-cuad", set(held))}
    assert len(tasks) > 4 and "cuad_insurance" in tasks  # before: four hard-coded names


def test_two_data_folders_never_share_prepared_files(data_dir: Path, tmp_path: Path) -> None:
    first = make_data_dir(tmp_path / "a", data_dir, STORIES)
    second = make_data_dir(tmp_path / "b", data_dir, STORIES[::-1])
    cache = tmp_path / "cache"
    one = build_stories_contracts(first, cache_dir=cache, quick=True)
    two = build_stories_contracts(second, cache_dir=cache, quick=True)
    one_pool, two_pool = Path(one.general_data.path), Path(two.general_data.path)
    assert one_pool.parent != two_pool.parent and one_pool.read_text() != two_pool.read_text()
    again = build_stories_contracts(tmp_path / "a", cache_dir=cache, quick=True)  # same inputs: the same folder
    assert Path(again.general_data.path).parent == one_pool.parent
    manifest = json.loads((one_pool.parent / "manifest.json").read_text())
    assert manifest["question_tasks"] == ["cuad_both_labels"]
    assert [t.name for t in one.suite.tasks][-1] == "contracts_yes_no"


def test_two_processes_preparing_the_same_folder_both_end_complete(data_dir: Path, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from retain.scenarios.stories_contracts import write_data

    root = make_data_dir(tmp_path / "d", data_dir, STORIES)
    out = tmp_path / "prepared"
    with ThreadPoolExecutor(4) as pool:
        written = list(pool.map(lambda _: write_data(root, out, with_shakespeare=False), range(4)))
    assert all(w.keys() == written[0].keys() for w in written)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{k}.jsonl" for k in written[0]), "manifest.json"])  # no temporaries


def test_a_folder_without_the_layout_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "legalbench-cuad").mkdir()
    with pytest.raises(ConfigError, match=r"missing: .*stories260K.bin.*tinystories_val.txt.*legalbench-cuad/<task>"):
        build_stories_contracts(tmp_path, cache_dir=tmp_path / "cache")


def test_bench_runs_on_a_small_folder_in_the_layout(data_dir: Path, tmp_path: Path) -> None:
    root = make_data_dir(tmp_path / "mine", data_dir, STORIES)
    out = tmp_path / "bench"
    result = runner.invoke(app, [
        "bench", "stories-contracts", "--data-dir", str(root), "--quick", "--steps", "2", "--strategies", "full",
        "--out", str(out),
    ], env={"RETAIN_DEBUG": ""})
    assert result.exit_code == 0, result.output
    results = Results.load(out / "results.json")
    scores = results.runs[0].records[-1].scores
    assert scores["contracts_yes_no"].n == 3 and "contracts_loss" in scores and "stories_loss" in scores
