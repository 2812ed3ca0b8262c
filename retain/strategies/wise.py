"""WiSE-FT as a finishing step (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models"):
after each task the weights become ``theta_0 + alpha (theta_tuned - theta_0)``, with ``theta_0`` the
model as the run loaded it. Alpha 1 keeps the fine-tune, 0 returns the base; in between the new skill
usually survives longer than the forgetting does. For adapters the same line is the LoRA update scaled
by alpha (``B <- alpha B``; ``retain.models.merging.AdapterScaler``), which is exactly
``W + alpha Delta W``; with full weights it is ``retain.models.merging.interpolate`` key by key.

Which alpha (``alpha`` unset): every alpha of ``alphas`` (1 is always added, and 0, the reference) is
scored on the **select** part of the run's eval suite (``retain.eval.split``; the report part never sees
the choice), and the rule of :func:`choose_alpha` picks: among the alphas that keep at least
``min_gain_share`` of the new-task gain of the unmerged model (alpha 1), the one with the highest general
score (ties: the larger alpha). Gain is the mean primary select score of the tasks trained so far minus
that of the base model. ``alpha`` set: that alpha, with no evaluation (a run without a suite).

``min_gain_share`` is the declared strength (``tune`` searches it, a budget moves it): the chosen alpha
follows from it on the select part, so the search never bypasses the select/report rule. 0.95 is the
corner this project aims at (>= 95% of full fine-tuning's gain).

Cost: one select-part evaluation per alpha at each task's end (none per step). A full-weight run holds
the base weights on the CPU (a second copy); adapters hold nothing. The chosen alpha of each task is in
the strategy state (checkpoints), logged as ``wise/alpha`` in the next row of the run log, and written
with every alpha's select scores to ``<run dir>/wise.json``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from retain.config import RunConfig
from retain.errors import ConfigError
from retain.io import atomic_write_text
from retain.models.adapters import is_peft_model
from retain.models.merging import AdapterScaler, interpolate
from retain.strategies.base import Strategy, StrategyConfig, StrategyContext, Strength, TaskInfo
from retain.strategies.registry import get_strategy_class, register_strategy

logger = logging.getLogger("retain")


class WiseConfig(StrategyConfig):
    alpha: float | None = Field(
        None, gt=0.0, le=1.0, description="A fixed alpha after every task; unset: chosen on the suite's select part."
    )
    alphas: list[float] = Field(
        [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], min_length=1, description="The grid alpha is chosen from (1 is always in it)."
    )
    min_gain_share: float = Field(
        0.95, gt=0.0, le=1.0,
        description="Keep at least this share of the unmerged model's new-task gain (select part); the most "
        "general score among those alphas wins.",
    )
    batch_size: int | None = Field(None, gt=0, description="Evaluation batch size (default: eval.batch_size).")

    @field_validator("alphas")
    @classmethod
    def _in_unit(cls, values: list[float]) -> list[float]:
        if any(not 0.0 < v <= 1.0 for v in values):
            raise ValueError("every alpha must lie in (0, 1]")
        return sorted(set(values) | {1.0})


def gain_shares(new_task: Sequence[float], base_new_task: float) -> list[float]:
    """Each alpha's share of the unmerged model's gain, ``(N(a) - N(0)) / (N(1) - N(0))``; the last entry
    is alpha 1. Every share is 1 when alpha 1 gained nothing (no gain to keep)."""
    gain = new_task[-1] - base_new_task
    if gain <= 0:
        return [1.0] * len(new_task)
    return [(n - base_new_task) / gain for n in new_task]


def choose_alpha(alphas: Sequence[float], general: Sequence[float], new_task: Sequence[float],
                 base_new_task: float, min_gain_share: float) -> float:
    """The rule: among ``alphas`` (ascending, the last 1.0) whose gain share is at least ``min_gain_share``,
    the one with the highest ``general`` score; ties go to the larger alpha. Alpha 1 always qualifies."""
    shares = gain_shares(new_task, base_new_task)
    best = len(alphas) - 1
    for i, (share, score) in enumerate(zip(shares, general)):
        if share >= min_gain_share - 1e-12 and score >= general[best]:
            best = i
    return float(alphas[best])


def interpolate_into(model: nn.Module, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                     alpha: float) -> None:
    """Set ``model``'s parameters named in ``base`` to ``(1 - alpha) base + alpha tuned``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in base.items():
            target = params[name]
            target.copy_(interpolate(value, tuned[name], alpha).to(target.device))


