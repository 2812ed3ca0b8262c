"""O-LoRA (Wang et al., EMNLP Findings 2023; code cmnfriend/O-LoRA): a fresh LoRA per task, learned in a
subspace orthogonal to the earlier tasks' adapters.

Layout (the authors' own): every adapted layer carries two peft adapters while a task trains,
- ``default``: the earlier tasks' adapters, frozen, stacked into one adapter of rank ``r * tasks_done``
  (A = [A_1; ...; A_k] row-wise, B = [B_1, ..., B_k] column-wise, so ``B A = sum_i B_i A_i``);
- ``olora_new``: the current task's rank-``r`` adapter, trainable.
Both are active, so the forward pass is ``W x + s * sum_i B_i A_i x``: the sum of all adapters, with no
task id. The loss adds ``lambda1 * sum_layers sum |A_past A_new^T|`` (default 0.5) and optionally
``lambda2 * sum ||A_new|| + ||B_new||`` (default 0). After a task its adapter is appended to ``default``
by copying the tensors, so earlier adapters stay bit-identical; the first task trains ``default`` itself.

Between tasks the model therefore holds exactly one standard LoRA adapter, so per-task and final model
directories are ordinary peft adapter folders that ``PeftModel.from_pretrained`` (and ``retain eval`` /
``retain merge``) load with every task included.

Resume: the frozen stack is in ``state_dict`` (checkpoints hold only trainable weights), and
``load_state_dict`` rebuilds ``default`` at its grown rank and re-adds ``olora_new`` if the task had
started, before the checkpointed weights are loaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from retain.errors import ConfigError
from retain.losses.subspace import l2_norm_penalty, orthogonality_penalty
from retain.models.adapters import lora_layers
from retain.strategies.base import Strategy, StrategyContext, Strength, TaskInfo
from retain.strategies.lora import LoraConfig, peft_lora_config
from retain.strategies.registry import register_strategy

HISTORY = "default"
CURRENT = "olora_new"


class OLoraConfig(LoraConfig):
    lambda1: float = Field(0.5, ge=0.0, description="Weight of the orthogonality term sum |A_past A_new^T|.")
    lambda2: float = Field(0.0, ge=0.0, description="Weight of the L2 term on the new adapter (authors' default 0).")

    @model_validator(mode="after")
    def _adapters_only(self) -> "OLoraConfig":
        if self.bias != "none":
            raise ValueError("o-lora needs bias: none (trained biases would be shared by every task's adapter)")
        return self


def _untouched_rng(model: nn.Module):
    """Run a block without advancing the global RNG streams (CPU and the model's CUDA device)."""
    device = next(model.parameters()).device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@register_strategy("o-lora")
class OLora(Strategy):
    Config = OLoraConfig
    strength = Strength("lambda1", 1e-2, 1e2)
    wraps_model = True
    peft_wrapper = True
    min_tasks = 2  # with one task it is plain lora

    # ---- structure ------------------------------------------------------------------------------

    def _peft_config(self, rank: int):
        """A peft LoRA config of ``rank`` whose scaling equals the per-task adapters' scaling."""
        config = peft_lora_config(self.config)
        alpha = self.config.alpha if self.config.alpha is not None else 2 * self.config.r
        per_task = alpha / (math.sqrt(self.config.r) if self.config.use_rslora else self.config.r)
        config.r = rank
        config.lora_alpha = per_task * (math.sqrt(rank) if self.config.use_rslora else rank)
        return config

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import get_peft_model

        self.history_rank = 0  # rank of the frozen stack in HISTORY; 0 while the first task trains it
        self.has_current = False
        model = get_peft_model(model, self._peft_config(self.config.r), adapter_name=HISTORY)
        if any(HISTORY in getattr(m, "lora_embedding_A", {}) for _, m in lora_layers(model).items()):
            raise ConfigError("o-lora adapts linear layers only; remove embedding layers from target_modules")
        self.peft_model = model  # the object stays the same under accelerate's wrapper
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        return model

    def _set_trainable(self, peft_model: nn.Module) -> None:
        """Only the adapter being learned trains: HISTORY during the first task, CURRENT afterwards."""
        training = CURRENT if self.has_current else (HISTORY if self.history_rank == 0 else None)
        for _, layer in lora_layers(peft_model).items():
            for name in list(layer.lora_A.keys()):
                for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
                    p.requires_grad_(name == training)

    def _add_current(self, peft_model: nn.Module) -> None:
        peft_model.add_adapter(CURRENT, self._peft_config(self.config.r))
        peft_model.base_model.set_adapter([HISTORY, CURRENT])
        self.has_current = True
        self._set_trainable(peft_model)

    def _rebuild_history(self, peft_model: nn.Module, rank: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace HISTORY by an adapter of ``rank`` holding exactly ``tensors`` (layer name -> (A, B))."""
        active = [HISTORY, CURRENT] if CURRENT in peft_model.peft_config else [HISTORY]
        with _untouched_rng(peft_model):  # the fresh init is overwritten: leave the run's RNG alone
            peft_model.delete_adapter(HISTORY)
            peft_model.add_adapter(HISTORY, self._peft_config(rank))
        peft_model.base_model.set_adapter(active)
        with torch.no_grad():
            for name, layer in lora_layers(peft_model).items():
                a, b = tensors[name]
                layer.lora_A[HISTORY].weight.copy_(a)
                layer.lora_B[HISTORY].weight.copy_(b)
        self.history_rank = rank

    def _history_tensors(self, peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            name: (layer.lora_A[HISTORY].weight.detach().clone(), layer.lora_B[HISTORY].weight.detach().clone())
            for name, layer in lora_layers(peft_model).items()
        }

    # ---- hooks ----------------------------------------------------------------------------------

    def _collect_pairs(self) -> None:
        """(A_past, A_new) per layer for the orthogonality term; empty while the first task trains."""
        self._pairs = [
            (layer.lora_A[HISTORY].weight, layer.lora_A[CURRENT].weight)
            for _, layer in lora_layers(self.peft_model).items()
            if self.has_current
        ]

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self.history_rank > 0 and not self.has_current:
            self._add_current(self.peft_model)
        self._collect_pairs()

    def extra_losses(self, outputs: Any, batch: Any, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        if not self.has_current:
            return {}
        terms = {"orthogonality": self.config.lambda1 * orthogonality_penalty(self._pairs)}
        if self.config.lambda2 > 0:
            new = [p for _, layer in lora_layers(self.peft_model).items() for p in (layer.lora_A[CURRENT].weight, layer.lora_B[CURRENT].weight)]
            terms["l2"] = self.config.lambda2 * l2_norm_penalty(new)
        return terms

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        """Append the finished task's adapter to the frozen stack (exact copies), leaving one adapter."""
        peft_model = self.peft_model
        if self.has_current:
            stacked = {
                name: (
                    torch.cat([layer.lora_A[HISTORY].weight, layer.lora_A[CURRENT].weight], dim=0).detach(),
                    torch.cat([layer.lora_B[HISTORY].weight, layer.lora_B[CURRENT].weight], dim=1).detach(),
                )
                for name, layer in lora_layers(peft_model).items()
            }
            peft_model.base_model.set_adapter(HISTORY)
            peft_model.delete_adapter(CURRENT)
            self.has_current = False
            self._rebuild_history(peft_model, self.history_rank + self.config.r, stacked)
        else:
            self.history_rank = self.config.r
        self._set_trainable(peft_model)
        self._pairs = []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history_rank": self.history_rank, "has_current": self.has_current}
        if self.history_rank > 0:
            # frozen weights are not in the checkpoint's (trainable-only) weights: keep them here
            state["history"] = {name: {"A": a, "B": b} for name, (a, b) in self._history_tensors(self.peft_model).items()}
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        if not state:
            return
        peft_model = self.peft_model
        rank = int(state["history_rank"])
        if rank > 0:
            tensors = {name: (v["A"], v["B"]) for name, v in state["history"].items()}
            self._rebuild_history(peft_model, rank, tensors)
        if state["has_current"]:
            with _untouched_rng(peft_model):  # its values come from the checkpoint's weights
                self._add_current(peft_model)
        self._set_trainable(peft_model)
        self._collect_pairs()
