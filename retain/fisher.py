"""Weight statistics over a model and data: diagonal Fisher (EWC), Fisher of LoRA updates (EWC-LoRA),
and Synaptic-Intelligence path-integral importance from a short pass over general data.

Definitions (stated because papers and libraries differ):

- An *example* is one sequence; its loss is the mean next-token negative log-likelihood over its
  label tokens (the same value ``model(input_ids, labels=labels).loss`` gives for a batch of one).
- ``empirical`` Fisher: ``F = 1/N sum_n g_n^2``, ``g_n`` the gradient of example n's loss on its
  own tokens. Computed **per example**: a loop of one forward/backward per example (batch of one,
  no padding). ``torch.func.vmap`` was not used: it fails on GPT-2 (data-dependent control flow)
  and falls back to slow per-sample SDPA kernels on others, while the loop works for any model,
  wrapped or not, with the memory of one gradient.
- ``sampled`` Fisher: as above, but the label at every scored position is drawn from the model's
  own predictive distribution (teacher-forced on the data's context), ``samples`` draws per
  example, averaged. Each example's draws use a generator seeded by (seed, example index), so the
  result does not depend on how examples are split across processes.
- ``empirical_batch``: the square of batch-mean gradients, ``1/B sum_b (mean_{n in b} g_n)^2``
  (what Avalanche computes). Cheaper, a different quantity; only used when asked for by name.

With several processes (accelerate), each process takes every ``world``-th example, and sums and
counts are added across processes before dividing, so the result equals one process's up to
floating-point summation order.
"""

from __future__ import annotations

import time

from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from retain.losses.quadratic import linear_per_example_grad_sq, si_importance, si_path_step_

Estimator = Literal["empirical", "sampled", "empirical_batch"]
IGNORE_INDEX = -100
Collate = Callable[[list[Any]], dict[str, Tensor]]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that trains, by name (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def select_examples(examples: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """At most ``limit`` examples, a seeded random subset (all of them, in order, when there are fewer)."""
    if limit is None or len(examples) <= limit:
        return list(examples)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:limit]
    return [examples[i] for i in sorted(order.tolist())]


def has_label_tokens(example: Any) -> bool:
    """Whether the example scores at least one next token (labels are shifted by one)."""
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def per_example_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token NLL of each row over its label tokens, shape (B,); 0 for rows with none."""
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_nll = nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(targets)
    return (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


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


def example_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, example index): the same draws on any process layout."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


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


def _world(accelerator: Any | None) -> tuple[int, int]:
    if accelerator is None:
        return 1, 0
    return int(accelerator.num_processes), int(accelerator.process_index)


class _EvalMode:
    """Dropout off (LoRA dropout included) while statistics are computed; the previous mode restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _forward_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _losses_for(
    logits: Tensor, labels: Tensor, estimator: Estimator, samples: int, generators: Sequence[torch.Generator]
) -> list[Tensor]:
    """Per-row losses, one tensor (B,) per label draw: the data's labels, or ``samples`` sampled draws."""
    if estimator == "sampled":
        return [per_example_nll(logits, sampled_labels(logits, labels, generators)) for _ in range(samples)]
    return [per_example_nll(logits, labels)]


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
) -> tuple[dict[str, Tensor], int]:
    """Diagonal Fisher (float32, on the parameters' device) of ``params`` over ``examples``.

    Returns (Fisher, number of examples or batches it averages). ``.grad`` is not touched
    (``torch.autograd.grad``), so it is safe between training steps. Pass the unwrapped model.
    """
    if estimator not in ("empirical", "sampled", "empirical_batch"):
        raise ValueError(f"unknown Fisher estimator '{estimator}'; choose empirical, sampled or empirical_batch")
    names = list(params)
    tensors = [params[n] for n in names]
    device = model_device(model)
    world, rank = _world(accelerator)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = torch.zeros(1, dtype=torch.float32, device=device)

    def add_grads(loss: Tensor, scale: float, retain: bool) -> dict[str, Tensor]:
        grads = torch.autograd.grad(loss, tensors, retain_graph=retain, allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(p)) * scale for n, g, p in zip(names, grads, tensors)}

    with _EvalMode(model):
        if estimator == "empirical_batch":
            for batch_examples in _batches([e for e in examples if has_label_tokens(e)], batch_size):
                mine = batch_examples[rank::world]
                grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
                if mine:
                    batch = _to(collate(mine), device)
                    loss = per_example_nll(_forward_logits(model, batch), batch["labels"]).sum() / len(batch_examples)
                    grads = {n: g.float() for n, g in add_grads(loss, 1.0, False).items()}
                grads = sum_across_processes(grads, accelerator)  # the mean gradient of the whole batch
                for n in names:
                    total[n].add_(grads[n].pow(2))
                count += 1
        else:
            for index in range(rank, len(examples), world):
                example = examples[index]
                if not has_label_tokens(example):
                    continue
                batch = _to(collate([example]), device)
                logits = _forward_logits(model, batch)
                generators = [example_generator(seed, index, device)] if estimator == "sampled" else []
                losses = _losses_for(logits, batch["labels"], estimator, samples, generators)
                for i, loss in enumerate(losses):
                    grads = add_grads(loss.sum(), 1.0, retain=i < len(losses) - 1)
                    for n in names:
                        total[n].add_(grads[n].float().pow(2), alpha=1.0 / len(losses))
                count += 1
    total = sum_across_processes(total, accelerator)
    count = sum_across_processes({"count": count}, accelerator)["count"]
    n = max(int(round(count.item())), 1)
    return {name: value / n for name, value in total.items()}, n


