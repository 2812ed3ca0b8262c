"""Block expansion (LLaMA Pro, Wu et al., ACL 2024, arXiv 2401.02415; authors' ``TencentARC/LLaMA-Pro``
``scripts/block_expansion.py``): deepen the model with new decoder blocks that start as the identity,
and train only them, so every original weight stays as it was.

Each new block is a copy of the block below it with its output projections (``o_proj`` of the
attention, ``down_proj`` of the MLP) set to zero: in a pre-norm block ``h + Attn(Norm(h))`` and
``h + MLP(Norm(h))`` then add nothing, so the expanded model's outputs equal the original's exactly
before training. The L original blocks are split into P = ``new_blocks`` equal groups and a copy
follows the last block of each group (the paper: LLaMA-2-7B, 32 -> 40 blocks, P = 8, one after every 4th).
Only the new blocks train (the paper freezes the embeddings and the head as well); ``train_head: true``
also trains the output head (with tied embeddings, as in the tiny test models, that is the input
embedding matrix too, which changes what the original blocks see).

Zeroed output projections make the gradients of the new blocks' other weights zero at the first step
(their output is multiplied by a zero matrix): the first updates move ``o_proj``/``down_proj``, and the
rest follow from the second step. This is the paper's initialisation, kept as is.

The expanded model is an ordinary model of its architecture with more blocks (renumbered in order,
``config.num_hidden_layers`` and each attention's ``layer_idx`` updated; :mod:`retain.models.expansion`),
so its saved directory loads with plain ``AutoModelForCausalLM.from_pretrained``. On resume ``setup``
rebuilds the same expansion from the base model (it is deterministic) before the checkpoint's trained
blocks are loaded. Parameter names of the original blocks shift when a new block is inserted before
them, so a comparison with the base model by parameter name (weight drift) must map names first.
"""

from __future__ import annotations


from pydantic import Field
from torch import nn

from retain.errors import ConfigError
from retain.models.expansion import decoder_blocks, expand_blocks
from retain.strategies.base import Strategy, StrategyConfig, StrategyContext
from retain.strategies.registry import register_strategy

DEFAULT_EXPANSION = 0.25  # the paper's 8 new blocks on 32


class BlockExpansionConfig(StrategyConfig):
    new_blocks: int | None = Field(
        None, gt=0, description="Identity blocks to insert, spread evenly (one after each of new_blocks equal groups); "
        "default: expansion x the model's blocks."
    )
    expansion: float = Field(
        DEFAULT_EXPANSION, gt=0, description="New blocks per original block when new_blocks is unset (0.25: the "
        "paper's 32 -> 40; 1: twice the depth), rounded, at least one."
    )
    train_head: bool = Field(False, description="Also train the output head (tied embeddings train with it).")


@register_strategy("block-expansion")
class BlockExpansion(Strategy):
    Config = BlockExpansionConfig
    wraps_model = True

    @classmethod
    def extra_passes(cls, config: StrategyConfig, *, adapters: bool) -> float:
        """The new blocks' share of the depth: their forward and backward on top of the original model's
        (whose frozen blocks skip their weight gradients, about a third of their backward). With an
        explicit ``new_blocks`` the depth is not known before the model loads: the declaration uses
        ``expansion``."""
        assert isinstance(config, BlockExpansionConfig)
        return float(config.expansion)

    def blocks_to_add(self, original: int) -> int:
        if self.config.new_blocks is not None:
            return self.config.new_blocks
        return max(1, round(original * self.config.expansion))

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        original = len(decoder_blocks(model))
        self.added = expand_blocks(model, self.blocks_to_add(original))
        layers = decoder_blocks(model)
        trainable = {id(p) for i in self.added for p in layers[i].parameters()}
        if self.config.train_head:
            head = model.get_output_embeddings()
            if head is None:
                raise ConfigError("block-expansion.train_head: this model has no output head")
            trainable |= {id(p) for p in head.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)
        return model
