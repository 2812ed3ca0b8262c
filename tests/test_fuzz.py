"""Fuzzed inputs: arbitrary bytes, JSON values, CSV/TSV text, YAML mappings and ``--set`` strings either
load or raise the project's DataError / ConfigError naming the file (line, field) or key; never another
exception. Bounded example counts keep the whole file to a few seconds."""

from __future__ import annotations

import io
import json
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retain.config import DataConfig, load_config, load_config_dict
from retain.data import DataError, load_records, tokenize_records
from retain.data.chat import normalize_messages
from retain.errors import ConfigError
from retain.models.tiny import char_tokenizer

FAST = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
records_like = st.lists(
    st.dictionaries(
        st.sampled_from(["text", "prompt", "completion", "messages", "other", ""]),
        json_values | st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), json_values, max_size=3), max_size=3),
        max_size=4,
    ),
    max_size=5,
)
cells = st.text(alphabet=string.printable + "é\u2028\x00", max_size=12)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _write(folder: Path, name: str, content: bytes | str) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


def _loads_or_data_error(cfg: DataConfig, named: Path) -> list[dict[str, Any]] | None:
    try:
        return load_records(cfg)
    except DataError as err:
        assert str(named) in str(err), f"the error does not name {named}: {err}"
        return None


# ---- every reader, arbitrary bytes


@FAST
@given(content=st.binary(max_size=200), suffix=st.sampled_from(SUFFIXES))
def test_any_bytes_in_any_data_file(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), "data" + suffix, content)
        _loads_or_data_error(DataConfig(path=str(path)), path)


@FAST
@given(value=json_values)
def test_any_json_value_as_json_and_jsonl(value: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, text in (("d.json", json.dumps(value)), ("d.jsonl", json.dumps(value) + "\n" + json.dumps(value))):
            path = _write(Path(folder), name, text)
            records = _loads_or_data_error(DataConfig(path=str(path)), path)
            assert records is None or all(isinstance(r, dict) for r in records)


@FAST
@given(rows=st.lists(st.lists(cells, max_size=4), max_size=5), delimiter=st.sampled_from([",", "\t"]), quote=st.booleans())
def test_any_csv_or_tsv_text(rows: list[list[str]], delimiter: str, quote: bool) -> None:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, quoting=csv.QUOTE_ALL if quote else csv.QUOTE_MINIMAL)
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), "d.tsv" if delimiter == "\t" else "d.csv", buffer.getvalue())
        records = _loads_or_data_error(DataConfig(path=str(path)), path)
        assert records is None or all(isinstance(r, dict) and None not in r for r in records)


@FAST
@given(files=st.dictionaries(st.sampled_from(["a.jsonl", "b.csv", "sub/c.txt", ".hidden.jsonl", "d.md"]), st.binary(max_size=80), max_size=4))
def test_any_folder_of_files(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        root.mkdir()
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        try:
            load_records(DataConfig(path=str(root)))
        except DataError as err:
            assert str(root) in str(err)


@FAST
@given(rows=st.lists(st.dictionaries(st.sampled_from(["text", "prompt", "x"]), st.one_of(st.text(max_size=10), st.integers(), st.none()), max_size=3), min_size=1, max_size=4))
def test_any_parquet_table(rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.parquet"
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return  # not a table pyarrow can write; nothing to read
        pq.write_table(table, path)
        _loads_or_data_error(DataConfig(path=str(path)), path)


# ---- chat normalization and tokenization of whatever records a file holds


@FAST
@given(value=json_values | st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), json_values, max_size=3), max_size=4))
def test_any_messages_value(value: Any) -> None:
    try:
        messages = normalize_messages(value, "chat.jsonl:3", "messages")
    except DataError as err:
        assert "chat.jsonl:3" in str(err)
        return
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)


@FAST
@given(records=records_like, fmt=st.sampled_from(["auto", "text", "prompt_completion", "chat"]),
       max_length=st.integers(2, 24), truncation=st.sampled_from(["keep_completion", "right", "left"]), pack=st.booleans())
