"""Block expansion (LLaMA Pro, Wu et al., ACL 2024, arXiv 2401.02415): deepen a decoder with blocks that
start as the identity, so the expanded model computes exactly what the original did.

A pre-norm decoder block computes ``h + Attn(Norm(h))`` and then ``h + MLP(Norm(h))``. A copy of a block
whose attention output projection (``o_proj``) and MLP output projection (``down_proj``) are zero adds
nothing to the residual stream: it is the identity, whatever its other weights are. The authors'
``scripts/block_expansion.py`` splits the L original blocks into P groups of L / P and puts such a copy of
each group's last block right after it (32 -> 40 blocks for LLaMA-2-7B: P = 8, after blocks 3, 7, ..., 31).
:func:`expansion_plan` spreads P blocks the same way when P does not divide L, and when P > L (several
copies after one block; a copy of a zeroed copy would be the same block).

The model is changed in place so that ``save_pretrained`` writes a model that plain
``AutoModelForCausalLM.from_pretrained`` loads: the blocks are renumbered in order (``model.layers.<i>``),
``config.num_hidden_layers`` (and ``config.layer_types``, where a model has one) counts the new blocks, and
every attention module's ``layer_idx`` (its slot in the KV cache) is its block's new index.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from retain.errors import ConfigError

#: Attribute of an expanded decoder's block list: each block's index in the model as loaded (None: a new block).
ORIGIN_ATTRIBUTE = "retain_block_origin"

#: The output projections zeroed in a new block (Llama, Mistral, Qwen2 names), as in the authors' script.
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


def expansion_plan(original: int, new: int) -> list[int]:
    """How many new blocks follow each original block: ``floor((i+1) P / L) - floor(i P / L)`` for block i,
    i.e. one after the last block of each of P equal groups (the authors' split when P divides L)."""
    if original < 1 or new < 0:
        raise ValueError(f"cannot expand {original} blocks by {new}")
    return [(i + 1) * new // original - i * new // original for i in range(original)]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks (``model.model.layers`` for Llama-style causal LMs)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"block-expansion needs a Llama-style decoder (model.model.layers); {type(model).__name__} has none"
        )
    return layers


def _submodule(block: nn.Module, path: str) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise ConfigError(
            f"block-expansion zeroes each new block's output projections {', '.join(OUTPUT_PROJECTIONS)}; "
            f"{type(block).__name__} has no '{path}' (supported: Llama, Mistral, Qwen2-style blocks)"
        ) from None


def identity_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` with its output projections zeroed: the identity on the residual stream."""
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for path in OUTPUT_PROJECTIONS:
            for parameter in _submodule(fresh, path).parameters():
                parameter.zero_()
    return fresh


def expand_blocks(model: nn.Module, new_blocks: int) -> list[int]:
    """Insert ``new_blocks`` identity copies among the model's blocks (in place); their new indices."""
    layers = decoder_blocks(model)
    for path in OUTPUT_PROJECTIONS:
        _submodule(layers[0], path)  # refuse an unsupported block before changing anything
    plan = expansion_plan(len(layers), new_blocks)
    config = model.config
    types = list(getattr(config, "layer_types", None) or [])
    blocks: list[nn.Module] = []
    new_types: list = []
    added: list[int] = []
    for i, (block, copies) in enumerate(zip(list(layers), plan)):
        blocks.append(block)
        new_types += types[i : i + 1]
        for _ in range(copies):
            added.append(len(blocks))
            blocks.append(identity_copy(block))
            new_types += types[i : i + 1]  # a copy attends as the block it copies
    for index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    origin = list(getattr(layers, ORIGIN_ATTRIBUTE, range(len(layers))))
    del layers[:]  # in place: the decoder keeps its ModuleList
    layers.extend(blocks)
    kept = iter(origin)
    setattr(layers, ORIGIN_ATTRIBUTE, [None if i in added else next(kept) for i in range(len(blocks))])
    config.num_hidden_layers = len(blocks)
    if types:
        config.layer_types = new_types
    return added


def names_as_loaded(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` (named as in ``model``, or its peft base model) renamed to the model as loaded: after an
    expansion ``model.layers.5`` may be a new block and the loaded block 4 now ``model.layers.6``; new
    blocks are dropped (they have no counterpart). Unchanged for a model that was never expanded. What
    drift by parameter name (``weight_rel_l2``) needs to compare a block with itself."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:
        layers = decoder_blocks(inner)
    except ConfigError:
        return weights
    origin = getattr(layers, ORIGIN_ATTRIBUTE, None)
    prefix = next((name for name, module in inner.named_modules() if module is layers), None)
    if origin is None or prefix is None:
        return weights
    out: dict[str, torch.Tensor] = {}
    head = prefix + "."
    for name, value in weights.items():
        if not name.startswith(head):
            out[name] = value
            continue
        index, _, rest = name[len(head):].partition(".")
        source = origin[int(index)] if index.isdigit() and int(index) < len(origin) else None
        if source is not None:
            out[f"{head}{source}.{rest}"] = value
    return out
