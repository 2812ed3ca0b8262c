"""EWC on LoRA (Zheng et al., ICLR 2026, arXiv 2602.17559): penalize the full update of each adapted matrix.

Listed with ``lora`` (``strategies: [lora, ewc-lora]``). For each adapted matrix with update
``Delta W = s B A``::

    L = L_task + lambda/2 * sum Omega * (Delta W)^2,     Omega = gamma * Omega + F after each source

with ``F`` the per-example diagonal Fisher of ``Delta W`` (equal to the base weight's Fisher),
captured by hooks on the adapted layers (``retain.stats.fisher.lora_delta_fisher``), per scored token
(see ``retain.stats.fisher``). After every task the adapter is merged exactly into the base weight
(``W += s B A``) and a fresh adapter starts (A: kaiming-uniform as peft initializes it, from a
generator seeded by (seed, task); B: zeros), so the next task's ``Delta W`` is measured from the
merged weights. The authors' code adds A and B across tasks, which creates cross terms; this merges
the product instead.

Exact in low precision: a bfloat16 weight keeps 8 bits of mantissa, so adding a small update into it
rounds most of the update away (about a third of a 1e-4 update on stories260K's weights). When an
adapted layer's base weight is bfloat16 or float16, the first merge turns that weight (and bias) into
float32 and keeps it there; the layer casts its input up and its output back to the original dtype,
so the rest of the model runs as before (under autocast the product is computed in the autocast
dtype as usual). Memory: the adapted weights take twice their bfloat16 size.

Sources as in ``ewc`` (``general`` statistics at the base weights count as the first accumulation;
an ``ewc`` importance file can supply them, its Fisher of W being the Fisher of Delta W).
State: one Omega per adapted matrix (Delta W-sized, ``state_dtype``).

``lambda_``: the authors use 1e7 with a Fisher computed as the batch-mean empirical Fisher scaled by
batch / N at batch 128, which is about 8e4 on a per-sample (here: per-token) Fisher. On
``retain bench stories-contracts`` (300 steps, lora r 8) that froze the model (gain 0.000, as 1e3 and
1e4 did); the default 3 keeps 78% of lora's new-task gain with 57% of its forgetting, 1 keeps 91% /
67%, 10 keeps 58% / 37% (``bench/strength_sweep.py``).

``variant: adapter`` is the older "EWC + LoRA": online EWC on the adapter weights themselves, one
adapter kept for the whole run (no merge); it is the same as ``[lora, ewc]`` with ``mode: online``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field
from torch import Tensor, nn

from retain.config import RunConfig
from retain.data.sampling import Stream, estimate_subset, seeded_generator
from retain.errors import ConfigError
from retain.losses.quadratic import lora_delta, weighted_square
from retain.models.adapters import canonical_name, linear_lora_layers
from retain.stats.files import load_importance, statistics_for
from retain.stats.fisher import lora_delta_fisher, online_update
from retain.strategies._shared.calibration import (
    DTYPES,
    CalibrationConfig,
    calibration_requirements,
    estimate_logged,
    resolve_source,
)
from retain.strategies.base import Strategy, StrategyContext, Strength, TaskInfo
from retain.strategies.ewc import Ewc, EwcConfig
from retain.strategies.registry import register_strategy


class EwcLoraConfig(CalibrationConfig):
    lambda_: float = Field(
        3.0,
        ge=0,
        validation_alias=AliasChoices("lambda_", "lambda"),
        description="Penalty strength on the per-token Fisher (authors' 1e7 is about 8e4 here; 3: the stories-contracts knee).",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Decay of the accumulated Omega (authors: 1).")
    variant: Literal["delta_w", "adapter"] = Field(
        "delta_w", description="delta_w: penalize s*B*A and merge after each task; adapter: EWC on A and B."
    )


def _adapter_name(module: nn.Module) -> str:
    names = list(module.lora_A.keys())
    if len(names) != 1:
        raise ConfigError(f"ewc-lora expects one LoRA adapter per layer, found {names}")
    return names[0]


def layer_delta(module: nn.Module) -> Tensor:
    """``Delta W`` of a peft LoRA linear layer in (out, in) layout, differentiable."""
    adapter = _adapter_name(module)
    return lora_delta(module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter])


LOW_PRECISION = (torch.bfloat16, torch.float16)


def keep_base_in_float32(module: nn.Module) -> bool:
    """Store a LoRA layer's base weight (and bias) in float32 if it is bfloat16/float16, and make the base
    layer compute in float32 and return its output in the original dtype. Returns whether it changed."""
    base = module.get_base_layer()
    original = base.weight.dtype
    if original not in LOW_PRECISION or getattr(base, "_retain_float32_from", None) is not None:
        return False
    with torch.no_grad():
        base.weight.data = base.weight.data.float()
        if getattr(base, "bias", None) is not None:
            base.bias.data = base.bias.data.float()
    base._retain_float32_from = original

    def upcast_input(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].to(layer.weight.dtype),) + tuple(args[1:])

    def restore_output(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output.to(original)

    base.register_forward_pre_hook(upcast_input)
    base.register_forward_hook(restore_output)
    return True


@torch.no_grad()
def merge_and_reset(layers: dict[str, nn.Module], generator: torch.Generator) -> None:
    """``W += s B A`` exactly (float32, the base weight kept in float32 when it was lower precision:
    ``keep_base_in_float32``), then A re-initialized (kaiming-uniform, a=sqrt(5)) and B zeroed.

    Layers are visited in sorted name order so the seeded generator gives the same adapters on every
    process and on resume.
    """
    for name in sorted(layers):
        module = layers[name]
        adapter = _adapter_name(module)
        keep_base_in_float32(module)
        base = module.get_base_layer().weight
        delta = layer_delta(module).float()
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        base.copy_((base.float() + delta).to(base.dtype))
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        fresh = torch.empty(lora_a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        lora_a.copy_(fresh.to(lora_a.device, lora_a.dtype))
        lora_b.zero_()


@register_strategy("ewc-lora")
class EwcLora(Strategy):
    sharding_refusal = "it trains LoRA adapters, which train.parallel: fsdp does not shard; use train.parallel: ddp"
    Config = EwcLoraConfig
    strength = Strength("lambda_", 1e-2, 1e6)
    quadratic_state = True
    input_path_keys = ("file",)
    modifies_frozen_weights = True
    needs_strategies = frozenset({"lora"})

    def __init__(self, config: EwcLoraConfig | None = None) -> None:
        super().__init__(config)
        self.omega: dict[str, Tensor] | None = None
        self.general_done = False
        self.merges = 0
        self._source: str | None = None
        self._layers: dict[str, nn.Module] | None = None
        self._adapter_ewc: Ewc | None = None
        if self.config.variant == "adapter":
            keys = set(CalibrationConfig.model_fields)
            fields = {k: getattr(self.config, k) for k in keys}
            self._adapter_ewc = Ewc(EwcConfig(**fields, lambda_=self.config.lambda_, mode="online", gamma=self.config.gamma))
            self._adapter_ewc.name = self.name

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        return calibration_requirements(self.config, run, where)

    def set_strength(self, value: float) -> None:
        super().set_strength(value)
        if self._adapter_ewc is not None:  # the adapter variant's penalty is the inner EWC's
            self._adapter_ewc.set_strength(value)

    # hooks ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        self._source = resolve_source(self.config, ctx.config)
        if self._adapter_ewc is not None:
            return self._adapter_ewc.setup(model, ctx)
        return model

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self._adapter_ewc is not None:
            return self._adapter_ewc.before_task(task, ctx)
        layers = self._live(ctx)
        if self._source in ("general", "both") and not self.general_done:
            self._accumulate(self._general_fisher(layers, ctx))
            self.general_done = True

    def extra_losses(self, outputs: Any, batch: dict[str, Tensor], ctx: StrategyContext) -> dict[str, Tensor]:
        if self._adapter_ewc is not None:
            return self._adapter_ewc.extra_losses(outputs, batch, ctx)
        if self.omega is None or self.config.lambda_ == 0:
            return {}
        layers = self._live(ctx)
        total = None
        for name, module in layers.items():
            term = weighted_square(layer_delta(module), None, self.omega[name])
            total = term if total is None else total + term
        return {"penalty": 0.5 * self.config.lambda_ * total}

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self._adapter_ewc is not None:
            return self._adapter_ewc.after_task(task, ctx)
        layers = self._live(ctx)
        if self._source in ("previous_task", "both") and task.index < len(ctx.tasks) - 1:
            seed = ctx.seed_for(self, Stream.TASK_FISHER, task.index)
            examples = estimate_subset(task.train_examples, self.config.max_examples, seed)
            self._accumulate(self._estimate(layers, examples, ctx, seed))
        merge_and_reset(layers, seeded_generator(ctx.seed_for(self, Stream.LORA_RESET, task.index)))
        self.merges += 1

    # state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._adapter_ewc is not None:
            return {"adapter": self._adapter_ewc.state_dict()}
        state: dict[str, Any] = {"general_done": self.general_done, "merges": self.merges}
        if self.omega is not None:
            state["omega"] = self.omega
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        if self._adapter_ewc is not None:
            return self._adapter_ewc.load_state_dict(state.get("adapter", {}), ctx)
        self.general_done = bool(state.get("general_done", False))
        self.merges = int(state.get("merges", 0))
        self.omega = dict(state["omega"]) if "omega" in state else None
        self._layers = None
        if self.merges > 0:  # before the checkpoint's (float32) merged weights are loaded into the model
            for module in linear_lora_layers(ctx.unwrapped_model, self.name).values():
                keep_base_in_float32(module)

    # internals --------------------------------------------------------------------------

    def _live(self, ctx: StrategyContext) -> dict[str, nn.Module]:
        if self._layers is None:
            layers = linear_lora_layers(ctx.unwrapped_model, self.name)
            if not layers:
                raise ConfigError("ewc-lora found no LoRA layers: list lora before it, e.g. strategies: [lora, ewc-lora]")
            self._layers = layers
            if self.omega is not None:
                if set(self.omega) != set(layers):
                    raise RuntimeError("ewc-lora: the adapted layers changed since Omega was computed")
                self.omega = {n: t.to(layers[n].get_base_layer().weight.device) for n, t in self.omega.items()}
        return self._layers

    def _accumulate(self, fisher: dict[str, Tensor]) -> None:
        dtype = DTYPES[self.config.state_dtype]
        merged = online_update(self.omega, fisher, self.config.gamma)
        self.omega = {n: t.to(dtype) for n, t in merged.items()}

    def _general_fisher(self, layers: dict[str, nn.Module], ctx: StrategyContext) -> dict[str, Tensor]:
        if self.config.file is not None:
            loaded = load_importance(self.config.file, model=ctx.unwrapped_model, methods=("ewc",))
            weights = {name: f"{canonical_name(name)}.weight" for name in layers}
            stats = statistics_for(loaded, list(weights.values()), self.config.file)
            out = {}
            for name, module in layers.items():
                value = stats[weights[name]].float()
                out[name] = (value.T if getattr(module, "fan_in_fan_out", False) else value).to(
                    module.get_base_layer().weight.device
                )
            return out
        seed = ctx.seed_for(self)  # the base seed, as `retain importance compute --seed` uses it
        examples = estimate_subset(ctx.general_examples(self.config.data, self.name), self.config.max_examples, seed)
        return self._estimate(layers, examples, ctx, seed)

    def _estimate(self, layers: dict[str, nn.Module], examples: list, ctx: StrategyContext, seed: int) -> dict[str, Tensor]:
        return estimate_logged(lora_delta_fisher, layers, examples, ctx, self.name, self.config, seed)