@register_strategy("wise")
class Wise(Strategy):
    Config = WiseConfig
    strength = Strength("min_gain_share", 0.5, 1.0, log=False, protects_more_when_higher=False)

    @classmethod
    def holds_model_copy(cls, config: StrategyConfig, *, adapters: bool) -> bool:
        return not adapters  # the base weights, on the CPU

    def __init__(self, config: WiseConfig | None = None) -> None:
        super().__init__(config)
        self._base: dict[str, torch.Tensor] = {}  # full weights: every trainable float parameter as loaded
        self.chosen: dict[int, float] = {}  # task index -> alpha
        self.table: dict[int, list[dict[str, Any]]] = {}  # task index -> the grid's select figures

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        names = [spec.name for spec in run.strategies]
        after = [n for n in names[names.index(self.name) + 1:] if get_strategy_class(n).wraps_model] \
            if self.name in names else []
        problems = []
        if after:
            problems.append(f"wise interpolates the weights the other strategies train: list it after {', '.join(after)}")
        other = [n for n in names if get_strategy_class(n).peft_wrapper and n != "lora"]
        if other:
            problems.append(f"wise scales plain LoRA adapters or full weights; {', '.join(other)} has no update to "
                            "scale. Use lora or full weights")
        merging = [n for n in names if n != self.name and get_strategy_class(n).modifies_frozen_weights]
        if merging:
            problems.append(f"{', '.join(merging)} folds the update into the base weights at each task's end, so wise "
                            "would scale nothing (or a fresh adapter); use lora or full weights without it")
        return problems

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        if self.config.alpha is None and getattr(ctx, "suite", None) is None and ctx.config.eval.suite is None:
            raise ConfigError("wise: no eval suite to choose alpha on; set eval.suite (its select part chooses) "
                              "or a fixed wise.alpha")  # before any training, not at the first task's end
        adapters = any(get_strategy_class(s.name).peft_wrapper for s in ctx.config.strategies)
        if not adapters:  # the run's starting point; a resumed run sets up on the model as loaded, too
            self._base = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                          if p.is_floating_point()}
        return model

    # ------------------------------------------------------------------ the finishing step

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        model = ctx.unwrapped_model
        if is_peft_model(model):
            scaler = AdapterScaler(model)
            move = scaler.at
        else:
            tuned = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if n in self._base}
            missing = sorted(set(self._base) - set(tuned))
            if missing:
                raise ConfigError(f"wise: the model lost parameters since the run started ({missing[:3]}); list wise "
                                  "after the strategies that change the model's structure")

            def move(alpha: float) -> nn.Module:
                interpolate_into(model, self._base, tuned, alpha)
                return model

        alpha = self.config.alpha
        if alpha is None:
            alpha = self._choose(task, ctx, move)
        move(alpha)
        self.chosen[task.index] = float(alpha)
        ctx.log("wise/alpha", alpha)
        logger.info("wise: task '%s' kept alpha %.2f of its update", task.name, alpha)
        if ctx.accelerator.is_main_process:
            report = [{"task": ctx.tasks[i].name, "alpha": a, "grid": self.table.get(i, [])}
                      for i, a in sorted(self.chosen.items())]
            atomic_write_text(ctx.run_dir / "wise.json", json.dumps(report, indent=1))

    def _choose(self, task: TaskInfo, ctx: StrategyContext, move: Any) -> float:
        """Score the grid on the select part (the main process), apply the rule, share the alpha."""
        box: list[Any] = [None]
        if ctx.accelerator.is_main_process:
            box = [self._choose_here(task, ctx, move)]
        if ctx.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box, from_process=0)
        return float(box[0])

    def _choose_here(self, task: TaskInfo, ctx: StrategyContext, move: Any) -> float:
        from retain.eval.suite import evaluate_task, load_suite
        from retain.eval.tasks import SharedWork
        from retain.results.schema import StepRecord
        from retain.results.summary import general_score, primary_task_score

        suite = getattr(ctx, "suite", None)
        if suite is None and ctx.config.eval.suite is not None:
            suite = load_suite(ctx.config.eval.suite)
        if suite is None:
            raise ConfigError("wise: no eval suite to choose alpha on; set eval.suite (its select part chooses) "
                              "or a fixed wise.alpha")
        trained = [t.name for t in ctx.tasks[: task.index + 1]]
        evals = [e for e in suite.tasks if e.role == "general" or e.train_task in trained]
        batch_size = self.config.batch_size or ctx.config.eval.batch_size
        model = ctx.unwrapped_model
        was_training = model.training

        def figures(alpha: float) -> tuple[float | None, float | None]:
            move(alpha)
            shared, scores = SharedWork(), {}
            for each in evals:
                scores.update(evaluate_task(model, ctx.tokenizer, each, batch_size, shared, part="select",
                                            split=suite.split))
            record = StepRecord(index=0, scores=scores)
            new = [v for v in (primary_task_score(record, t) for t in trained) if v is not None]
            return general_score(record), (sum(new) / len(new) if new else None)

        grid = list(self.config.alphas)
        with torch.no_grad():
            base_general, base_new = figures(0.0)
            points = [figures(a) for a in grid]
        model.train(was_training)
        if base_general is None or any(g is None for g, _ in points):
            raise ConfigError("wise: the suite has no bounded general eval (e.g. next_token_accuracy on general "
                              "text) to choose alpha by; add one to eval.suite or set wise.alpha")
        if base_new is None or any(n is None for _, n in points):
            raise ConfigError(f"wise: the suite scores none of the trained tasks ({', '.join(trained)}) with a bounded "
                              "metric, so the gain alpha must keep is unknown; add a task eval or set wise.alpha")
        general = [float(g) for g, _ in points]
        new_task = [float(n) for _, n in points]
        alpha = choose_alpha(grid, general, new_task, float(base_new), self.config.min_gain_share)
        shares = gain_shares(new_task, float(base_new))
        self.table[task.index] = [
            {"alpha": 0.0, "general": base_general, "new_task": base_new},
            *({"alpha": a, "general": g, "new_task": n, "gain_share": s}
              for a, g, n, s in zip(grid, general, new_task, shares)),
        ]
        return alpha

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": {str(i): a for i, a in self.chosen.items()},
                "table": {str(i): rows for i, rows in self.table.items()}}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self.chosen = {int(i): float(a) for i, a in state.get("chosen", {}).items()}
        self.table = {int(i): list(rows) for i, rows in state.get("table", {}).items()}
