"""DFT, Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning
Perspective with Reward Rectification", arXiv 2508.05629; TRL's ``loss_type="dft"``): every label token's
cross-entropy is multiplied by the model's own probability of that token, detached from the graph::

    L_DFT = sum_t sg(p_theta(y_t | y_<t, x)) * CE_t / N          (sg: stop-gradient; N scored tokens)

The paper reads SFT's gradient as a policy gradient with reward 1/p, which blows up on tokens the
model finds unlikely; rescaling by p removes that weight, so the fine-tune chases surprising tokens less
and, the authors argue, moves the model less. ``lambda_`` mixes it with plain SFT, ``w_t = 1 - lambda_ +
lambda_ sg(p_t)`` (1: the paper's DFT; 0: plain SFT); it is the declared strength (retain's knob, not
the paper's).

How the weights reach the loop's token-mean loss without changing it (as ``flow`` does): the loop's task
loss is ``sum_t CE_t / N`` over the N scored tokens of the optimizer step, every micro-batch and process;
this strategy adds ``sum_t (w_t - 1) CE_t / N``, so the sum is DFT's loss and gradient. N is counted as
the step's batches are built (``transform_batch`` sees every micro-batch and every process's rows before
the first forward), so dft must come after every strategy that transforms batches; every scored row is
weighted, replayed rows included. It costs one cross-entropy over the logits the task forward made.
``flow`` in the same hybrid is refused: two additive corrections would not multiply the weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from retain.config import RunConfig
from retain.data import IGNORE_INDEX, count_scored_tokens
from retain.models.runtime import align_to_inputs
from retain.strategies.base import Batch, Strategy, StrategyConfig, StrategyContext, Strength
from retain.strategies.registry import get_strategy_class, register_strategy


class DftConfig(StrategyConfig):
    lambda_: float = Field(
        1.0, gt=0.0, le=1.0, description="Token weight 1 - lambda_ + lambda_ * p (detached); 1 is the paper's DFT."
    )


def dft_token_terms(logits: torch.Tensor, labels: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """sum over scored tokens of (w - 1) * CE with w = 1 - lambda_ + lambda_ * exp(-CE) detached: what turns the
    plain token-loss sum into DFT's."""
    if labels.shape[1] < 2:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                         reduction="none")  # 0 where the label is ignored
    weight = 1.0 - lambda_ + lambda_ * torch.exp(-ce.detach())
    return ((weight - 1.0) * ce).sum()


@register_strategy("dft")
class Dft(Strategy):
    Config = DftConfig
    strength = Strength("lambda_", 0.05, 1.0, log=False)

    def __init__(self, config: DftConfig | None = None) -> None:
        super().__init__(config)
        self._scored: dict[int, int] = {}  # scored tokens of each micro-batch of the step, every process

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        names = [spec.name for spec in run.strategies]
        if self.name not in names:
            return []
        problems = []
        after = [n for n in names[names.index(self.name) + 1:]
                 if get_strategy_class(n).transform_batch is not Strategy.transform_batch]
        if after:
            problems.append(f"dft weighs the tokens the other strategies leave: list it after {', '.join(after)}")
        if "flow" in names:
            problems.append("dft and flow both reweight the token loss additively; their weights would add, not "
                            "multiply. Keep one of them")
        return problems

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        if ctx.micro_batch == 0:
            self._scored = {}
        self._scored[ctx.micro_batch] = int(count_scored_tokens(batch["labels"]))  # host tensors: no sync
        return batch

    def extra_losses(self, outputs: Any, batch: Batch, ctx: StrategyContext) -> dict[str, torch.Tensor]:
        logits = align_to_inputs(outputs.logits, batch["input_ids"].shape[1])
        total = dft_token_terms(logits, batch["labels"], self.config.lambda_)
        step_scored = sum(self._scored.values())
        if ctx.step_tokens is None or step_scored == 0:  # hooks driven by hand (or a Trainer): this micro-batch
            return {"reweight": total / count_scored_tokens(batch["labels"]).clamp_min(1).float()}
        return {"reweight": total * ctx.step_parts / step_scored}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self._scored = {}
