"""Rendering chat records to text, with the character spans of the assistant turns to train on.

With a tokenizer that has a ``chat_template`` the conversation is rendered by
``tokenizer.apply_chat_template``. Each assistant turn's span is found by rendering incremental
prefixes: the conversation up to that turn with the generation prompt (where the reply starts) and
the conversation including that turn (where it ends, trailing whitespace excluded). Labels thus
cover the reply and the template's end-of-turn marker, which teaches the model to stop; the
template, not ``data.add_eos``, decides the turn terminators. Templates that rewrite earlier turns
(so prefixes do not line up) fall back to labelling the reply content as found in the full text.

Without a chat template a plain fallback is used, one line per message::

    user: How are you?
    assistant: Fine.</s>

i.e. ``"<role>: <content>\\n"``, with the EOS token after each assistant reply when
``data.add_eos`` is set (so generation can stop); the generation prompt is ``"assistant: "``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from retain.data.records import DataError

ASSISTANT = "assistant"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class RenderedChat:
    """A conversation as text, the spans to label, and whether the tokenizer adds its own specials."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool


def _message(raw: Any, where: str, field: str, index: int) -> dict[str, str]:
    """One message as ``{role, content}``; ShareGPT ``{from, value}`` messages are accepted too."""
    if isinstance(raw, dict) and "role" not in raw and isinstance(raw.get("from"), str):
        raw = {"role": _SHAREGPT_ROLES.get(raw["from"], raw["from"]), "content": raw.get("value")}
    if not isinstance(raw, dict) or not isinstance(raw.get("role"), str) or not isinstance(raw.get("content"), str):
        shown = repr(raw)[:80]
        raise DataError(
            f"{where}: message {index} of field '{field}' must be an object with string 'role' and "
            f"'content' (got {shown}). Fix the record or set data.messages_field to the right field."
        )
    return {"role": raw["role"], "content": raw["content"]}


def normalize_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field '{field}' must be a list of messages, got {type(value).__name__}. "
            "Fix the record or set data.messages_field to the field that holds the conversation."
        )
    return [_message(raw, where, field, i) for i, raw in enumerate(value, start=1)]


def drop_oldest_turn(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The conversation without its oldest turn (leading system messages stay, and it restarts at a
    non-assistant turn), or None when that would leave no assistant turn to train on."""
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    rest = messages[system + 1 :]
    while rest and rest[0]["role"] == ASSISTANT:
        rest = rest[1:]
    if not any(m["role"] == ASSISTANT for m in rest):
        return None
    return messages[:system] + rest


# --------------------------------------------------------------------------------------------
# Fallback template


def render_fallback(messages: list[dict[str, str]], eos_token: str | None) -> RenderedChat:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for message in messages:
        head = f"{message['role']}: "
        body = message["content"]
        if message["role"] == ASSISTANT:
            body += eos_token or ""
            spans.append((position + len(head), position + len(head) + len(body)))
        part = head + body + "\n"
        parts.append(part)
        position += len(part)
    return RenderedChat("".join(parts), spans, add_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Tokenizer chat template

Render = Callable[[list[dict[str, str]], bool], str]


def _try_render(render: Render, messages: list[dict[str, str]], generation_prompt: bool) -> str | None:
    try:
        return render(messages, generation_prompt)
    except Exception:  # templates raise on partial conversations (e.g. must end with user)
        return None


def _prefix_span(
    render: Render, messages: list[dict[str, str]], i: int, full: str, cursor: int
) -> tuple[int, int] | None:
    """Span of assistant turn ``i`` from incremental renders, or None if they do not line up."""
    before = _try_render(render, messages[:i], True)
    through = _try_render(render, messages[: i + 1], False)
    if before is None or through is None or not full.startswith(through) or not through.startswith(before):
        return None
    start, end = len(before), len(through.rstrip())
    return (start, end) if start >= cursor and end > start else None


def _content_span(content: str, full: str, cursor: int) -> tuple[int, int] | None:
    start = full.find(content, cursor)
    return None if start < 0 or not content else (start, start + len(content))


def render_template(messages: list[dict[str, str]], tokenizer: Any, where: str) -> RenderedChat:
    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        full = render(messages, False)
    except Exception as err:
        raise DataError(
            f"{where}: the tokenizer's chat template failed on this conversation ({type(err).__name__}: {err}). "
            "Fix the conversation (roles/order the template expects) or use a tokenizer with another template."
        ) from None
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            # move past this message so a reply is never matched inside an earlier user turn
            found = full.find(message["content"], cursor)
            cursor = found + len(message["content"]) if found >= 0 else cursor
            continue
        span = _prefix_span(render, messages, i, full, cursor) or _content_span(message["content"], full, cursor)
        if span is None:
            if message["content"]:
                raise DataError(
                    f"{where}: cannot locate assistant message {i + 1} in the chat template's output; "
                    "the template seems to rewrite assistant turns. Use a different tokenizer/template."
                )
            continue
        spans.append(span)
        cursor = span[1]
    return RenderedChat(full, spans, add_special_tokens=False)


def render_chat(messages: list[dict[str, str]], tokenizer: Any, add_eos: bool, where: str) -> RenderedChat:
    """Render with the tokenizer's chat template when it has one, else with the plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        return render_template(messages, tokenizer, where)
    return render_fallback(messages, tokenizer.eos_token if add_eos else None)
