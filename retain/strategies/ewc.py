"""EWC (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018): a diagonal-Fisher quadratic penalty.

    L = L_task + lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2

over the trainable weights (all of them with ``full``, the adapters with ``lora``). Where the
Fisher comes from (``source``):

- ``general``: the run's ``general_data`` (or this strategy's ``data``), at the weights before the
  first task. The base model's general knowledge is treated as "task 0". Or read from ``file``
  (``retain importance compute --method ewc``) instead of computing it.
- ``previous_task``: each finished task's training data, at the weights it ended with.
- ``both``; ``auto`` (default) is ``both`` when general text or a file is configured, else
  ``previous_task``.

``mode: separate`` keeps one (anchor, Fisher) pair per source above; ``online`` keeps one pair,
``F = gamma * F_prev + F_new`` anchored at the latest weights. The Fisher is per example
(``retain.stats.fisher``: ``sampled`` by default, ``empirical``, or ``empirical_batch`` = square of
batch gradients), normalized **per scored token**, so the same lambda means the same on short task
completions and long general windows, and between datasets (the previous per-example Fisher's trace
fell as 1/length). State: 2 x trainable parameters per pair (anchor in the weights' dtype, Fisher in
``state_dtype``).

Default ``lambda_ = 10``: on ``retain bench stories-contracts`` (300 steps, full fine-tuning, Fisher
of 128 general windows of 256 tokens) it keeps 71% of full fine-tuning's new-task gain with 35% of
its forgetting; 1 keeps 93% / 63%, 100 keeps 24% / 6% (``bench/strength_sweep.py``). The previous
default, 1e4 on the per-example Fisher of 255-token windows, is about 40 on this scale.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field
from torch import Tensor, nn

from retain.config import RunConfig
from retain.data.sampling import Stream, estimate_subset
from retain.losses.quadratic import quadratic_penalty
from retain.models.sharding import is_sharded, local_dict, shard_like, sharded_parameters, summed_over_shards
from retain.stats.files import load_importance, statistics_for
from retain.stats.fisher import diagonal_fisher, online_update
from retain.strategies._shared.calibration import (
    DTYPES,
    CalibrationConfig,
    calibration_requirements,
    check_same_parameters,
    detached_copy,
    estimate_logged,
    on_device,
    resolve_source,
)
from retain.strategies.base import Strategy, StrategyContext, Strength, TaskInfo
from retain.strategies.registry import register_strategy


class EwcConfig(CalibrationConfig):
    lambda_: float = Field(
        10.0,
        ge=0,
        validation_alias=AliasChoices("lambda_", "lambda"),
        description="Penalty strength on the per-token Fisher (no author default for LLMs; 10: the stories-contracts knee).",
    )
    mode: Literal["separate", "online"] = Field("separate", description="One penalty per source, or online EWC.")
    gamma: float = Field(1.0, ge=0, le=1, description="Online decay of the previous Fisher.")


@register_strategy("ewc")
class Ewc(Strategy):
    supports_sharding = True  # anchors and Fisher sharded like the weights
    Config = EwcConfig
    strength = Strength("lambda_", 1e-2, 1e5)
    quadratic_state = True
    input_path_keys = ("file",)

    def __init__(self, config: EwcConfig | None = None) -> None:
        super().__init__(config)
        self.penalties: list[dict[str, Any]] = []
        self.general_done = False
        self._source: str | None = None
        self._params: dict[str, nn.Parameter] | None = None
        self._sharded = False

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        return calibration_requirements(self.config, run, where)

    # hooks ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        self._source = resolve_source(self.config, ctx.config)
        return model

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        params = self._live(ctx)
        if self._source in ("general", "both") and not self.general_done:
            fisher = self._general_fisher(params, ctx)
            self._add("general", detached_copy(params), fisher)
            self.general_done = True

    def extra_losses(self, outputs: Any, batch: dict[str, Tensor], ctx: StrategyContext) -> dict[str, Tensor]:
        if not self.penalties or self.config.lambda_ == 0:
            return {}
        params = local_dict(self._live(ctx))  # each process its rows; the value summed over processes
        total = sum(quadratic_penalty(params, local_dict(p["anchor"]), local_dict(p["fisher"])) for p in self.penalties)
        return {"penalty": 0.5 * self.config.lambda_ * summed_over_shards(total, self._sharded)}

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if self._source not in ("previous_task", "both") or task.index == len(ctx.tasks) - 1:
            return  # after the last task no later training would use the Fisher
        params = self._live(ctx)
        seed = ctx.seed_for(self, Stream.TASK_FISHER, task.index)
        examples = estimate_subset(task.train_examples, self.config.max_examples, seed)
        fisher = self._estimate(params, examples, ctx, seed=seed)
        self._add(f"task:{task.name}", detached_copy(params), fisher)

    # state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"general_done": self.general_done, "penalties": self.penalties}

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self.general_done = bool(state.get("general_done", False))
        self.penalties = [
            {"label": p["label"], "anchor": dict(p["anchor"]), "fisher": dict(p["fisher"])}
            for p in state.get("penalties", [])
        ]
        self._params = None

    # internals --------------------------------------------------------------------------

    def _live(self, ctx: StrategyContext) -> dict[str, nn.Parameter]:
        if self._params is None:
            self._params = sharded_parameters(ctx.unwrapped_model)
            self._sharded = is_sharded(ctx.unwrapped_model)
            for penalty in self.penalties:
                check_same_parameters(penalty["fisher"], self._params, self.name)
                penalty["anchor"] = on_device(penalty["anchor"], self._params)
                penalty["fisher"] = on_device(penalty["fisher"], self._params)
        return self._params

    def _general_fisher(self, params: dict[str, nn.Parameter], ctx: StrategyContext) -> dict[str, Tensor]:
        if self.config.file is not None:
            loaded = load_importance(self.config.file, model=ctx.unwrapped_model, methods=("ewc",))
            stats = statistics_for(loaded, list(params), self.config.file)
            dtype = DTYPES[self.config.state_dtype]
            return {n: shard_like(stats[n].to(dtype), params[n]) for n in params}
        seed = ctx.seed_for(self)  # the base seed, as `retain importance compute --seed` uses it
        examples = estimate_subset(ctx.general_examples(self.config.data, self.name), self.config.max_examples, seed)
        return self._estimate(params, examples, ctx, seed=seed)

    def _estimate(self, params: dict[str, nn.Parameter], examples: list, ctx: StrategyContext, seed: int) -> dict[str, Tensor]:
        fisher = estimate_logged(diagonal_fisher, params, examples, ctx, self.name, self.config, seed)
        dtype = DTYPES[self.config.state_dtype]
        return {n: f.to(dtype) for n, f in fisher.items()}

    def _add(self, label: str, anchor: dict[str, Tensor], fisher: dict[str, Tensor]) -> None:
        if self.config.mode == "separate" or not self.penalties:
            self.penalties.append({"label": label, "anchor": anchor, "fisher": fisher})
            return
        previous = self.penalties[0]
        merged = online_update(previous["fisher"], fisher, self.config.gamma)
        self.penalties = [{"label": "online", "anchor": anchor, "fisher": {n: merged[n].to(fisher[n].dtype) for n in merged}}]
