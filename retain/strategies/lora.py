"""LoRA through peft: the base weights stay frozen and bit-identical; low-rank adapters train.

Defaults follow Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"): alpha = 2r, all linear
layers. LoRA limits how many weights move, not which functions change, so it still forgets.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from retain.strategies.base import Strategy, StrategyConfig, StrategyContext
from retain.strategies.registry import register_strategy


class LoraConfig(StrategyConfig):
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator; default 2 * r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head)."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False


def peft_lora_config(config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.r,
        lora_alpha=config.alpha if config.alpha is not None else 2 * config.r,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        bias=config.bias,
        use_rslora=config.use_rslora,
    )


@register_strategy("lora")
class Lora(Strategy):
    Config = LoraConfig
    wraps_model = True
    peft_wrapper = True
    compatible_with = frozenset({"ewc-lora"})

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, peft_lora_config(self.config))
