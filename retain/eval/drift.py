"""How far a fine-tuned model moved from its base model, independent of any task score.

Three views of drift: in output space (KL on fixed probe prompts), in weight space (relative L2
distance of the effective weights) and on general text (perplexity delta). The base model's side of
each is computed once and kept on CPU, so the base model itself does not need to stay in memory.
"""

from __future__ import annotations

from typing import Any

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from retain.eval.tasks.scoring import encode, forward_logits, length_sorted_batches, right_pad
from retain.models.expansion import names_as_loaded
from retain.models.runtime import eval_mode, model_device

# --------------------------------------------------------------------------------------------
# Output drift: KL(base || model) on probe prompts


@dataclass(frozen=True)
class ProbeReference:
    """The base model's next-token log-probabilities at every position of every probe prompt.

    ``logprobs[i]`` is [tokens_i, vocab] float32 on CPU (full vocabulary). With ``top_k`` set, it is
    [tokens_i, k] and ``indices[i]`` holds the token ids: memory drops from vocab to k floats per
    position, and the KL is computed on the coarsened distribution (the k tokens + one bucket for
    all others), which is a lower bound of the full KL. 64 tokens x 32k vocab x 4 bytes = 8 MiB per
    prompt at full vocabulary.
    """

    input_ids: list[list[int]]
    logprobs: list[torch.Tensor]
    indices: list[torch.Tensor] | None = None
    batch_size: int = 16

    @property
    def top_k(self) -> int | None:
        return None if self.indices is None else int(self.logprobs[0].shape[-1])

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def _prompt_logprobs(
    model: nn.Module, input_ids: Sequence[Sequence[int]], batch_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(prompt index, float32 log-probs [tokens, vocab] on the model's device), in batch order.

    Batches depend only on the prompt lengths and ``batch_size``, so the reference and every later
    comparison see identical batches and a model compared with itself gives exactly zero KL.
    """
    device = model_device(model)
    with eval_mode(model):
        for batch in length_sorted_batches([len(ids) for ids in input_ids], batch_size):
            ids, lengths = right_pad([input_ids[i] for i in batch], device)
            logprobs = forward_logits(model, ids).float().log_softmax(dim=-1)
            for row, i in enumerate(batch):
                yield i, logprobs[row, : int(lengths[row])]


def compute_probe_reference(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_length: int = 64,
    top_k: int | None = None,
    batch_size: int = 16,
) -> ProbeReference:
    """Tokenize the probe prompts (cut to ``max_length`` tokens) and store the base model's log-probs."""
    input_ids = [ids[:max_length] for ids in (encode(tokenizer, p) for p in prompts)]
    return reference_from_ids(model, input_ids, top_k, batch_size)


def task_input_reference(model: nn.Module, examples: Sequence[Any], max_length: int = 64, count: int = 32,
                         top_k: int | None = None, batch_size: int = 16) -> ProbeReference:
    """The base model's log-probs on a task's own inputs (the first ``count`` examples, cut to
    ``max_length`` tokens): KL(base || model) there is the forgetting signal of Shenfeld et al. 2025
    ("RL's Razor"), measured on what the model is trained on rather than on held-out general text."""
    return reference_from_ids(model, [list(e.input_ids[:max_length]) for e in examples[:count]], top_k, batch_size)


def reference_from_ids(model: nn.Module, input_ids: list[list[int]], top_k: int | None = None,
                       batch_size: int = 16) -> ProbeReference:
    """The base model's log-probs (or their top-k) on token sequences."""
    input_ids = [ids for ids in input_ids if ids]
    if not input_ids:
        raise ValueError("no probe prompts with tokens to compute a reference on")
    logprobs: list[torch.Tensor | None] = [None] * len(input_ids)
    indices: list[torch.Tensor | None] | None = None if top_k is None else [None] * len(input_ids)
    for i, lp in _prompt_logprobs(model, input_ids, batch_size):
        if top_k is None:
            logprobs[i] = lp.cpu()
        else:
            values, idx = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            logprobs[i], indices[i] = values.cpu(), idx.cpu()  # type: ignore[index]
    return ProbeReference(input_ids, logprobs, indices, batch_size)  # type: ignore[arg-type]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _kl_full(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    return (base.exp() * (base - model)).sum(dim=-1)


def _kl_top_k(base: torch.Tensor, indices: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """KL over (top-k tokens of the base model + one 'everything else' bucket)."""
    base, picked = base.double(), model.gather(-1, indices).double()
    head = (base.exp() * (base - picked)).sum(dim=-1)
    rest_base = _log1mexp(torch.logsumexp(base, dim=-1))
    rest_model = _log1mexp(torch.logsumexp(picked, dim=-1))
    tail = torch.where(rest_base > -math.inf, rest_base.exp() * (rest_base - rest_model), torch.zeros_like(head))
    return head + tail


def kl_from_reference(reference: ProbeReference, model: nn.Module) -> float:
    """Mean over all probe positions of KL(base || model) in nats (0 for the base model itself)."""
    total = 0.0
    for i, lq in _prompt_logprobs(model, reference.input_ids, reference.batch_size):
        lp = reference.logprobs[i].to(lq.device)
        if reference.indices is None:
            per_position = _kl_full(lp, lq)
        else:
            per_position = _kl_top_k(lp, reference.indices[i].to(lq.device), lq)
        total += float(per_position.double().sum())
    return total / reference.n_tokens


# --------------------------------------------------------------------------------------------
# Weight drift


def _lora_layer_weights(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The dense weights a LoRA layer computes with: base (+ delta of each active, unmerged adapter)."""
    base = module.get_base_layer()
    out = {f"{prefix}{name}": p.detach() for name, p in base.named_parameters()}
    if module.merged or module.disable_adapters:  # merged: the deltas are already in the base weight
        return out
    weight, bias = out[f"{prefix}weight"], out.get(f"{prefix}bias")
    embedding_a = getattr(module, "lora_embedding_A", {})
    for adapter in module.active_adapters:
        if adapter not in module.lora_A and adapter not in embedding_a:
            continue
        variant = getattr(module, "lora_variant", {}).get(adapter)
        if variant is None:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        else:  # DoRA & co. rescale the merged weight; let the variant do it on a copy
            weight = variant.merge_safe(module, adapter, weight.clone())
        if getattr(module, "lora_bias", {}).get(adapter) and bias is not None:
            bias = bias + module.lora_B[adapter].bias.detach() * module.scaling[adapter]
    out[f"{prefix}weight"] = weight.detach()
    if bias is not None:
        out[f"{prefix}bias"] = bias.detach()
    return out


@functools.lru_cache(maxsize=1)
def _peft_layer_types() -> tuple[type, type, type]:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    return LoraLayer, BaseTunerLayer, ModulesToSaveWrapper


def _collect_weights(module: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    LoraLayer, BaseTunerLayer, ModulesToSaveWrapper = _peft_layer_types()
    if isinstance(module, LoraLayer):
        out.update(_lora_layer_weights(module, prefix))
        return
    if isinstance(module, BaseTunerLayer) and hasattr(module, "osf_svd_params"):  # OSF: base + its delta
        weight = module.get_base_layer().weight
        for adapter in [a for a in module.active_adapters if a in module.osf_svd_params] if not module.disable_adapters else []:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        out[f"{prefix}weight"] = weight.detach()
        if module.get_base_layer().bias is not None:
            out[f"{prefix}bias"] = module.get_base_layer().bias.detach()
        return
    if isinstance(module, BaseTunerLayer):
        raise NotImplementedError(
            f"effective_weights: {type(module).__name__} at '{prefix.rstrip('.')}' is not LoRA; "
            "only LoRA (incl. DoRA) adapters can be folded into dense weights"
        )
    if isinstance(module, ModulesToSaveWrapper):
        active = module.active_adapters[0] if module.active_adapters else None
        use_copy = not module.disable_adapters and active in module.modules_to_save
        _collect_weights(module.modules_to_save[active] if use_copy else module.original_module, prefix, out)
        return
    for name, param in module.named_parameters(recurse=False):
        out[f"{prefix}{name}"] = param.detach()
    for name, child in module.named_children():
        _collect_weights(child, f"{prefix}{name}.", out)


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> the dense weight the model effectively computes with.

    For a ``PeftModel`` with LoRA, each adapted layer's weight is base + ``get_delta_weight`` of the
    active unmerged adapters, keyed like the base model's ``state_dict`` (no ``base_model.model.``,
    ``.base_layer`` or adapter names), so it compares directly to the base model. Adapters that add
    no weights (prompt tuning) leave the base weights, i.e. zero weight drift. Tied weights appear
    under every name, as in ``state_dict``. Tensors live where the model's do; plain parameters are
    returned without a copy (detached views).
    """
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    out: dict[str, torch.Tensor] = {}
    _collect_weights(inner, "", out)
    return out


def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of :func:`effective_weights`, e.g. of the base model before training starts."""
    return {name: w.detach().to("cpu", copy=True) for name, w in effective_weights(model).items()}


def weight_rel_l2(base_weights: dict[str, torch.Tensor], model: nn.Module) -> float:
    """||theta - theta_0|| / ||theta_0|| over the floating-point weights present in both with equal shapes.

    A weight shared under several names (tied embeddings) is counted once. After block expansion the
    blocks are matched by identity, not position (``names_as_loaded``); the new blocks have no base.
    """
    current = names_as_loaded(model, effective_weights(model))
    num = den = 0.0
    seen: set[int] = set()
    for name, base in base_weights.items():
        weight = current.get(name)
        if weight is None or weight.shape != base.shape or not (weight.is_floating_point() and base.is_floating_point()):
            continue
        if weight.data_ptr() in seen:
            continue
        seen.add(weight.data_ptr())
        base64 = base.to(weight.device, torch.float64)
        num += float((weight.double() - base64).pow(2).sum())
        den += float(base64.pow(2).sum())
    if not seen:
        raise ValueError("no weights in common between base_weights and the model (different parameter names?)")
    return math.sqrt(num / den) if den > 0 else float("nan")


def ppl_delta(base_ppl: float, ppl: float) -> float:
    """Perplexity now minus the base model's on the same text: > 0 means general text got harder."""
    return float(ppl) - float(base_ppl)