def test_any_records_tokenize_or_name_the_record(tokenizer, records, fmt, max_length, truncation, pack) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), "d.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        cfg = DataConfig(path=str(path), format=fmt, max_length=max_length, truncation=truncation, pack=pack)
        loaded = _loads_or_data_error(cfg, path)
        if loaded is None:
            return
        try:
            examples, stats = tokenize_records(loaded, tokenizer, cfg, str(path))
        except DataError as err:
            assert str(path) in str(err)
            return
        assert examples and all(0 < len(e) <= max_length and len(e.labels) == len(e) for e in examples)
        assert stats.n_examples == len(examples)


# ---- the config: YAML files and --set strings

keys = st.sampled_from(["model", "tasks", "strategies", "train", "eval", "output", "checkpoint", "general_data", "name_or_path",
                        "lr", "path", "data", "name", "steps", "suite", "dir", 1, True])
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=14,
)


def _config_or_error(path: Path) -> None:
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in str(err), f"the error does not name {path}: {err}"


@FAST
@given(mapping=st.dictionaries(keys, yaml_values, max_size=6))
def test_any_yaml_mapping_as_a_run_config(mapping: dict[Any, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        _config_or_error(_write(Path(folder), "run.yaml", yaml.safe_dump(mapping, allow_unicode=True)))


@FAST
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_a_run_config(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        _config_or_error(_write(Path(folder), "run.yaml", content))


VALID = {"model": {"name_or_path": "m"}, "tasks": [{"name": "t", "data": {"path": "d.jsonl"}}], "strategies": ["full", {"name": "lora", "r": 4}]}
set_keys = st.sampled_from(["train.lr", "model.name_or_path", "model.name_or_path.x", "tasks[0].data.path", "tasks[3].name", "tasks.x",
                            "strategies[1].r", "strategies[5]", "strategies.lora.r", "train", "train.lr.x", "", ".", "[0]", "a..b",
                            "tasks[0].name.first", "train.betas[0]", "strategies[0].name.x", "strategies[1].r.x", "strategies[1].r[0]",
                            "tasks[0].data", "tasks[0].data.path.x", "model", "model[0]", "strategies[1][0]", "tasks[-1].name"])
set_values = st.text(max_size=12) | st.sampled_from(["1e-4", "[1, 2]", "{a: 1}", "null", "- x", ": :", "'", "&a", "*a", "!!python/none"])


@FAST
@given(items=st.lists(st.tuples(set_keys | st.text(max_size=10), set_values), max_size=3), bare=st.booleans())
def test_any_set_strings(items: list[tuple[str, str]], bare: bool) -> None:
    overrides = [key if bare else f"{key}={value}" for key, value in items]
    try:
        load_config_dict(json.loads(json.dumps(VALID)), overrides, source="run.yaml")
    except ConfigError as err:
        assert "--set" in str(err) or "run.yaml" in str(err), str(err)


@pytest.mark.parametrize("name, text", [("a.json", "[" * 100_000), ("b.jsonl", '{"text": "x"}\n' + "[" * 100_000 + "\n"),
                                        ("run.yaml", "model: " + "[" * 5_000 + "]" * 5_000)])
def test_deeply_nested_input_is_refused_by_name(tmp_path: Path, name: str, text: str) -> None:
    """Depths hypothesis does not reach: the parsers' RecursionError becomes the project's error."""
    path = _write(tmp_path, name, text)
    if name.endswith(".yaml"):
        with pytest.raises(ConfigError, match=f"{path}: nested too deeply"):
            load_config(path)
    else:
        with pytest.raises(DataError, match=f"{path}(:2)?: JSON nested too deeply"):
            load_records(DataConfig(path=str(path)))


suite_keys = st.sampled_from(["tasks", "name", "type", "data", "path", "role", "train_task", "choices", "max_examples",
                              "sample_prompts", "probe_prompts", "loss", "multiple_choice", "generation", 0])


@FAST
@given(mapping=st.dictionaries(suite_keys, st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(suite_keys, inner, max_size=4), max_leaves=12), max_size=4))
def test_any_yaml_mapping_as_an_eval_suite(mapping: dict[Any, Any]) -> None:
    from retain.eval.suite import load_suite

    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), "suite.yaml", yaml.safe_dump(mapping, allow_unicode=True))
        try:
            load_suite(path)
        except ConfigError as err:
            assert str(path) in str(err), str(err)
