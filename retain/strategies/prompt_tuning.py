"""Prompt tuning through peft: a trainable soft prompt; every base weight untouched (Lester et al. 2021)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from retain.strategies.base import Strategy, StrategyConfig, StrategyContext
from retain.strategies.registry import register_strategy


class PromptTuningConfig(StrategyConfig):
    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["random", "text"] = Field("random", description="Start from random vectors or a text's embeddings.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt (init=text).")

    @model_validator(mode="after")
    def _text_given(self) -> "PromptTuningConfig":
        if self.init == "text" and not self.init_text:
            raise ValueError("init=text needs init_text")
        return self


@register_strategy("prompt-tuning")
class PromptTuning(Strategy):
    Config = PromptTuningConfig
    wraps_model = True
    peft_wrapper = True

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import PromptTuningConfig as PeftPromptTuningConfig
        from peft import PromptTuningInit, TaskType, get_peft_model

        kwargs = {}
        if self.config.init == "text":
            kwargs = {
                "prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": self.config.init_text,
                "tokenizer_name_or_path": getattr(ctx.tokenizer, "name_or_path", None),
            }
        peft_config = PeftPromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.config.num_virtual_tokens, **kwargs
        )
        return get_peft_model(model, peft_config)
