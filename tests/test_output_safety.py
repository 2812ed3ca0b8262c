"""Nothing is replaced unless asked: every command that writes refuses a non-empty output without
``--overwrite``, and an output that is, holds or is inside one of its inputs even with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retain.cli import app
from retain.errors import OutputError
from retain.io import prepare_output
from retain.models.tiny import char_tokenizer, tiny_model

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"RETAIN_DEBUG": ""})


# ---- the helper


def test_a_non_empty_folder_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    prepare_output(out)  # empty: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"out is not empty \(it holds notes.txt") as raised:
        prepare_output(out)
    assert "--overwrite" in (raised.value.hint or "")
    assert prepare_output(out, overwrite=True) == out and (out / "notes.txt").is_file()  # the caller replaces


@pytest.mark.parametrize("relation", ["is", "contains", "is inside"])
def test_an_input_is_never_an_output_even_with_overwrite(tmp_path: Path, relation: str) -> None:
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = {"is": model, "contains": tmp_path / "models", "is inside": model / "merged"}[relation]
    with pytest.raises(OutputError, match=f"it {relation} {model}, an input"):
        prepare_output(out, overwrite=True, inputs=["hub/name-that-is-no-path", model])


def test_inputs_are_compared_through_symlinks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(OutputError, match="it is inside"):
        prepare_output(tmp_path / "link" / "run", overwrite=True, inputs=[data])
    with pytest.raises(OutputError, match="it is"):
        prepare_output(data, overwrite=True, inputs=[tmp_path / "link"])


def test_an_existing_file_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "scores.json"
    prepare_output(target, kind="file")
    target.write_text("{}")
    with pytest.raises(OutputError, match="already exists"):
        prepare_output(target, kind="file")
    prepare_output(target, kind="file", overwrite=True)
    with pytest.raises(OutputError, match="it is .*an input"):
        prepare_output(target, kind="file", overwrite=True, inputs=[target])


# ---- retain merge


@pytest.fixture(scope="module")
def merge_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base with a provenance file (as an import has), a tuned full model and two LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge-safety")
    tokenizer = char_tokenizer()
    paths = {}
    for name, seed in (("base", 0), ("tuned", 1)):
        tiny_model("llama", len(tokenizer), seed=seed, hidden=16, layers=1, heads=2).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    (root / "base" / "retain_import.json").write_text('{"format": "test"}')
    for name, seed in (("a1", 2), ("a2", 3)):
        model = tiny_model("llama", len(tokenizer), seed=0, hidden=16, layers=1, heads=2)
        import torch

        torch.manual_seed(seed)
        lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lora.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _copy(model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / model.name
    shutil.copytree(model, copy)
    return copy


def test_merge_refuses_to_write_over_its_base_even_with_overwrite(merge_models: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(merge_models["base"], tmp_path)
    before = sorted(p.name for p in base.iterdir())
    for extra in ([], ["--overwrite"]):
        result = invoke("merge", base, merge_models["tuned"], "--alpha", "0.5", "--out", base, *extra)
        assert result.exit_code == 2, result.output
        assert f"it is {base}, an input" in result.output
    assert sorted(p.name for p in base.iterdir()) == before and (base / "retain_import.json").is_file()
    inside = invoke("merge", base, merge_models["tuned"], "--out", base / "merged", "--overwrite")
    assert inside.exit_code == 2 and "it is inside" in inside.output


def test_merge_keeps_a_folder_with_notes_unless_overwrite(merge_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = invoke("merge", merge_models["base"], merge_models["tuned"], "--out", out)
    assert refused.exit_code == 2 and "not empty" in refused.output and (out / "notes.txt").read_text() == "mine"
    replaced = invoke("merge", merge_models["base"], merge_models["tuned"], "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()


def test_alpha_outside_zero_one_needs_the_extrapolation_flag(merge_models: dict[str, Path], tmp_path: Path) -> None:
    for alpha in ("1.7", "-0.2", "0,0.5,1.5", "nan"):
        result = invoke("merge", merge_models["base"], merge_models["tuned"], "--alpha", alpha, "--out", tmp_path / "m")
        assert result.exit_code == 2 and "must be in [0, 1]" in result.output and "--allow-extrapolation" in result.output
        assert not (tmp_path / "m").exists()
    ok = invoke("merge", merge_models["base"], merge_models["tuned"], "--alpha", "1.5", "--allow-extrapolation", "--out", tmp_path / "m")
    assert ok.exit_code == 0, ok.output
    assert "WiSE-FT interpolation -0.5 x base + 1.5 x" in ok.output.replace("\n", "")


def test_merge_says_what_it_wrote(merge_models: dict[str, Path], tmp_path: Path) -> None:
    ties = invoke("merge", merge_models["base"], merge_models["a1"], merge_models["a2"], "--method", "ties", "--out", tmp_path / "t")
    assert ties.exit_code == 0, ties.output
    said = " ".join(ties.output.split())
    assert "ties merge of 2 adapters (density 0.5), its update scaled by alpha 0.5" in said
    assert "alpha 0.5 model" not in said
    one = invoke("merge", merge_models["base"], merge_models["a1"], "--alpha", "0.3", "--out", tmp_path / "one")
    assert "a LoRA adapter:" in " ".join(one.output.split()) and "scaled by alpha 0.3 (WiSE-FT)" in " ".join(one.output.split())


# ---- retain train


def _run_yaml(tmp_path: Path, model: Path, data: Path, out: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: '{model}'}}\ntasks: [{{name: t, data: {{path: '{data}', max_length: 16}}}}]\n"
        f"train: {{steps_per_task: 2, batch_size: 2, progress: false}}\noutput: {{dir: '{out}'}}\n"
    )
    return config


def test_train_refuses_an_unrelated_non_empty_output_dir(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = _run_yaml(tmp_path, tiny_model_dir, text_file, out)
    refused = invoke("train", config)
    assert refused.exit_code == 2 and "holds no retain run" in refused.output and "--overwrite" in refused.output
    assert (out / "notes.txt").read_text() == "mine"
    assert invoke("train", config, "--resume").exit_code == 2  # --resume does not adopt a foreign folder
    done = invoke("train", config, "--overwrite")
    assert done.exit_code == 0, done.output
    assert not (out / "notes.txt").exists() and (out / "final" / "config.json").is_file()
    again = invoke("train", config)
    assert again.exit_code == 2 and "--resume to continue it, --overwrite to start again" in again.output
    assert invoke("train", config, "--overwrite", "--resume").exit_code == 2


def test_train_never_writes_into_its_own_inputs(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(text_file, data_dir / "train.jsonl")
    config = _run_yaml(tmp_path, tiny_model_dir, data_dir, data_dir / "run")
    result = invoke("train", config, "--overwrite")
    assert result.exit_code == 2 and f"it is inside {data_dir}" in result.output, result.output
    config = _run_yaml(tmp_path, tiny_model_dir, text_file, tmp_path)  # output.dir holds the data file
    result = invoke("train", config, "--overwrite")
    assert result.exit_code == 2 and "contains" in result.output and text_file.is_file()


# ---- report, eval, importance, bench


def _results(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema_version": "1.0", "base_model": "m", "runs": []}))
    return path


def test_report_rewrites_its_own_page_but_not_a_named_file(tmp_path: Path) -> None:
    results = _results(tmp_path)
    (tmp_path / "report.html").write_text("old")
    assert invoke("report", results).exit_code == 0 and (tmp_path / "report.html").read_text() != "old"
    mine = tmp_path / "mine.html"
    mine.write_text("mine")
    refused = invoke("report", results, "--out", mine)
    assert refused.exit_code == 2 and "already exists" in refused.output and mine.read_text() == "mine"
    assert invoke("report", results, "--out", mine, "--overwrite").exit_code == 0 and mine.read_text() != "mine"
    onto = invoke("report", results, "--out", results, "--overwrite")
    assert onto.exit_code == 2 and "an input" in onto.output and json.loads(results.read_text())["runs"] == []


def test_eval_and_importance_refuse_an_existing_out(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks:\n  - {{name: g, type: loss, data: {{path: '{text_file}', max_length: 16}}, max_examples: 2}}\n")
    taken = tmp_path / "taken.json"
    taken.write_text("mine")
    result = invoke("eval", tiny_model_dir, "--suite", suite, "--out", taken)
    assert result.exit_code == 2 and "already exists" in result.output and taken.read_text() == "mine"
    result = invoke("eval", tiny_model_dir, "--suite", suite, "--out", suite, "--overwrite")
    assert result.exit_code == 2 and "an input" in result.output
    result = invoke("importance", "compute", "--model", tiny_model_dir, "--data", text_file, "--out", taken)
    assert result.exit_code == 2 and "already exists" in result.output and taken.read_text() == "mine"
    result = invoke("importance", "compute", "--model", tiny_model_dir, "--data", text_file, "--out", text_file, "--overwrite")
    assert result.exit_code == 2 and "an input" in result.output


def _held_out(path: Path) -> Path:
    """Eval text disjoint from the training file (the overlap guard refuses scoring what is trained)."""
    path.write_text("".join(json.dumps({"text": f"a held-out sentence, number {i}, about a quiet river."}) + "\n"
                            for i in range(8)))
    return path


def test_bench_refuses_a_non_empty_out_and_its_data_folder(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from retain.config import DataConfig, TaskConfig
    from retain.eval.suite import SuiteConfig
    from retain.eval.tasks import LossEval
    from retain.scenarios.base import Scenario
    from retain.scenarios.bench import run_bench

    data = tmp_path / "data"
    data.mkdir()
    text_file = Path(shutil.copy(text_file, data / "train.jsonl"))
    held = _held_out(data / "held.jsonl")
    scenario = Scenario(
        name="tiny", base_model=str(tiny_model_dir), inputs=[str(data)],
        tasks=[TaskConfig(name="t", data=DataConfig(path=str(text_file), max_length=16))],
        suite=SuiteConfig(tasks=[LossEval(name="g", data=DataConfig(path=str(held), max_length=16), max_examples=2)]),
        general_data=None, train={"steps_per_task": 1, "batch_size": 2},
    )
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text("earlier results")
    with pytest.raises(OutputError, match="not empty"):
        run_bench(scenario, ["full"], out=out, progress=False)
    assert (out / "results.json").read_text() == "earlier results"
    with pytest.raises(OutputError, match="an input"):
        run_bench(scenario, ["full"], out=data / "bench", progress=False, overwrite=True)
    results = run_bench(scenario, ["full"], out=out, progress=False, overwrite=True)
    assert [r.name for r in results.runs] == ["full"] and (out / "results.json").read_text() != "earlier results"


def test_rerunning_the_same_bench_replaces_only_its_own_results(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """`retain demo` twice works (its folder holds only its own results); a note beside them stops it."""
    from retain.config import DataConfig, TaskConfig
    from retain.eval.suite import SuiteConfig
    from retain.eval.tasks import LossEval
    from retain.scenarios.base import Scenario
    from retain.scenarios.bench import run_bench

    held = _held_out(tmp_path / "held.jsonl")
    scenario = Scenario(
        name="tiny", base_model=str(tiny_model_dir),
        tasks=[TaskConfig(name="t", data=DataConfig(path=str(text_file), max_length=16))],
        suite=SuiteConfig(tasks=[LossEval(name="g", data=DataConfig(path=str(held), max_length=16), max_examples=2)]),
        general_data=None, train={"steps_per_task": 1, "batch_size": 2},
    )
    out = tmp_path / "bench"
    first = run_bench(scenario, ["full"], out=out, progress=False)
    second = run_bench(scenario, ["lora"], out=out, progress=False)  # same scenario: its own results are replaced
    assert [r.name for r in first.runs] == ["full"] and [r.name for r in second.runs] == ["lora"]
    assert not (out / "runs" / "full").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        run_bench(scenario, ["full"], out=out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
