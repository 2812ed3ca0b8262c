"""Type ``generation``: greedy completions compared with targets; also the report's sample generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from retain.errors import DataError
from retain.eval.tasks.base import SharedWork, TaskResult, register_eval_type
from retain.eval.tasks.inputs import PromptedEval
from retain.results.schema import ItemScores
from retain.eval.tasks.scoring import encode, length_sorted_batches
from retain.models.runtime import eval_mode, model_device

MatchMode = Literal["exact", "contains"]


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(model.config, "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def greedy_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy continuations (decoded new tokens, special tokens skipped), in prompt order.

    Prompts are left-padded with an attention mask so every row's last prompt token sits at the
    same position; a fixed GenerationConfig makes decoding independent of the model's own defaults.
    """
    from transformers import GenerationConfig

    encoded = [encode(tokenizer, p) for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("an empty prompt with a tokenizer that adds no BOS cannot be generated from")
    pad_id = _pad_id(tokenizer, model)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # may list several
    eos = tokenizer.eos_token_id if eos is None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos)
    device = model_device(model)
    outputs: list[str] = [""] * len(prompts)
    with eval_mode(model):
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
            ids, mask = _left_pad([encoded[i] for i in batch], pad_id, device)
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new_tokens = generated[:, ids.shape[1] :]
            for row, i in enumerate(batch):
                outputs[i] = _continuation(tokenizer, encoded[i], new_tokens[row].tolist())
    return outputs


def _continuation(tokenizer: Any, prompt: list[int], new: list[int]) -> str:
    """The new tokens' text as it follows the prompt: decoded together with the prompt and cut after it,
    since SentencePiece tokenizers drop the leading space of a sequence's first token ("The little dog"
    + "was" instead of " was") when the new tokens are decoded alone."""
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(prompt + new, skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def is_match(prediction: str, target: str, match: MatchMode) -> bool:
    """exact: equal after stripping whitespace; contains: the stripped target occurs in the prediction."""
    if match == "exact":
        return prediction.strip() == target.strip()
    return target.strip() in prediction


def generation(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    match: MatchMode = "exact",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: Sequence[str] = ("\n",),
) -> TaskResult:
    """Share of prompts whose greedy completion (cut at the first ``stop`` string) matches its target."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("no generation examples to evaluate")
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = [float(is_match(cut_at_stop(c, stop), t, match)) for c, t in zip(completions, targets)]
    metric = "exact_match" if match == "exact" else "contains"
    return TaskResult(sum(hits) / len(prompts), metric, True, True, len(prompts), items=ItemScores(num=hits))


def generate_samples(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 16
) -> dict[str, str]:
    """Prompt -> greedy continuation, for the report's before/after samples."""
    if not prompts:
        return {}
    return dict(zip(prompts, greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)))


@register_eval_type("generation")
class GenerationEval(PromptedEval):
    """Share of records whose greedy completion matches ``target_field``; metric exact_match or contains."""

    type: Literal["generation"] = "generation"
    target_field: str = Field("target", description="Record field with the expected completion.")
    match: MatchMode = Field("exact", description="exact: equal after stripping; contains: the target occurs.")
    max_new_tokens: int = Field(32, gt=0)
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Generation is cut at the first of these.")

    def evaluate(
        self, model: nn.Module, tokenizer: Any, batch_size: int = 16, shared: SharedWork | None = None
    ) -> dict[str, TaskResult]:
        records = self.sampled_records(shared)
        prompts = [self.prompt(r, i) for i, r in enumerate(records)]
        targets = [str(self.field(r, self.target_field, i, "target_field")) for i, r in enumerate(records)]
        empty = next((i for i, p in enumerate(prompts) if not p and not encode(tokenizer, p)), None)
        if empty is not None:
            raise DataError(
                f"eval '{self.name}': {self.where(records[empty], empty)}: the prompt is empty and the tokenizer "
                "adds no BOS token, so there is nothing to generate from."
            )
        result = generation(model, tokenizer, prompts, targets, self.match, self.max_new_tokens, batch_size, self.stop)
        return {self.name: result}
