"""LoRA through peft: the base weights stay frozen; low-rank adapters train.

Defaults follow Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"): alpha = 2r, all linear
layers. LoRA limits how many weights move, not which functions change, so it still forgets.

``init`` chooses the subspace the adapter starts in (each computes exactly the base model at step 0):

- ``default``: B = 0, A random (Hu et al. 2021); the base weights stay bit-identical.
- ``pissa`` (Meng et al. 2024): A, B from the r *largest* singular triplets of W, the base keeps the
  residual: the adapter trains the principal directions (learns fast, forgets more).
- ``milora`` (Wang et al. 2024, arXiv 2406.09044): the r *smallest* singular triplets, the residual in the
  base: training touches the directions the pre-trained weight uses least (``retain.models.adapters.minor_factors``).
- ``olora`` (Büyükakyüz 2024): A, B from the QR decomposition of W (B = Q_r, A = R_r), residual in the base.
- ``corda`` (Yang et al. 2024), knowledge-preserving mode (PEFT's ``corda_method="kpm"``): the SVD of W C,
  C the covariance of each layer's inputs on ``calibration_examples`` examples of general text (the run's
  ``general_data``, drawn with ``Stream.LORA_CALIBRATION``); the adapter starts on the r components
  *least* used by general text, the rest is frozen in the base.

Every init but ``default`` changes the base weights (the residual), so the adapter alone is not the
model: checkpoints hold full weights and the exported model is the merged full model (it loads with
``from_pretrained``). The model with adapters off is then the residual, not the base, so hybrids that
read the base through ``disable_adapter`` (lwf's ``adapters_off`` teacher, stm, flow, wise) are refused.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from retain.config import RunConfig
from retain.data.sampling import Stream, seeded_subset
from retain.models.adapters import lora_layers, minor_factors
from retain.strategies.base import Strategy, StrategyConfig, StrategyContext, has_general_text
from retain.strategies.registry import register_strategy

logger = logging.getLogger("retain")

#: Inits that move part of the base weight into the adapter (the base keeps a residual).
RESIDUAL_INITS = frozenset({"pissa", "milora", "olora", "corda"})
#: Strategies that read the base model as the training model with its adapters off.
READS_BASE_THROUGH_ADAPTERS_OFF = ("stm", "flow", "wise")


class LoraConfig(StrategyConfig):
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator; default 2 * r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head)."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init: Literal["default", "pissa", "milora", "olora", "corda"] = Field(
        "default", description="The subspace the adapter starts in (see the module docstring); all but default "
        "keep a residual in the base weights."
    )
    calibration_examples: int = Field(
        32, gt=0, description="corda: general-text examples whose layer inputs give the covariance."
    )


def peft_lora_config(config: LoraConfig, target_modules: list[str] | str | None = None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    extra = {}
    if config.init in ("pissa", "olora"):
        extra["init_lora_weights"] = config.init
    elif config.init == "corda":
        from peft.tuners.lora.config import CordaConfig

        extra = {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method="kpm")}
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.r,
        lora_alpha=config.alpha if config.alpha is not None else 2 * config.r,
        lora_dropout=config.dropout,
        target_modules=target_modules if target_modules is not None else config.target_modules,
        bias=config.bias,
        use_rslora=config.use_rslora,
        **extra,
    )


def linear_leaf_names(model: nn.Module) -> list[str]:
    """'all-linear' spelled out (CorDA's hooks match names only): the leaf names of every linear layer
    but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and module is not head})


def apply_milora(model: nn.Module, adapter: str = "default") -> None:
    """Re-initialise every LoRA linear layer of ``adapter`` on its weight's minor singular triplets."""
    with torch.no_grad():
        for module in lora_layers(model).values():
            if adapter not in module.lora_A:
                continue
            base = module.get_base_layer()
            a, b, residual = minor_factors(base.weight, module.r[adapter], module.scaling[adapter])
            module.lora_A[adapter].weight.copy_(a.to(module.lora_A[adapter].weight.dtype))
            module.lora_B[adapter].weight.copy_(b.to(module.lora_B[adapter].weight.dtype))
            base.weight.copy_(residual.to(base.weight.dtype))


@register_strategy("lora")
class Lora(Strategy):
    Config = LoraConfig
    wraps_model = True
    peft_wrapper = True
    compatible_with = frozenset({"ewc-lora"})

    def __init__(self, config: LoraConfig | None = None) -> None:
        super().__init__(config)
        # a residual init changes the base weights: checkpoints and the export keep full weights
        self.modifies_frozen_weights = self.config.init in RESIDUAL_INITS

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        if self.config.init not in RESIDUAL_INITS:
            return []
        problems = []
        for spec in run.strategies:
            adapters_off = spec.name == "lwf" and spec.params.get("teacher", "auto") in ("auto", "adapters_off")
            if spec.name in READS_BASE_THROUGH_ADAPTERS_OFF or adapters_off:
                problems.append(
                    f"lora.init: {self.config.init} keeps a residual in the base weights, so the model with adapters "
                    f"off is not the base model that {spec.name} reads"
                    + ("; set lwf.teacher: copy or cached_topk" if spec.name == "lwf" else "; use lora.init: default")
                )
        if self.config.init == "corda" and not has_general_text(None, run):
            problems.append("lora.init: corda calibrates on general text: set the run's general_data")
        return problems

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import get_peft_model

        if self.config.init == "corda":
            return self._corda(model, ctx)
        wrapped = get_peft_model(model, peft_lora_config(self.config))
        if self.config.init == "milora":
            apply_milora(wrapped)
        return wrapped

    def _corda(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import get_peft_model
        from peft.tuners.lora.corda import preprocess_corda

        targets = linear_leaf_names(model) if self.config.target_modules == "all-linear" else None
        peft_config = peft_lora_config(self.config, targets)
        pool = ctx.general_examples(None, "lora (init: corda)")
        chosen = seeded_subset(pool, self.config.calibration_examples,
                               ctx.seed_for(self, Stream.LORA_CALIBRATION))
        device = next(model.parameters()).device
        was_training = model.training

        def run_model() -> None:  # one example per forward: PEFT's hook squeezes a batch of one, no padding
            for example in chosen:
                model(input_ids=torch.tensor([example.input_ids], device=device))

        with torch.no_grad():
            preprocess_corda(model, peft_config, run_model=run_model)
        model.train(was_training)
        logger.info("lora: CorDA (kpm) calibrated on %d general examples", len(chosen))
        return get_peft_model(model, peft_config)