def _batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ---------------------------------------------------------------------------------------------
# EWC-LoRA: Fisher of each adapted matrix's update Delta W, from hooks on the adapted layers


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA linear layers by module name (the layers whose Delta W = s B A is penalized)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return {}
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, LoraLinear):
                raise ValueError(
                    f"ewc-lora supports LoRA on linear layers only; '{name}' is a {type(module).__name__}. "
                    "Set lora.target_modules to linear layers."
                )
            found[name] = module
    return found


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
) -> tuple[dict[str, Tensor], int]:
    """Per-example diagonal Fisher of ``Delta W`` (shape out x in) of each LoRA layer.

    The gradient of a loss with respect to a layer's ``Delta W`` equals the gradient with respect to
    its base weight: ``sum_t delta_t x_t^T`` from the layer's input ``x`` and output gradient
    ``delta``. Forward hooks catch both, so one backward per batch yields every example's gradient
    exactly (``linear_per_example_grad_sq``); ``empirical_batch`` squares the batch's mean instead.
    """
    device = model_device(model)
    world, rank = _world(accelerator)
    total: dict[str, Tensor] = {}
    count = torch.zeros(1, dtype=torch.float32, device=device)
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
        with _EvalMode(model):
            scored = [(i, e) for i, e in enumerate(examples) if has_label_tokens(e)]
            for batch_items in _batches(scored, batch_size):
                mine = batch_items[rank::world] if estimator == "empirical_batch" else None
                local = mine if mine is not None else [item for item in batch_items if item[0] % world == rank]
                stats = {n: torch.zeros_like(total[n]) for n in names}
                if local:
                    captured.clear()
                    batch = _to(collate([e for _, e in local]), device)
                    logits = _forward_logits(model, batch)
                    generators = [example_generator(seed, i, device) for i, _ in local] if estimator == "sampled" else []
                    losses = _losses_for(logits, batch["labels"], estimator, samples, generators)
                    outputs = [captured[n][1] for n in names]
                    for k, loss in enumerate(losses):
                        grads = torch.autograd.grad(loss.sum(), outputs, retain_graph=k < len(losses) - 1)
                        for n, grad in zip(names, grads):
                            x = captured[n][0]
                            if estimator == "empirical_batch":
                                stats[n].add_(torch.einsum("nto,nti->oi", grad.float(), x.float()) / len(batch_items))
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
    if estimator != "empirical_batch":
        total = sum_across_processes(total, accelerator)
    count = sum_across_processes({"count": count}, accelerator)["count"]
    n = max(int(round(count.item())), 1)
    return {name: value / n for name, value in total.items()}, n


# ---------------------------------------------------------------------------------------------
# Importance (Song et al. 2025): Synaptic-Intelligence path integral over a short pass on general data


def path_integral_importance(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    examples: Sequence[Any],
    collate: Collate,
    *,
    lr: float,
    batch_size: int = 8,
    steps: int | None = None,
    xi: float = 1e-3,
    accelerator: Any | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Element-wise importance from plain SGD steps on general data; the weights are restored after.

    Each step takes the mean gradient of a batch (``omega -= g * delta``, ``delta = -lr g``), then
    ``Omega = omega / (Delta^2 + xi)`` with ``Delta`` the pass's total change (Zenke et al. 2017).
    One forward/backward per batch, no per-example gradients: this is why it is cheap. Returns
    (importance, steps taken). Dropout is off so the pass is deterministic.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    device = model_device(model)
    world, rank = _world(accelerator)
    start = {n: p.detach().clone() for n, p in params.items()}
    omega = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    scored = [e for e in examples if has_label_tokens(e)]
    taken = 0
    try:
        with _EvalMode(model):
            for batch_examples in _batches(scored, batch_size):
                if steps is not None and taken >= steps:
                    break
                mine = batch_examples[rank::world]
                grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
                if mine:
                    batch = _to(collate(mine), device)
                    loss = per_example_nll(_forward_logits(model, batch), batch["labels"]).sum() / len(batch_examples)
                    raw = torch.autograd.grad(loss, tensors, allow_unused=True)
                    grads = {n: (g.float() if g is not None else torch.zeros_like(grads[n])) for n, g in zip(names, raw)}
                grads = sum_across_processes(grads, accelerator)
                deltas = {n: -lr * grads[n] for n in names}
                with torch.no_grad():
                    for n, p in params.items():
                        p.add_(deltas[n].to(p.dtype))
                si_path_step_(omega, grads, deltas)
                taken += 1
        change = {n: (params[n].detach().float() - start[n].float()) for n in names}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
    return si_importance(omega, change, xi), taken


def estimate_logged(
    estimate: Callable[..., tuple[dict[str, Tensor], int]],
    targets: Mapping[str, Any],
    examples: Sequence[Any],
    ctx: Any,
    who: str,
    config: Any,
    seed: int,
) -> dict[str, Tensor]:
    """Run a Fisher estimator (``diagonal_fisher`` or ``lora_delta_fisher``) with a strategy's settings,
    logging its cost (seconds, examples) into the run log."""
    start = time.perf_counter()
    fisher, count = estimate(
        ctx.unwrapped_model,
        targets,
        examples,
        ctx.collate,
        estimator=config.estimator,
        samples=config.samples,
        seed=seed,
        batch_size=config.batch_size,
        accelerator=ctx.accelerator,
    )
    ctx.log(f"{who}/fisher_seconds", time.perf_counter() - start)
    ctx.log(f"{who}/fisher_examples", count)
    return fisher
