"""Diagonal Fisher information of weights (EWC) and of LoRA updates (EWC-LoRA).

Estimators (see ``retain.stats.per_example`` for what an example and a sampled label are):

- ``empirical``: ``F = sum_n g_n^2 / N_tokens``, ``g_n`` the gradient of example n's *summed* token
  NLL on its own tokens, ``N_tokens`` the scored tokens of all examples. Computed **per example**: a
  loop of one forward/backward per example (batch of one, no padding). ``torch.func.vmap`` was not
  used: it fails on GPT-2 (data-dependent control flow) and falls back to slow per-sample SDPA kernels
  on others, while the loop works for any model, wrapped or not, with the memory of one gradient.
- ``sampled``: as above, with the labels drawn from the model itself, ``samples`` draws per example,
  averaged.
- ``empirical_batch``: the square of each batch's gradient of its summed token NLL, over the scored
  tokens: ``sum_b (sum_{n in b} g_n)^2 / N_tokens`` (Avalanche squares batch-mean gradients). Cheaper, a
  different quantity; only used when asked for by name.

Normalization (``normalize``): ``token`` (default) divides by scored tokens, so the same text cut
into 8-, 32- or 128-token examples gives the same Fisher and one lambda transfers between datasets
(for a sampled Fisher the cross terms between a sequence's tokens vanish in expectation, so this is
the per-token Fisher). ``example`` is the previous convention, the squared gradient of each
example's *mean* token NLL averaged over examples; its trace falls as 1/length (measured on
stories260K: see ``bench/importance_cost.py``). A lambda tuned under ``example`` at length T is about
T times the same strength under ``token``.

With several processes each process takes every ``world``-th example, and sums and counts are added
across processes before dividing. A sharded (FSDP2) model is estimated by every process on every
example instead, each keeping its rows (:func:`_sharded_diagonal_fisher`).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from retain.models.runtime import eval_mode, model_device
from retain.models.sharding import is_sharded
from retain.stats.per_example import (
    Collate,
    batches,
    example_generator,
    forward_logits,
    has_label_tokens,
    linear_per_example_grad_sq,
    per_example_nll,
    sampled_labels,
    scored_tokens,
    sum_across_processes,
    to_device,
    world_of,
)

Estimator = Literal["empirical", "sampled", "empirical_batch"]
Normalize = Literal["token", "example"]


def _losses_for(
    logits: Tensor,
    labels: Tensor,
    estimator: Estimator,
    samples: int,
    generators: Sequence[torch.Generator],
    normalize: Normalize = "token",
) -> list[Tensor]:
    """Per-row losses, one tensor (B,) per label draw: the data's labels, or ``samples`` sampled draws.
    Summed over each row's scored tokens (``token``) or averaged (``example``)."""
    reduction = "sum" if normalize == "token" else "mean"
    if estimator == "sampled":
        return [per_example_nll(logits, sampled_labels(logits, labels, generators), reduction) for _ in range(samples)]
    return [per_example_nll(logits, labels, reduction)]


def _check(estimator: str, normalize: str) -> None:
    if estimator not in ("empirical", "sampled", "empirical_batch"):
        raise ValueError(f"unknown Fisher estimator '{estimator}'; choose empirical, sampled or empirical_batch")
    if normalize not in ("token", "example"):
        raise ValueError(f"unknown Fisher normalization '{normalize}'; choose token or example")


def _normalized(
    total: dict[str, Tensor],
    count: Tensor,
    tokens: Tensor,
    estimator: Estimator,
    normalize: Normalize,
    accelerator: Any,
) -> tuple[dict[str, Tensor], int]:
    """(Fisher, examples or batches): this process's squared-gradient sums added across processes
    (``empirical_batch`` sums were, batch by batch) and divided by the scored tokens (``token``) or by
    ``count`` (``example``). One rule for every estimator, so weight and LoRA Fishers share a scale."""
    if estimator != "empirical_batch":
        total = sum_across_processes(total, accelerator)
    sums = sum_across_processes({"count": count, "tokens": tokens}, accelerator)
    n = max(int(round(sums["count"].item())), 1)
    divisor = max(float(sums["tokens"].item()), 1.0) if normalize == "token" else float(n)
    return {name: value / divisor for name, value in total.items()}, n


