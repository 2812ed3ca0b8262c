"""Orthogonal Subspace Fine-tuning through peft's ``OSFConfig`` (Nayak et al. 2025, "Sculpting Subspaces:
Constrained Full Fine-Tuning in LLMs for Continual Learning"): each adapted weight is split by SVD
into its top ``effective_rank`` singular directions, frozen (what the model relies on most), and the
rest, which trains; PEFT's gradient hooks project every update of the trainable factors orthogonal to
the frozen subspace, so the update never touches the high singular directions.

``effective_rank`` is a share of each matrix's smaller dimension (PEFT reads a float in (0, 1] so);
the paper's default keeps half. It is the declared strength: a larger share freezes more of the
pre-trained directions and protects more. The model starts exactly at the base (the trainable factors
begin as the SVD's low part). The base weights are never changed (adapters off is the base model), so
the export is an OSF adapter directory that ``retain.models.loading.load_any`` (PEFT) loads. The
hooks project the *gradient*; AdamW's per-entry scaling and weight decay then move the factors slightly
out of the projected space, as in PEFT's and the authors' training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from retain.strategies.base import Strategy, StrategyConfig, StrategyContext, Strength
from retain.strategies.registry import register_strategy


class OsfConfig(StrategyConfig):
    effective_rank: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of each matrix's smaller dimension whose top singular directions "
        "stay frozen (the rest trains, orthogonal to them)."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head)."
    )


@register_strategy("osf")
class Osf(Strategy):
    Config = OsfConfig
    wraps_model = True
    peft_wrapper = True
    strength = Strength("effective_rank", 0.1, 0.95, log=False)

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import OSFConfig, get_peft_model

        config = OSFConfig(effective_rank=float(self.config.effective_rank), target_modules=self.config.target_modules)
        return get_peft_model(model, config)
