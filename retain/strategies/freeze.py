"""Partial fine-tuning: only the named modules or the top N transformer blocks train.

Users often believe freezing most of the network prevents forgetting; this strategy lets them test it
on the same benchmark as everything else.
"""

from __future__ import annotations

import fnmatch

from pydantic import Field, model_validator
from torch import nn

from retain.errors import ConfigError
from retain.strategies.base import Strategy, StrategyConfig, StrategyContext
from retain.strategies.registry import register_strategy


class FreezeConfig(StrategyConfig):
    trainable: list[str] = Field(
        default_factory=list,
        description="Glob patterns over parameter names that train, e.g. ['*.mlp.*'] or ['*.layers.4.*'].",
    )
    top_layers: int | None = Field(None, gt=0, description="Train only the top N transformer blocks.")
    train_embeddings: bool = Field(False, description="Also train the token embeddings (tied LM heads follow).")
    train_final_norm: bool = Field(False, description="Also train the final normalization layer.")

    @model_validator(mode="after")
    def _something_trains(self) -> "FreezeConfig":
        if not self.trainable and self.top_layers is None and not self.train_embeddings:
            raise ValueError("set 'trainable' patterns or 'top_layers' (nothing would train)")
        return self


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the longest ModuleList (model.layers, transformer.h, ...)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ConfigError("freeze.top_layers: this model has no list of transformer blocks; use 'trainable' patterns")
    return best


def trainable_names(model: nn.Module, config: FreezeConfig) -> set[str]:
    names = {name for name, _ in model.named_parameters()}
    chosen = {n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in config.trainable)}
    if config.top_layers is not None:
        prefix, blocks = transformer_blocks(model)
        first = max(0, len(blocks) - config.top_layers)
        wanted = tuple(f"{prefix}.{i}." for i in range(first, len(blocks)))
        chosen |= {n for n in names if n.startswith(wanted)}
    if config.train_embeddings:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        chosen |= {n for n, p in model.named_parameters() if embedding is not None and p is embedding.weight}
    if config.train_final_norm:
        prefix, _ = transformer_blocks(model)
        chosen |= {n for n in names if not n.startswith(prefix + ".") and ("norm" in n or "ln_f" in n)}
    return chosen


@register_strategy("freeze")
class Freeze(Strategy):
    Config = FreezeConfig
    wraps_model = True
    supports_sharding = True  # FSDP2 reduces only the gradients of the weights that train

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        chosen = trainable_names(model, self.config)
        if not chosen:
            raise ConfigError(
                f"freeze: no parameter matches {self.config.trainable}. Example names: "
                + ", ".join(n for n, _ in list(model.named_parameters())[:5])
            )
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in chosen)
        return model