def diagonal_fisher(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    examples: Sequence[Any],
    collate: Collate,
    *,
    estimator: Estimator = "sampled",
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    accelerator: Any | None = None,
    normalize: Normalize = "token",
) -> tuple[dict[str, Tensor], int]:
    """Diagonal Fisher (float32, on the parameters' device) of ``params`` over ``examples``.

    Returns (Fisher, number of examples or batches it averages). ``.grad`` is not touched
    (``torch.autograd.grad``), so it is safe between training steps. Pass the unwrapped model.
    """
    _check(estimator, normalize)
    if is_sharded(model):
        return _sharded_diagonal_fisher(model, params, examples, collate, estimator=estimator, samples=samples,
                                        seed=seed, batch_size=batch_size, normalize=normalize)
    names = list(params)
    tensors = [params[n] for n in names]
    device = model_device(model)
    world, rank = world_of(accelerator)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = torch.zeros(1, dtype=torch.float32, device=device)  # examples or batches
    tokens = torch.zeros(1, dtype=torch.float32, device=device)
    per_token = normalize == "token"

    def add_grads(loss: Tensor, retain: bool) -> dict[str, Tensor]:
        grads = torch.autograd.grad(loss, tensors, retain_graph=retain, allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(p)) for n, g, p in zip(names, grads, tensors)}

    with eval_mode(model, no_grad=False):
        if estimator == "empirical_batch":
            for batch_examples in batches([e for e in examples if has_label_tokens(e)], batch_size):
                mine = batch_examples[rank::world]
                grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
                if mine:
                    batch = to_device(collate(mine), device)
                    losses = per_example_nll(forward_logits(model, batch), batch["labels"], "sum" if per_token else "mean")
                    loss = losses.sum() if per_token else losses.sum() / len(batch_examples)
                    grads = {n: g.float() for n, g in add_grads(loss, False).items()}
                    tokens += float(scored_tokens(batch["labels"]).sum())
                grads = sum_across_processes(grads, accelerator)  # the whole batch's gradient
                for n in names:
                    total[n].add_(grads[n].pow(2))
                count += 1 if rank == 0 else 0
        else:
            for index in range(rank, len(examples), world):
                example = examples[index]
                if not has_label_tokens(example):
                    continue
                batch = to_device(collate([example]), device)
                logits = forward_logits(model, batch)
                generators = [example_generator(seed, index, device)] if estimator == "sampled" else []
                losses = _losses_for(logits, batch["labels"], estimator, samples, generators, normalize)
                for i, loss in enumerate(losses):
                    grads = add_grads(loss.sum(), retain=i < len(losses) - 1)
                    for n in names:
                        total[n].add_(grads[n].float().pow(2), alpha=1.0 / len(losses))
                count += 1
                tokens += float(scored_tokens(batch["labels"]).sum())
    return _normalized(total, count, tokens, estimator, normalize, accelerator)


