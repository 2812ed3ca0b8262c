"""Types ``loss`` and ``next_token_accuracy``: language modelling over packed windows of text.

Both are read off the same forward pass (summed NLL and top-1 hits per window), and evals of one
suite run that cut the same windows share it, so asking for both costs one pass, not two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from retain.data.sampling import seeded_subset
from retain.errors import DataError
from retain.eval.tasks.base import SharedWork, TaskResult, register_eval_type
from retain.eval.tasks.inputs import DataEval
from retain.eval.tasks.scoring import encode, forward_logits, length_sorted_batches, right_pad, safe_exp
from retain.models.runtime import eval_mode, model_device
from retain.results.schema import ItemScores


def text_windows(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Tokenize each text (default special tokens), concatenate, cut into ``max_length`` windows.

    Windows do not overlap, so the first token of each window is context only; a final window
    shorter than 2 tokens (nothing to predict) is dropped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(tokenizer, text))
    windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [w for w in windows if len(w) >= 2]


@dataclass(frozen=True)
class WindowStats:
    """Per-window sums over every predicted position of a set of windows (in the windows' order), and
    their token-weighted totals."""

    nll: tuple[float, ...]
    hits: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def nll_sum(self) -> float:
        return float(sum(self.nll))

    @property
    def correct(self) -> int:
        return int(sum(self.hits))

    @property
    def n_tokens(self) -> int:
        return int(sum(self.tokens))

    def loss(self) -> tuple[TaskResult, TaskResult]:
        """(mean token NLL, perplexity = exp(NLL)), both lower-is-better."""
        mean_nll = self.nll_sum / self.n_tokens
        nll = ItemScores(num=list(self.nll), den=[float(t) for t in self.tokens])
        return (
            TaskResult(mean_nll, "loss", higher_is_better=False, bounded=False, n=self.n_tokens, items=nll),
            TaskResult(safe_exp(mean_nll), "perplexity", higher_is_better=False, bounded=False, n=self.n_tokens,
                       items=nll.model_copy(update={"exp": True})),
        )

    def accuracy(self) -> TaskResult:
        """Share of positions whose argmax prediction is the actual next token (items: windows)."""
        items = ItemScores(num=[float(h) for h in self.hits], den=[float(t) for t in self.tokens])
        return TaskResult(self.correct / self.n_tokens, "next_token_accuracy", True, True, self.n_tokens, items=items)


def window_stats(model: nn.Module, windows: Sequence[Sequence[int]], batch_size: int = 16) -> WindowStats:
    """Next-token NLL and top-1 hits summed over every predicted position, per window."""
    if not windows:
        raise ValueError("no token windows to evaluate (empty texts?)")
    device = model_device(model)
    nll, hits, tokens = [0.0] * len(windows), [0] * len(windows), [0] * len(windows)
    with eval_mode(model):
        for batch in length_sorted_batches([len(w) for w in windows], batch_size):
            ids, lengths = right_pad([windows[i] for i in batch], device)
            logits = forward_logits(model, ids)[:, :-1].float()
            positions = torch.arange(ids.shape[1] - 1, device=device)
            mask = positions[None, :] < (lengths - 1)[:, None]
            targets = ids[:, 1:]
            token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double() * mask
            correct = (logits.argmax(dim=-1) == targets) & mask
            for row, i in enumerate(batch):  # back into the windows' order (batches are length-sorted)
                nll[i] = float(token_nll[row].sum())
                hits[i] = int(correct[row].sum())
                tokens[i] = int(mask[row].sum())
    return WindowStats(tuple(nll), tuple(hits), tuple(tokens))


def _stats(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int,
           max_windows: int | None, seed: int) -> WindowStats:
    windows = seeded_subset(text_windows(tokenizer, texts, max_length), max_windows, seed)
    return window_stats(model, windows, batch_size)


def loss(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
    max_windows: int | None = None,
    seed: int = 0,
) -> tuple[TaskResult, TaskResult]:
    """(mean token NLL, perplexity) over packed windows of ``texts``; ``max_windows`` keeps a seeded
    subsample of the windows (cheap evals of long corpora)."""
    return _stats(model, tokenizer, texts, max_length, batch_size, max_windows, seed).loss()


def next_token_accuracy(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
    max_windows: int | None = None,
    seed: int = 0,
) -> TaskResult:
    """Top-1 next-token accuracy over the same windows as ``loss``."""
    return _stats(model, tokenizer, texts, max_length, batch_size, max_windows, seed).accuracy()


class WindowEval(DataEval):
    """Shared fields and the (memoised) window statistics of ``loss`` and ``next_token_accuracy``."""

    splits = True

    max_examples: int | None = Field(None, gt=0, description="Seeded subsample of the token windows.")
    max_length: int | None = Field(None, gt=1, description="Window length in tokens; default data.max_length.")

    @property
    def window(self) -> int:
        return self.max_length or self.data.max_length

    def texts(self, shared: SharedWork | None = None) -> list[str]:
        """Plain text per record; prompt + completion for prompt/completion data."""
        records, data = self.records(shared), self.data
        if data.text_field in records[0] or data.prompt_field not in records[0]:
            return [str(self.field(r, data.text_field, i, "data.text_field")) for i, r in enumerate(records)]
        return [
            str(self.field(r, data.prompt_field, i, "data.prompt_field"))
            + str(self.field(r, data.completion_field, i, "data.completion_field"))
            for i, r in enumerate(records)
        ]

    def _key(self) -> tuple[Any, ...]:
        """What identifies the scored windows (the window length is in the key itself)."""
        source = self.data.model_dump_json(exclude={"max_length"})
        split = (self.split.model_dump_json(), self._limit) if self.part in ("select", "report") else None
        return (source, self.window, self.max_examples, self.seed, self.part in ("all", "both") or self.part, split)

    def stats(self, model: nn.Module, tokenizer: Any, batch_size: int, shared: SharedWork | None) -> WindowStats:
        """Window statistics, computed once per suite run for every eval cutting the same windows."""
        shared = shared or SharedWork()
        key = ("windows", *self._key(), batch_size)
        return shared.get(key, lambda: self._compute_stats(model, tokenizer, batch_size, shared))

    def windows(self, tokenizer: Any, shared: SharedWork) -> list[list[int]]:
        """The scored windows: the pool (the seeded subsample), of it the items of this eval's part;
        tokenized once per ``shared`` (a model-independent key, ``("inputs", ...)``, so a caller measuring
        many model states may keep it between them)."""
        return shared.get(("inputs", "windows", *self._key()), lambda: self._cut_windows(tokenizer, shared))

    def _cut_windows(self, tokenizer: Any, shared: SharedWork) -> list[list[int]]:
        windows = text_windows(tokenizer, self.texts(shared), self.window)
        if not windows:
            raise DataError(f"eval '{self.name}': {self.data.path} has no text to score (every record is empty).")
        pool = seeded_subset(windows, self.max_examples, self.seed)
        return [pool[i] for i in self.item_ids(len(pool))]

    def _compute_stats(self, model: nn.Module, tokenizer: Any, batch_size: int, shared: SharedWork) -> WindowStats:
        return window_stats(model, self.windows(tokenizer, shared), batch_size)


@register_eval_type("loss")
class LossEval(WindowEval):
    """Mean token loss under ``name`` and its perplexity under ``name.perplexity``."""

    type: Literal["loss"] = "loss"

    def evaluate(
        self, model: nn.Module, tokenizer: Any, batch_size: int = 16, shared: SharedWork | None = None
    ) -> dict[str, TaskResult]:
        nll, ppl = self.stats(model, tokenizer, batch_size, shared).loss()
        return {self.name: nll, f"{self.name}.perplexity": ppl}


@register_eval_type("next_token_accuracy")
class NextTokenAccuracyEval(WindowEval):
    """Share of predicted positions whose argmax is the actual next token."""

    type: Literal["next_token_accuracy"] = "next_token_accuracy"

    def evaluate(
        self, model: nn.Module, tokenizer: Any, batch_size: int = 16, shared: SharedWork | None = None
    ) -> dict[str, TaskResult]:
        return {self.name: self.stats(model, tokenizer, batch_size, shared).accuracy()}
