"""Type ``multiple_choice``: pick the choice with the highest log p(delimiter + choice | prompt)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from retain.errors import ConfigError, DataError
from retain.eval.tasks.base import SharedWork, TaskResult, register_eval_type
from retain.eval.tasks.inputs import PromptedEval
from retain.results.schema import ItemScores
from retain.eval.tasks.loglikelihood import continuation_logprobs, encode_pair
from retain.eval.tasks.scoring import model_max_length

Normalize = Literal["none", "token", "char"]
Pair = tuple[list[int], list[int]]
_NORM_METRIC = {"none": "accuracy", "token": "accuracy_norm_token", "char": "accuracy_norm_char"}


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice question: ``label`` indexes ``choices``."""

    prompt: str
    choices: list[str]
    label: int


def resolve_label(label: Any, choices: Sequence[str]) -> int:
    """An index, or the choice string itself (exact, then whitespace-insensitive), as an index."""
    if isinstance(label, bool):
        label = str(label)
    if isinstance(label, int):
        if not 0 <= label < len(choices):
            raise ValueError(f"label index {label} out of range for {len(choices)} choices")
        return label
    text = str(label)
    for candidates in (list(choices), [c.strip() for c in choices]):
        if text in candidates or text.strip() in candidates:
            return candidates.index(text if text in candidates else text.strip())
    if text.strip().isdigit():
        return resolve_label(int(text.strip()), choices)
    raise ValueError(f"label {label!r} is neither a choice {list(choices)} nor an index")


def _as_example(item: ChoiceExample | Mapping[str, Any]) -> ChoiceExample:
    if isinstance(item, ChoiceExample):
        return item
    choices = [str(c) for c in item["choices"]]
    return ChoiceExample(str(item["prompt"]), choices, resolve_label(item["label"], choices))


def choice_pairs(tokenizer: Any, example: ChoiceExample, target_delimiter: str = " ") -> list[Pair]:
    """(context, continuation) token ids of each choice of one question."""
    return [encode_pair(tokenizer, example.prompt, target_delimiter + choice) for choice in example.choices]


def choice_predictions(lls: Sequence[float], example: ChoiceExample, n_tokens: Sequence[int], normalize: Normalize) -> int:
    """Index of the best choice (first on ties) under the chosen length normalisation."""
    if normalize == "token":
        scores = [ll / n for ll, n in zip(lls, n_tokens)]
    elif normalize == "char":
        scores = [ll / max(len(choice), 1) for ll, choice in zip(lls, example.choices)]
    else:
        scores = list(lls)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def score_choices(
    model: nn.Module,
    examples: Sequence[ChoiceExample],
    pairs: Sequence[Sequence[Pair]],
    normalize: Normalize = "none",
    batch_size: int = 16,
    max_length: int | None = None,
) -> TaskResult:
    """Accuracy over encoded questions (``pairs[i]``: one pair per choice of ``examples[i]``). All pairs
    go into one length-sorted pool; inputs over ``max_length`` (default: the model's context) lose their
    oldest tokens."""
    if not examples:
        raise ValueError("no multiple-choice examples to evaluate")
    flat = [pair for question in pairs for pair in question]
    lls = continuation_logprobs(model, flat, batch_size, max_length or model_max_length(model))
    hits, offset = [], 0
    for example, question in zip(examples, pairs):
        span = slice(offset, offset + len(question))
        n_tokens = [len(continuation) for _, continuation in question]
        hits.append(float(choice_predictions(lls[span], example, n_tokens, normalize) == example.label))
        offset += len(question)
    return TaskResult(sum(hits) / len(examples), _NORM_METRIC[normalize], True, True, len(examples),
                      items=ItemScores(num=hits))


def multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[ChoiceExample | Mapping[str, Any]],
    normalize: Normalize = "none",
    target_delimiter: str = " ",
    batch_size: int = 16,
    max_length: int | None = None,
) -> TaskResult:
    """Accuracy of picking the choice with the highest log p(delimiter + choice | prompt).

    ``normalize``: "none" sums log-probs (metric "accuracy"); "token" divides by the choice's token
    count ("accuracy_norm_token"); "char" divides by the choice's length in characters, as lm-eval's
    ``acc_norm`` ("accuracy_norm_char").
    """
    items = [_as_example(e) for e in examples]
    pairs = [choice_pairs(tokenizer, ex, target_delimiter) for ex in items]
    return score_choices(model, items, pairs, normalize, batch_size, max_length)


@register_eval_type("multiple_choice")
class MultipleChoiceEval(PromptedEval):
    """Accuracy of the most likely choice; ``max_examples`` subsamples records."""

    type: Literal["multiple_choice"] = "multiple_choice"
    choices: list[str] | None = Field(
        None, description='Choices shared by all records, e.g. ["No", "Yes"]; the label is then one of them.'
    )
    choices_field: str = Field("choices", description="Record field with the record's choices (unless choices).")
    label_field: str = Field("label", description="Record field with the answer: a choice or its index.")
    target_delimiter: str = Field(" ", description="Put between prompt and each choice, as lm-eval does.")
    length_normalize: bool | Literal["token", "char"] = Field(
        False, description="Compare choices by log-prob per token or per character (true: char, = lm-eval acc_norm)."
    )
    max_length: int | None = Field(None, gt=1, description="Context limit in tokens; default: the model's.")

    @field_validator("choices", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("the choices list is empty: give the answers to choose from, e.g. [\"No\", \"Yes\"], or "
                             "drop the key to read each record's choices_field")
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            raise ValueError('YAML reads unquoted No/Yes/true/false as booleans; quote the choices, e.g. ["No", "Yes"]')
        return value

    @property
    def normalize(self) -> Normalize:
        if self.length_normalize is True:
            return "char"
        return self.length_normalize or "none"

    def record_choices(self, record: dict[str, Any], index: int) -> list[str]:
        if self.choices is not None:
            return list(self.choices)
        value = self.field(record, self.choices_field, index, "choices_field or choices")
        if isinstance(value, str):  # a CSV/TSV cell holding a JSON list
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if hasattr(value, "tolist"):  # a numpy array from Parquet
            value = value.tolist()
        if not isinstance(value, (list, tuple)) or not value:
            raise DataError(
                f"eval '{self.name}': {self.where(record, index)}: field '{self.choices_field}' must be a non-empty "
                'list of choices (or a JSON list in a CSV/TSV cell), e.g. ["No", "Yes"]; or set choices for all records.'
            )
        return [str(v) for v in value]

    def example(self, record: dict[str, Any], index: int) -> ChoiceExample:
        choices = self.record_choices(record, index)
        try:
            label = resolve_label(self.field(record, self.label_field, index, "label_field"), choices)
        except ValueError as err:
            raise DataError(f"eval '{self.name}': {self.where(record, index)}: {err}") from None
        return ChoiceExample(self.prompt(record, index), choices, label)

    def evaluate(
        self, model: nn.Module, tokenizer: Any, batch_size: int = 16, shared: SharedWork | None = None
    ) -> dict[str, TaskResult]:
        examples, pairs = [], []
        for index, record in enumerate(self.sampled_records(shared)):
            example = self.example(record, index)
            try:
                pairs.append(choice_pairs(tokenizer, example, self.target_delimiter))
            except ValueError as err:
                raise DataError(f"eval '{self.name}': {self.where(record, index)}: {err}") from None
            examples.append(example)
        try:
            result = score_choices(model, examples, pairs, self.normalize, batch_size, self.max_length)
        except ValueError as err:  # a choice longer than max_length
            raise ConfigError(f"eval '{self.name}': {err}; raise this eval's max_length") from None
        return {self.name: result}
