"""Progressive Prompts (Razdaibiedina et al., ICLR 2023; code arazd/ProgressivePrompts): a new soft
prompt per task, prepended to the earlier tasks' frozen prompts; the base model never changes.

The input of task k is ``[P_k; P_{k-1}; ...; P_1; x]`` (newest first, as in the authors' code), and
inference uses the whole stack with no task id. A new prompt starts from the embeddings of random
vocabulary tokens (the authors' initialisation) or from random vectors.

Built on peft prompt tuning: the stack is the rows of one peft prompt embedding of
``num_virtual_tokens * tasks`` rows; at each new task the embedding grows by ``num_virtual_tokens`` rows
at the front. Only those rows learn: the gradients of the older rows are zeroed after backward, and
their values are copied back after every optimizer step (weight decay would otherwise shrink them), so
earlier prompts stay bit-identical. Model directories are therefore ordinary peft prompt-tuning
adapters that load with every task's prompt. (The paper's optional residual-MLP reparameterisation of
the prompt is left out.)

Resume: the frozen rows and the number of prompts are in ``state_dict``; ``load_state_dict`` regrows
the embedding before the checkpointed weights are loaded.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from retain.strategies.base import Strategy, StrategyConfig, StrategyContext, TaskInfo
from retain.strategies.registry import register_strategy

ADAPTER = "default"


class ProgressivePromptsConfig(StrategyConfig):
    num_virtual_tokens: int = Field(10, gt=0, description="Soft prompt length added per task.")
    init: Literal["vocab", "random"] = Field(
        "vocab", description="vocab: embeddings of random vocabulary tokens (the authors'); random: N(0, 1)."
    )


@register_strategy("progressive-prompts")
class ProgressivePrompts(Strategy):
    Config = ProgressivePromptsConfig
    wraps_model = True
    peft_wrapper = True
    min_tasks = 2  # with one task it is plain prompt tuning

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        init = PromptTuningInit.SAMPLE_VOCAB if self.config.init == "vocab" else PromptTuningInit.RANDOM
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.config.num_virtual_tokens, prompt_tuning_init=init
        )
        self.peft_model = get_peft_model(model, config)
        self.n_prompts = 1  # prompts in the stack; the first is the one peft created
        self.frozen: torch.Tensor | None = None  # rows of the earlier prompts, as they must stay
        return self.peft_model

    # ---- the stack --------------------------------------------------------------------------------

    @property
    def embedding(self) -> nn.Embedding:
        return self.peft_model.prompt_encoder[ADAPTER].embedding

    def _new_prompt(self) -> torch.Tensor:
        """[num_virtual_tokens, dim] starting values (uses the run's seeded global RNG)."""
        weight = self.embedding.weight
        if self.config.init == "random":
            return torch.randn(self.config.num_virtual_tokens, weight.shape[1]).to(weight)
        words = self.peft_model.word_embeddings
        ids = torch.randint(0, words.num_embeddings, (self.config.num_virtual_tokens,))
        return words(ids.to(words.weight.device)).detach().to(weight)

    def _set_rows(self, rows: torch.Tensor) -> None:
        """Make the prompt embedding exactly ``rows`` (one virtual token per row) and tell peft its length."""
        embedding = nn.Embedding(rows.shape[0], rows.shape[1], device=rows.device, dtype=rows.dtype)
        with torch.no_grad():
            embedding.weight.copy_(rows)
        self.peft_model.prompt_encoder[ADAPTER].embedding = embedding
        config = self.peft_model.peft_config[ADAPTER]
        config.num_virtual_tokens = rows.shape[0] // config.num_transformer_submodules
        self.peft_model.prompt_tokens[ADAPTER] = torch.arange(rows.shape[0]).long()

    def _prepend(self) -> None:
        """A fresh prompt in front of the stack; everything already there becomes frozen."""
        old = self.embedding.weight.detach().clone()
        self._set_rows(torch.cat([self._new_prompt(), old], dim=0))
        self.frozen = old
        self.n_prompts += 1

    # ---- hooks ----------------------------------------------------------------------------------

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        while self.n_prompts < task.index + 1:
            self._prepend()

    def after_backward(self, model: nn.Module, ctx: StrategyContext) -> None:
        grad = self.embedding.weight.grad
        if self.frozen is not None and grad is not None:
            grad[self.config.num_virtual_tokens :] = 0

    def after_step(self, model: nn.Module, ctx: StrategyContext) -> None:
        if self.frozen is not None:
            with torch.no_grad():
                self.embedding.weight[self.config.num_virtual_tokens :] = self.frozen

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"n_prompts": self.n_prompts}
        if self.frozen is not None:
            state["frozen"] = self.frozen
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        if not state or int(state["n_prompts"]) == 1:
            return
        weight = self.embedding.weight
        frozen = state["frozen"].to(weight)
        # the newest prompt's rows are placeholders here: the checkpoint's weights overwrite them
        placeholder = torch.zeros(self.config.num_virtual_tokens, weight.shape[1]).to(weight)
        self._set_rows(torch.cat([placeholder, frozen], dim=0))
        self.frozen = frozen
        self.n_prompts = int(state["n_prompts"])
