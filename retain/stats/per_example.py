"""Per-example quantities behind the weight statistics, and how they add up across processes.

Definitions (stated because papers and libraries differ):

- An *example* is one sequence; its loss is the mean next-token negative log-likelihood over its
  label tokens (the same value ``model(input_ids, labels=labels).loss`` gives for a batch of one).
- Weight statistics are normalized **per scored token**: the Fisher uses each example's *summed*
  token NLL, ``g_n = sum_t grad nll_t``, and divides ``sum_n g_n^2`` by the number of scored tokens,
  so the same text cut into short or long examples gives the same scale (the token gradients'
  cross terms vanish in expectation under sampled labels). With the mean loss instead, the
  trace falls as 1/length (a 128-token example counts 1/16 of an 8-token one), and a penalty
  strength tuned on one dataset would not transfer to another.
- A *sampled* label replaces every scored token by one drawn from the model's own predictive
  distribution there (teacher-forced on the data's context); each example draws with a generator
  seeded by (seed, example index), so results do not depend on how examples are split across processes.
- With several processes (accelerate), sums and counts are added across processes before dividing,
  so a statistic equals one process's up to floating-point summation order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from retain.data.sampling import Stream, seeded_generator
from retain.data.tokenize import IGNORE_INDEX

Collate = Callable[[list[Any]], dict[str, Tensor]]


def example_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, example index): the same draws on any process layout.
    ``seed`` is the estimate's seed; its examples' draws are its ``Stream.ESTIMATE_SAMPLE`` stream."""
    return seeded_generator(seed, Stream.ESTIMATE_SAMPLE, index, device=device)


def has_label_tokens(example: Any) -> bool:
    """Whether the example scores at least one next token (labels are shifted by one)."""
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def per_example_nll(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token NLL of each row over its label tokens, shape (B,): the ``mean`` (0 for rows with none)
    or the ``sum`` over the row's scored tokens."""
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_nll = nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(targets)
    total = (token_nll * mask).sum(dim=1)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be mean or sum, got '{reduction}'")
    return total / mask.sum(dim=1).clamp_min(1)


def scored_tokens(labels: Tensor) -> Tensor:
    """Number of next tokens each row scores, shape (B,) (labels are shifted by one)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def sampled_labels(logits: Tensor, labels: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Labels with every scored position replaced by a token drawn from the model's prediction there.

    Row i draws with ``generators[i]``. Unscored positions keep -100, so the same positions count.
    """
    out = labels.clone()
    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
    for row, generator in enumerate(generators):
        positions = (labels[row, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        if positions.numel() == 0:
            continue
        draws = torch.multinomial(probs[row, positions], 1, generator=generator).squeeze(-1)
        out[row, positions + 1] = draws
    return out


def sum_across_processes(tensors: dict[str, Tensor], accelerator: Any | None) -> dict[str, Tensor]:
    """Add each tensor over all processes (one flat all-reduce); unchanged with one process."""
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1 or not tensors:
        return tensors
    names = list(tensors)
    flat = torch.cat([tensors[n].reshape(-1).float() for n in names])
    flat = accelerator.reduce(flat, reduction="sum")
    out, offset = {}, 0
    for name in names:
        numel = tensors[name].numel()
        out[name] = flat[offset : offset + numel].view_as(tensors[name]).to(tensors[name].dtype)
        offset += numel
    return out


def world_of(accelerator: Any | None) -> tuple[int, int]:
    if accelerator is None:
        return 1, 0
    return int(accelerator.num_processes), int(accelerator.process_index)


def forward_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])



def add_squared_(accumulator: dict[str, Tensor], grads: Mapping[str, Tensor], scale: float = 1.0) -> None:
    """``acc += scale * g^2`` in place (per-example Fisher accumulation)."""
    for name, grad in grads.items():
        accumulator[name].add_(grad.detach().to(accumulator[name].dtype).pow(2), alpha=scale)


def linear_per_example_grad_sq(inputs: Tensor, output_grads: Tensor) -> Tensor:
    """``sum_n (G_n)^2`` with ``G_n = sum_t delta_{n,t} x_{n,t}^T`` the per-example gradient of a
    linear map's weight (shape out x in), from its inputs ``x`` (N, T, in) and the loss gradient
    at its outputs ``delta`` (N, T, out).

    Exact per example (not the square of a batch gradient) because each example's loss depends only
    on its own activations; positions without a loss (padding) have ``delta = 0``.
    """
    per_example = torch.einsum("nto,nti->noi", output_grads.float(), inputs.float())
    return per_example.pow(2).sum(dim=0)

