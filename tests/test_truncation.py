"""``data.truncation``: an over-long example keeps what is trained (keep_completion, the default), its
start (right) or its end (left); chats lose their oldest turns first; one warning, never a Python one."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny_tokenizer import CHATML_TEMPLATE, make_tokenizer  # noqa: E402

from retain.config import DataConfig  # noqa: E402
from retain.data import IGNORE_INDEX, tokenize_records  # noqa: E402
from retain.data.chat import drop_oldest_turn  # noqa: E402
from retain.data.tokenize import fit_length  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _labelled(example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


# ---- the pure cut, by hand: ids 0..9 with BOS at 0, labels on 7..9


IDS = list(range(10))
MASK = [False] * 7 + [True] * 3


def test_keep_completion_removes_the_start_of_the_prompt_after_bos():
    assert fit_length(IDS, MASK, 6, "keep_completion", head=1) == ([0, 5, 6, 7, 8, 9], [False, False, False, True, True, True])


def test_keep_completion_cuts_the_completion_end_only_when_it_alone_is_too_long():
    assert fit_length(IDS, MASK, 3, "keep_completion", head=1) == ([0, 7, 8], [False, True, True])


def test_right_keeps_the_start_and_left_keeps_bos_and_the_end():
    assert fit_length(IDS, MASK, 4, "right", head=1) == ([0, 1, 2, 3], [False] * 4)
    assert fit_length(IDS, MASK, 4, "left", head=1) == ([0, 7, 8, 9], [False, True, True, True])
    assert fit_length(IDS, MASK, 4, "left", head=0) == ([6, 7, 8, 9], [False, True, True, True])


def test_short_examples_are_untouched():
    for mode in ("keep_completion", "right", "left"):
        assert fit_length(IDS, MASK, 10, mode, head=1) == (IDS, MASK)


# ---- through tokenization


LONG_PROMPT = {"prompt": "the quick brown fox jumps over the lazy dog " * 4, "completion": " yes"}


def test_a_long_prompt_keeps_its_whole_completion_by_default(tok):
    """Before: the prompt's start was kept, the completion cut off and the example dropped."""
    examples, stats = tokenize_records([LONG_PROMPT], tok, DataConfig(path="d", max_length=12), "d")
    (example,) = examples
    completion = tok(" yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(example) == 12 and example.input_ids[0] == tok.bos_token_id
    assert _labelled(example) == completion and example.input_ids[-len(completion):] == completion
    assert stats.n_truncated == 1 and stats.n_dropped == 0


def test_right_truncation_is_the_old_behaviour_and_drops_it(tok):
    examples, stats = tokenize_records(
        [LONG_PROMPT, {"prompt": "a ", "completion": "b"}], tok, DataConfig(path="d", max_length=12, truncation="right"), "d"
    )
    assert len(examples) == 1 and stats.n_dropped == 1


def test_left_truncation_of_unpacked_text_keeps_the_end(tok):
    text = "the quick brown fox jumps over the lazy dog"
    examples, _ = tokenize_records([{"text": text}], tok, DataConfig(path="d", max_length=5, pack=False, truncation="left"), "d")
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    assert examples[0].input_ids == [tok.bos_token_id] + full[-4:]


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the quick brown fox jumps over the lazy dog"},
        {"role": "assistant", "content": "the lazy dog"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "fine"},
    ]
}


def test_drop_oldest_turn_keeps_the_system_message_and_the_last_reply():
    shorter = drop_oldest_turn(CHAT["messages"])
    assert [m["content"] for m in shorter] == ["be brief", "hello world", "fine"]
    assert drop_oldest_turn(shorter) is None


@pytest.mark.parametrize("template", [None, CHATML_TEMPLATE], ids=["fallback", "chatml"])
def test_a_long_chat_loses_its_oldest_turns_first(template):
    tok = make_tokenizer(template)
    short = {"messages": [CHAT["messages"][0], *CHAT["messages"][3:]]}
    (expected,), _ = tokenize_records([short], tok, DataConfig(path="d", max_length=256), "d")
    (full,), _ = tokenize_records([CHAT], tok, DataConfig(path="d", max_length=256), "d")
    assert len(full) > len(expected)
    (cut,), stats = tokenize_records([CHAT], tok, DataConfig(path="d", max_length=len(expected)), "d")
    assert cut.input_ids == expected.input_ids and cut.labels == expected.labels
    assert stats.n_truncated == 1


def test_the_warning_is_one_log_record_and_no_python_warning(tok, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_records([LONG_PROMPT] * 3, tok, DataConfig(path="d.jsonl", max_length=12), "d.jsonl")
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(messages) == 1
    assert "3 of 3" in messages[0] and "data.truncation: keep_completion" in messages[0]