def _sharded_diagonal_fisher(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    examples: Sequence[Any],
    collate: Collate,
    *,
    estimator: Estimator,
    samples: int,
    seed: int,
    batch_size: int,
    normalize: Normalize,
) -> tuple[dict[str, Tensor], int]:
    """:func:`diagonal_fisher` of a sharded (FSDP2) model, sharded like its parameters.

    A sharded forward is a collective, so every process runs every example (the same forwards, in the
    same order): each process's gathered gradient is then the example's own, FSDP2's averaging
    reduce-scatter leaves each process its rows of it, and each process squares its rows. No sums
    across processes are needed; the cost is ``world`` times the compute of a split pass. Each
    sampled draw gets its own forward (a second backward through one FSDP2 forward is not supported).
    ``.grad`` of the parameters is used and left as it was.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    kept = [p.grad for p in tensors]
    device = model_device(model)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count, tokens = 0, 0.0
    per_token = normalize == "token"

    def squared_grads(loss: Tensor, scale: float) -> None:
        for p in tensors:
            p.grad = None
        loss.backward()
        for n, p in zip(names, tensors):
            if p.grad is not None:
                total[n].add_(p.grad.float().pow(2), alpha=scale)

    try:
        with eval_mode(model, no_grad=False):
            if estimator == "empirical_batch":
                for batch_examples in batches([e for e in examples if has_label_tokens(e)], batch_size):
                    batch = to_device(collate(batch_examples), device)
                    losses = per_example_nll(forward_logits(model, batch), batch["labels"], "sum" if per_token else "mean")
                    squared_grads(losses.sum() if per_token else losses.sum() / len(batch_examples), 1.0)
                    tokens += float(scored_tokens(batch["labels"]).sum())
                    count += 1
            else:
                for index, example in enumerate(examples):
                    if not has_label_tokens(example):
                        continue
                    batch = to_device(collate([example]), device)
                    generators = [example_generator(seed, index, device)] if estimator == "sampled" else []
                    draws = samples if estimator == "sampled" else 1
                    for _ in range(draws):
                        logits = forward_logits(model, batch)
                        loss = _losses_for(logits, batch["labels"], estimator, 1, generators, normalize)[0]
                        squared_grads(loss.sum(), 1.0 / draws)
                    count += 1
                    tokens += float(scored_tokens(batch["labels"]).sum())
    finally:
        for p, grad in zip(tensors, kept):
            p.grad = grad
    n = max(count, 1)
    divisor = max(tokens, 1.0) if per_token else float(n)
    return {name: value / divisor for name, value in total.items()}, n


def lora_delta_fisher(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    examples: Sequence[Any],
    collate: Collate,
    *,
    estimator: Estimator = "sampled",
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    accelerator: Any | None = None,
    normalize: Normalize = "token",
) -> tuple[dict[str, Tensor], int]:
    """Per-example diagonal Fisher of ``Delta W`` (shape out x in) of each LoRA layer, normalized as
    ``diagonal_fisher`` (per scored token by default).

    The gradient of a loss with respect to a layer's ``Delta W`` equals the gradient with respect to
    its base weight: ``sum_t delta_t x_t^T`` from the layer's input ``x`` and output gradient
    ``delta``. Forward hooks catch both, so one backward per batch yields every example's gradient
    exactly (``linear_per_example_grad_sq``); ``empirical_batch`` squares the batch's mean instead.
    """
    _check(estimator, normalize)
    device = model_device(model)
    world, rank = world_of(accelerator)
    total: dict[str, Tensor] = {}
    count = torch.zeros(1, dtype=torch.float32, device=device)
    tokens = torch.zeros(1, dtype=torch.float32, device=device)
    per_token = normalize == "token"
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            captured[name] = (args[0].detach(), output)

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers.items()]
    for name, module in layers.items():
        weight = module.get_base_layer().weight
        shape = weight.shape[::-1] if getattr(module, "fan_in_fan_out", False) else weight.shape
        total[name] = torch.zeros(tuple(shape), dtype=torch.float32, device=weight.device)
    names = list(layers)
    try:
        with eval_mode(model, no_grad=False):
            scored = [(i, e) for i, e in enumerate(examples) if has_label_tokens(e)]
            for batch_items in batches(scored, batch_size):
                mine = batch_items[rank::world] if estimator == "empirical_batch" else None
                local = mine if mine is not None else [item for item in batch_items if item[0] % world == rank]
                stats = {n: torch.zeros_like(total[n]) for n in names}
                if local:
                    captured.clear()
                    batch = to_device(collate([e for _, e in local]), device)
                    logits = forward_logits(model, batch)
                    generators = [example_generator(seed, i, device) for i, _ in local] if estimator == "sampled" else []
                    losses = _losses_for(logits, batch["labels"], estimator, samples, generators, normalize)
                    tokens += float(scored_tokens(batch["labels"]).sum())
                    outputs = [captured[n][1] for n in names]
                    batch_scale = 1.0 if per_token else 1.0 / len(batch_items)
                    for k, loss in enumerate(losses):
                        grads = torch.autograd.grad(loss.sum(), outputs, retain_graph=k < len(losses) - 1)
                        for n, grad in zip(names, grads):
                            x = captured[n][0]
                            if estimator == "empirical_batch":
                                stats[n].add_(torch.einsum("nto,nti->oi", grad.float(), x.float()) * batch_scale)
                            else:
                                stats[n].add_(linear_per_example_grad_sq(x, grad), alpha=1.0 / len(losses))
                if estimator == "empirical_batch":
                    stats = sum_across_processes(stats, accelerator)
                    for n in names:
                        total[n].add_(stats[n].pow(2))
                    count += 1 if rank == 0 else 0
                else:
                    for n in names:
                        total[n].add_(stats[n])
                    count += len(local)
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()
    return _normalized(total, count, tokens, estimator, normalize, accelerator)


def online_update(previous: Mapping[str, Tensor] | None, new: Mapping[str, Tensor], gamma: float) -> dict[str, Tensor]:
    """Online EWC / EWC-LoRA accumulation ``F = gamma * F_prev + F_new`` (``F_new`` alone when there is no F_prev)."""
    if previous is None:
        return {name: value.clone() for name, value in new.items()}
    return {name: gamma * previous[name].to(value.dtype) + value for name, value in new.items()}

