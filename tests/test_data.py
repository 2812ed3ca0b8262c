"""Data loading, format detection, tokenization with loss masks, splitting and collation."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny_tokenizer import CHATML_TEMPLATE, make_tokenizer  # noqa: E402

from retain.config import DataConfig  # noqa: E402
from retain.data import (  # noqa: E402
    IGNORE_INDEX,
    DataError,
    Example,
    build_task_data,
    collate,
    detect_format,
    ensure_pad_token,
    load_records,
    split_examples,
    tokenize_records,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(CHATML_TEMPLATE)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled(example: Example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


ROWS = [{"text": "hello world"}, {"text": "the lazy dog"}]


# --------------------------------------------------------------------------------------------
# Loading


def _write(kind: str, path: Path) -> Path:
    if kind == "jsonl":
        return write_jsonl(path / "d.jsonl", ROWS)
    if kind == "json":
        (path / "d.json").write_text(json.dumps(ROWS))
    elif kind == "json_data":
        (path / "d.json").write_text(json.dumps({"data": ROWS}))
    elif kind == "json_lines":
        (path / "d.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    elif kind == "csv":
        (path / "d.csv").write_text('text\nhello world\n"the lazy dog"\n')
    elif kind == "tsv":
        (path / "d.tsv").write_text("text\nhello world\nthe lazy dog\n")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path / "d.parquet")
    return next(path.iterdir())


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_data", "json_lines", "csv", "tsv", "parquet"])
def test_each_file_type_loads(tmp_path, kind):
    path = _write(kind, tmp_path)
    records = load_records(DataConfig(path=str(path)))
    assert [dict(r) for r in records] == ROWS
    assert all(str(path) in r.where for r in records)


def test_txt_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n")
    records = load_records(DataConfig(path=str(path), text_field="body"))
    assert records == [{"body": "line one\nline two\n"}]


def test_directory_reads_supported_files_sorted(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "c.jsonl", [{"text": "hidden"}])
    records = load_records(DataConfig(path=str(tmp_path)))
    assert [r["text"] for r in records] == ["first", "second"]


def test_csv_long_field(tmp_path):
    long = "word " * 60000  # beyond csv's default 128 KiB field limit
    (tmp_path / "d.csv").write_text(f'text\n"{long}"\n')
    assert load_records(DataConfig(path=str(tmp_path / "d.csv")))[0]["text"] == long


def test_hub_dataset_via_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = load_records(DataConfig(path="org/name", subset="sub", split="test"))
    assert calls == [("org/name", "sub", "test")]
    assert [dict(r) for r in records] == ROWS


def test_unloadable_name_is_a_data_error(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="neither a local file nor a loadable dataset"):
        load_records(DataConfig(path="nobody/nothing"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found: .*missing.jsonl"):
        load_records(DataConfig(path=str(tmp_path / "missing.jsonl")))


def test_malformed_json_line_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_records(DataConfig(path=str(path)))


@pytest.mark.parametrize("name,content", [("e.jsonl", "\n\n"), ("e.csv", "text\n"), ("e.txt", ""), ("e.json", "[]")])
def test_empty_dataset(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name}: no records"):
        load_records(DataConfig(path=str(tmp_path / name)))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        load_records(DataConfig(path=str(tmp_path / "d.xlsx")))


# --------------------------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize(
    "record,expected",
    [
        ({"messages": [], "text": "x"}, "chat"),
        ({"prompt": "a", "completion": "b", "text": "x"}, "prompt_completion"),
        ({"text": "x", "prompt": "a"}, "text"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format([record], DataConfig(path="d.jsonl")) == expected


def test_detect_format_explicit_and_unknown(tmp_path):
    assert detect_format([{"x": 1}], DataConfig(path="d.jsonl", format="text")) == "text"
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    records = load_records(DataConfig(path=str(path)))
    with pytest.raises(DataError) as err:
        detect_format(records, DataConfig(path=str(path)))
    message = str(err.value)
    assert "d.jsonl:1" in message and "question, answer" in message
    assert "data.text_field" in message and "data.prompt_field" in message and "data.messages_field" in message


# --------------------------------------------------------------------------------------------
# Text


def test_text_packing_full_windows(tok):
    records = [{"text": "the quick brown fox jumps over the lazy dog"}] * 6
    cfg = DataConfig(path="d.jsonl", max_length=16)
    examples, stats = tokenize_records(records, tok, cfg, "d.jsonl")
    doc = tok(records[0]["text"])["input_ids"] + [tok.eos_token_id]
    assert doc[0] == tok.bos_token_id
    stream = doc * 6
    assert len(examples) == len(stream) // 16
    assert all(len(e.input_ids) == 16 and e.labels == e.input_ids for e in examples)
    assert [t for e in examples for t in e.input_ids] == stream[: 16 * len(examples)]
    assert stats.n_examples == len(examples) and stats.n_tokens == 16 * len(examples) and stats.n_truncated == 0


def test_text_packing_keeps_sole_short_window(tok):
    examples, _ = tokenize_records([{"text": "hello"}], tok, DataConfig(path="d", max_length=64), "d")
    assert len(examples) == 1 and examples[0].input_ids[-1] == tok.eos_token_id


def _truncation_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]


def test_text_unpacked_truncates_and_warns_once(tok, caplog):
    records = [{"text": "the quick brown fox jumps over the lazy dog " * 3}] * 2 + [{"text": "hi"}]
    cfg = DataConfig(path="d.jsonl", pack=False, max_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log record only, never also a Python warning
        examples, stats = tokenize_records(records, tok, cfg, "d.jsonl")
    messages = _truncation_messages(caplog)
    assert len(messages) == 1
    assert "2 of 3" in messages[0] and "data.max_length" in messages[0] and "8 tokens" in messages[0]
    assert stats.n_truncated == 2 and [len(e) for e in examples][:2] == [8, 8]


# --------------------------------------------------------------------------------------------
# Prompt / completion


def test_prompt_masking(tok):
    record = {"prompt": "What is two plus two?", "completion": " Four."}
    examples, stats = tokenize_records([record], tok, DataConfig(path="d"), "d")
    ex = examples[0]
    n_prompt = len(tok(record["prompt"])["input_ids"])
    assert ex.input_ids == tok(record["prompt"] + record["completion"])["input_ids"] + [tok.eos_token_id]
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(labelled(ex)) == " Four.</s>"
    assert stats.n_loss_tokens == len(ex) - n_prompt


def test_prompt_boundary_inside_a_token_tokenizes_separately(tok):
    record = {"prompt": "hel", "completion": "lo world"}
    full = tok("hello world")["input_ids"]
    assert full[: len(tok("hel")["input_ids"])] != tok("hel")["input_ids"]  # precondition: merge across
    ex = tokenize_records([record], tok, DataConfig(path="d"), "d")[0][0]
    completion = tok("lo world", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == tok("hel")["input_ids"] + completion
    assert labelled(ex) == completion


def test_no_eos_when_disabled(tok):
    ex = tokenize_records([{"prompt": "a ", "completion": "b"}], tok, DataConfig(path="d", add_eos=False), "d")[0][0]
    assert tok.eos_token_id not in ex.input_ids


def test_all_labels_masked(tok):
    record = {"prompt": "the quick brown fox jumps over the lazy dog " * 4, "completion": "yes"}
    with pytest.raises(DataError, match=r"d\.jsonl: every label is masked.*prompts.*data\.max_length"):
        tokenize_records([record], tok, DataConfig(path="d.jsonl", max_length=8, truncation="right"), "d.jsonl")


def test_unlabelled_examples_are_dropped(tok):
    long = {"prompt": "the quick brown fox jumps over the lazy dog " * 4, "completion": "yes"}
    short = {"prompt": "a ", "completion": "b"}
    examples, stats = tokenize_records([long, short], tok, DataConfig(path="d", max_length=8, truncation="right"), "d")
    assert len(examples) == 1 and stats.n_dropped == 1 and stats.n_records == 2


def test_truncation_warns_once_with_count(tok, caplog):
    long = {"prompt": "a ", "completion": "the quick brown fox jumps over the lazy dog " * 3}
    short = {"prompt": "a ", "completion": "b"}
    _, stats = tokenize_records([long] * 3 + [short] * 2, tok, DataConfig(path="d", max_length=10), "d.jsonl")
    messages = _truncation_messages(caplog)
    assert len(messages) == 1
    assert "3 of 5" in messages[0] and "to 10 tokens" in messages[0] and "data.max_length" in messages[0]
    assert stats.n_truncated == 3


def test_missing_field_names_line_field_and_key(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    records = load_records(DataConfig(path=str(path)))
    with pytest.raises(DataError) as err:
        tokenize_records(records, tok, DataConfig(path=str(path)), str(path))
    message = str(err.value)
    assert "t.jsonl:2" in message and "'completion'" in message
    assert "prompt, answer" in message and "data.completion_field" in message


def test_missing_field_in_csv_names_row(tmp_path, tok):
    path = tmp_path / "t.csv"
    path.write_text("body\nfirst\nsecond\n")
    records = load_records(DataConfig(path=str(path)))
    with pytest.raises(DataError, match=r"t\.csv:2: missing field 'text' .*body.*data\.text_field"):
        tokenize_records(records, tok, DataConfig(path=str(path), format="text"), str(path))


def test_non_string_field(tok):
    with pytest.raises(DataError, match=r"d record 1: field 'completion' must be a string, got int"):
        tokenize_records([{"prompt": "a", "completion": 4}], tok, DataConfig(path="d"), "d")


# --------------------------------------------------------------------------------------------
# Chat

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thank you."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
}


def _labelled_runs(ex: Example) -> list[list[int]]:
    runs, current = [], []
    for label in ex.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_chat_with_template_labels_only_assistant_turns(chat_tok):
    ex = tokenize_records([CONVERSATION], chat_tok, DataConfig(path="d"), "d")[0][0]
    rendered = chat_tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert ex.input_ids == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    runs = [chat_tok.decode(run) for run in _labelled_runs(ex)]
    assert runs == ["Fine, thank you.<|im_end|>", "Four.<|im_end|>"]


def test_chat_without_template_uses_fallback(tok):
    ex = tokenize_records([CONVERSATION], tok, DataConfig(path="d"), "d")[0][0]
    assert ex.input_ids[0] == tok.bos_token_id
    assert tok.decode(ex.input_ids, skip_special_tokens=True).startswith("system: Be brief.\nuser: How are you?\n")
    runs = [tok.decode(run) for run in _labelled_runs(ex)]
    assert runs == ["Fine, thank you.</s>", "Four.</s>"]


def test_chat_template_that_rewrites_history_labels_reply_content():
    # marks only the final message, so incremental renders are not prefixes of the whole
    template = CHATML_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %} END{% endif %}")
    tokenizer = make_tokenizer(template)
    echo = [{"role": "user", "content": "Four."}, {"role": "assistant", "content": "Four."}]
    record = {"messages": CONVERSATION["messages"][:3] + echo}
    ex = tokenize_records([record], tokenizer, DataConfig(path="d"), "d")[0][0]
    assert [tokenizer.decode(r) for r in _labelled_runs(ex)] == ["Fine, thank you.", "Four."]
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert rendered.count("Four.") == 2 and tokenizer.decode(ex.input_ids).endswith("Four. END<|im_end|>\n")
    last_turn = max(i for i, t in enumerate(ex.input_ids) if t == tokenizer.convert_tokens_to_ids("<|im_start|>"))
    assert ex.labels[-1] == IGNORE_INDEX  # " END<|im_end|>\n" is template text, not the reply
    assert [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX][-1] > last_turn


def test_chat_sharegpt_messages(chat_tok):
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    ex = tokenize_records([record], chat_tok, DataConfig(path="d", messages_field="conversations"), "d")[0][0]
    assert [chat_tok.decode(r) for r in _labelled_runs(ex)] == ["hello<|im_end|>"]


def test_chat_without_assistant_turn_is_an_error(chat_tok):
    record = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match="every label is masked.*assistant"):
        tokenize_records([record], chat_tok, DataConfig(path="d"), "d")


def test_chat_bad_message(chat_tok):
    record = {"messages": [{"role": "user", "text": "hi"}]}
    with pytest.raises(DataError, match="message 1 of field 'messages'.*'role' and 'content'"):
        tokenize_records([record], chat_tok, DataConfig(path="d"), "d")


# --------------------------------------------------------------------------------------------
# Splitting and task data


def test_split_examples_deterministic():
    examples = [Example([i], [i]) for i in range(100)]
    train_a, val_a = split_examples(examples, 0.2, seed=1)
    train_b, val_b = split_examples(examples, 0.2, seed=1)
    _, val_c = split_examples(examples, 0.2, seed=2)
    assert val_a == val_b and train_a == train_b
    assert val_a != val_c
    assert len(val_a) == 20 and len(train_a) == 80
    ids = [e.input_ids[0] for e in train_a + val_a]
    assert sorted(ids) == list(range(100))  # no overlap, nothing lost
    assert split_examples(examples, 0.0, seed=1) == (examples, [])


def _prompts(examples: list[Example], tok) -> set[str]:
    masked = ([t for t, label in zip(e.input_ids, e.labels) if label == IGNORE_INDEX] for e in examples)
    return {tok.decode(ids, skip_special_tokens=True) for ids in masked}


def test_build_task_data_splits_records(tmp_path, tok):
    rows = [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(path=str(path), validation_fraction=0.2)
    data = build_task_data(cfg, tok, seed=3)
    assert data.format == "prompt_completion" and data.source == str(path)
    assert len(data.train) == 24 and len(data.validation) == 6
    assert not _prompts(data.train, tok) & _prompts(data.validation, tok)
    again = build_task_data(cfg, tok, seed=3)
    assert again.validation == data.validation
    assert build_task_data(cfg, tok, seed=4).validation != data.validation
    assert data.stats.n_records == 24 and data.validation_stats.n_records == 6


def test_build_task_data_limit(tmp_path, tok):
    rows = [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    data = build_task_data(DataConfig(path=str(path), limit=5), tok, seed=0)
    assert len(data.train) == 5 and data.validation == []
    assert _prompts(data.train, tok) != {f"q{i} " for i in range(5)}  # a seeded sample, not the head


def test_build_task_data_single_document_splits_windows(tmp_path, tok):
    path = tmp_path / "book.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    data = build_task_data(DataConfig(path=str(path), max_length=16, validation_fraction=0.25), tok, seed=0)
    assert data.format == "text" and data.train and data.validation
    assert all(len(e) == 16 for e in data.train + data.validation)


# --------------------------------------------------------------------------------------------
# Batching


def test_collate_pads_right_and_masks():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_requires_pad_id():
    with pytest.raises(ValueError, match="ensure_pad_token"):
        collate([Example([1], [1])], pad_token_id=None)


def test_ensure_pad_token_uses_eos():
    tokenizer = make_tokenizer(pad=False)
    assert tokenizer.pad_token is None
    assert ensure_pad_token(tokenizer) is tokenizer
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    kept = make_tokenizer()
    assert ensure_pad_token(kept).pad_token == "<pad>"


def test_count_scored_tokens_skips_position_zero_and_ignored_labels():
    """The one label count of the loop and the Trainer integration: what the task loss averages over."""
    import torch

    from retain.data import count_scored_tokens
    from retain.train.loop import label_tokens

    examples = [Example([1, 2, 3, 4], [1, IGNORE_INDEX, 3, 4]), Example([5, 6], [5, 6])]
    labels = collate(examples, 0)["labels"]
    assert int(count_scored_tokens(labels)) == sum(e.n_loss_tokens for e in examples) == 3
    assert int(count_scored_tokens(torch.tensor([7, IGNORE_INDEX, 8]))) == 1
    assert label_tokens is count_scored_tokens
