"""Element-wise and layer-wise importance regularization (Song et al. 2025, arXiv 2501.13669).

    L = L_task + sum_l c_l * lambda/2 * sum_{i in layer l} Omega_i (theta_i - theta*_i)^2

``Omega`` is a Synaptic-Intelligence importance recorded along a real optimization trajectory
(``omega_i = -sum_t g_i dtheta_i`` over the steps, ``Omega_i = omega_i / (Delta_i^2 + xi)``, Zenke et
al. 2017), without any Fisher pass:

- ``general``: the paper's "general importance recording": ``general_steps`` steps of the training
  optimizer (``general_optimizer: adamw`` at ``general_lr``, default the run's ``train.lr``, betas and
  weight decay) on general text from the base weights, weights restored after; the anchor is the
  base weights. Adam moves each weight by about ``lr`` per step, so the displacement and ``xi`` both
  shape Omega (with ``sgd`` at a fine-tuning rate Omega collapses to ``lr * sum g^2 / xi``). Or read
  from ``file`` (``retain importance compute --method importance``).
- ``training``: a by-product of training each task (the loop's own gradients and steps; this
  strategy's own penalty gradient is subtracted so only the task loss is credited), consolidated
  after the task, the anchor moving to the task's final weights (as SI). With several processes the
  weights' gradients and steps are already the averaged ones, so each process's path integral is the
  global one once the penalty's per-layer coefficients are averaged too (``step_coefficients``); with
  sharded weights (FSDP2) the path integral, anchor and Omega are DTensors sharded like their parameter.
- ``general+training``; ``auto`` = ``general`` when general text or a file is set, else ``training``.

Layer coefficients ``c_l`` (``layer_balance``, see ``retain.losses.quadratic.layer_coefficients``)
weigh each transformer block's penalty against the current task loss; recomputed every micro-batch,
detached. The paper's §4.3 formula could not be read here, so neither non-uniform option is Song et
al.'s: ``penalty_share``, ``c_l = T_l / (T_l + L_task)``, is **retain's own variant**, chosen because it
is monotone (a layer that drifts further is held at least as hard), which ``task_share`` is not; near
the anchor it has almost no restoring force (c_l = 0.00066 at drift 0.1, where plain SI's is 1).
``uniform`` (c_l = 1) is plain Synaptic Intelligence. To credit only the task loss,
``after_backward`` needs the step's mean ``c_l``: the penalty carries, per layer, a zero-valued term
``c_l * (s_l - s_l.detach())`` on a scalar leaf ``s_l`` made in ``transform_batch``, so backward leaves
``mean c_l`` in ``s_l.grad`` beside the weights' gradients and the loss hook changes no state. Other
choices: Omega normalized to mean 1 (``normalize``) so lambda means the same across models and
learning rates; negative omega clamped to 0.

Default ``lambda_ = 1``: on ``retain bench stories-contracts`` (300 steps, full fine-tuning, 32 AdamW
steps of general text at the run's lr) it keeps 65% of full fine-tuning's new-task gain with 35% of its
forgetting; 10 keeps 25% / 10% (``bench/strength_sweep.py``).

State (``state``): ``dense`` keeps anchor + Omega (2 x trainable; Omega in ``state_dtype``).
``topk`` keeps only the ``keep_fraction`` most important elements over the whole model (their flat
index, anchor value and Omega; normalized with the dense mean, so lambda keeps its meaning): at
0.1 and bfloat16 Omega, 10 bytes per kept element, 12.5% of dense float32. Measured on
``retain bench stories-contracts`` (300 steps, lambda 1): dense float32 keeps general retention 0.751,
dense with bfloat16 Omega 0.750 (75% of the bytes: the compact state to use), ``topk`` 0.1 / 0.15 only
0.301 / 0.306: the unkept 85-90% of the weights move freely, and they carry most of the forgetting. With ``training`` the
running path integral and the anchor stay dense while a task trains (and, for one step, a gradient
and a weight copy).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field
from torch import Tensor, nn

from retain.config import DataConfig, RunConfig
from retain.data.sampling import estimate_subset
from retain.losses.quadratic import (
    LayerBalance,
    layer_coefficients,
    layer_of,
    penalty_per_layer,
    sparse_penalty_per_layer,
    top_elements,
)
from retain.models.sharding import is_dtensor, is_sharded, local, local_dict, shard_like, sharded_parameters, summed_over_shards
from retain.stats.files import load_importance, statistics_for
from retain.stats.path_integral import GeneralOptimizer, path_integral_importance, si_importance
from retain.strategies._shared.calibration import DTYPES, check_same_parameters, detached_copy, on_device
from retain.strategies.base import (
    Batch,
    Strategy,
    StrategyConfig,
    StrategyContext,
    Strength,
    TaskInfo,
    has_general_text,
)
from retain.strategies.registry import register_strategy


class ImportanceConfig(StrategyConfig):
    lambda_: float = Field(
        1.0,
        ge=0,
        validation_alias=AliasChoices("lambda_", "lambda"),
        description="Penalty strength (Omega has mean 1; 1: the stories-contracts knee).",
    )
    xi: float = Field(1e-3, gt=0, description="SI damping in Omega = omega / (Delta^2 + xi).")
    source: Literal["auto", "general", "training", "general+training"] = Field(
        "auto", description="general pass, training by-product, or both; auto = general if general text/file, else training."
    )
    layer_balance: LayerBalance = Field(
        "penalty_share", description="penalty_share (monotone) | uniform | task_share (not monotone; see layer_coefficients)."
    )
    normalize: bool = Field(True, description="Scale Omega to mean 1 over all weights.")
    data: DataConfig | None = Field(None, description="General text for the pass; default: the run's general_data.")
    file: str | None = Field(None, description="Importance file (method importance) replacing the general pass.")
    max_examples: int = Field(256, gt=0, description="Examples in the general pass (seeded subset).")
    batch_size: int = Field(8, gt=0, description="Batch size of the general pass.")
    general_steps: int | None = Field(
        None, gt=0, description="Optimizer steps of the pass; default one pass over the examples (more cycle over them)."
    )
    general_lr: float | None = Field(None, gt=0, description="Learning rate of the pass; default train.lr.")
    general_optimizer: GeneralOptimizer = Field(
        "adamw", description="adamw (the training optimizer, with train.betas/weight_decay) or sgd."
    )
    state: Literal["dense", "topk"] = Field("dense", description="dense Omega + anchor, or only the top keep_fraction.")
    keep_fraction: float = Field(0.1, gt=0, le=1, description="Share of elements kept with state: topk.")
    state_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of stored Omega.")
    seed: int | None = Field(None, description="Seed of the general pass's example subset; default: train.seed.")


def sum_and_count(omega: dict[str, Tensor]) -> tuple[float, int]:
    """The sum and number of Omega's elements over the whole model. Sharded (FSDP2) Omega is a DTensor
    per parameter: each process adds its shards and one all-reduce adds the processes' parts."""
    total = sum(float(local(t).float().sum()) for t in omega.values())
    count = sum(local(t).numel() for t in omega.values())
    if any(is_dtensor(t) for t in omega.values()):
        import torch.distributed as dist

        device = local(next(iter(omega.values()))).device
        both = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, count = float(both[0]), int(both[1])
    return total, count


def normalized(omega: dict[str, Tensor]) -> dict[str, Tensor]:
    """Omega divided by its mean over every element (left as is when all zero)."""
    total, count = sum_and_count(omega)
    mean = total / max(count, 1)
    return {n: t / mean for n, t in omega.items()} if mean > 0 else dict(omega)


def step_coefficients(scales: dict[str, Tensor], unscale: float, accelerator: Any = None) -> dict[str, float]:
    """Each layer's c_l averaged over the step's micro-batches and processes: what the averaged gradient
    of the penalty was weighed by, and so what ``after_backward`` subtracts to credit only the task loss.

    Backward leaves each process its own micro-batches' mean in ``s_l.grad`` (``s_l`` is no parameter, so
    DDP/FSDP do not average it), while the weights' gradients are averaged over processes; one all-reduce
    of these few scalars makes every process subtract the same penalty gradient, so every process's path
    integral is that of the global gradient (one process's at the same global batch when c_l = 1)."""
    layers = [layer for layer, s in scales.items() if s.grad is not None]
    if not layers:
        return {}
    values = torch.stack([scales[layer].grad.detach().float().reshape(()) for layer in layers]) * unscale
    if accelerator is not None and accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return dict(zip(layers, values.tolist()))


def sparse_state(
    omega: dict[str, Tensor], anchor: dict[str, Tensor], keep_fraction: float, dtype: torch.dtype
) -> dict[str, dict[str, Tensor]]:
    """The top ``keep_fraction`` of Omega over every element: per tensor its flat indices (int32 when
    they fit), the anchor's values there and Omega's (in ``dtype``)."""
    kept = top_elements(omega, keep_fraction)
    out = {}
    for name, index in kept.items():
        small = omega[name].numel() < 2**31
        out[name] = {
            "index": index.to(torch.int32 if small else torch.int64),
            "anchor": anchor[name].reshape(-1).index_select(0, index).detach().clone(),
            "omega": omega[name].reshape(-1).index_select(0, index).to(dtype),
        }
    return out


def densify(sparse: dict[str, dict[str, Tensor]], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sparse Omega back to dense tensors (zeros where nothing was kept)."""
    out = {}
    for name, entry in sparse.items():
        flat = torch.zeros(like[name].numel(), dtype=torch.float32, device=like[name].device)
        flat[entry["index"].to(flat.device, torch.int64)] = entry["omega"].to(flat.device, torch.float32)
        out[name] = flat.view_as(like[name])
    return out


@register_strategy("importance")
class Importance(Strategy):
    Config = ImportanceConfig
    strength = Strength("lambda_", 1e-2, 1e4)
    quadratic_state = True
    input_path_keys = ("file",)
    supports_sharding = True  # dense state: anchor, Omega and path integral sharded like their weight

    def sharding_problem(self) -> str | None:
        if self.config.state == "topk":
            return ("state: topk keeps the top elements over the whole model, which no process sees when the "
                    "weights are sharded (use state: dense, with state_dtype: bfloat16 for a compact state)")
        return None

    def __init__(self, config: ImportanceConfig | None = None) -> None:
        super().__init__(config)
        self.anchor: dict[str, Tensor] | None = None  # dense; dropped with state: topk unless tracking training
        self.omega_raw: dict[str, Tensor] | None = None  # dense SI importance, before normalization
        self.sparse: dict[str, dict[str, Tensor]] | None = None  # state: topk: index, anchor, omega
        self.omega_mean = 1.0  # the dense mean that normalizes sparse Omega
        self.path: dict[str, Tensor] | None = None  # the running path integral of the current task
        self.general_done = False
        self._source: str | None = None
        self._params: dict[str, nn.Parameter] | None = None
        self._sharded = False  # the parameters are FSDP2 shards (set with _params)
        self._weights: dict[str, Tensor] | None = None  # dense Omega as the penalty uses it
        self._sparse_weights: dict[str, dict[str, Tensor]] | None = None  # topk: index, anchor, weight
        self._scales: dict[str, Tensor] | None = None  # per layer, a leaf whose grad is the step's mean c_l
        self._step_grads: dict[str, Tensor] | None = None
        self._step_start: dict[str, Tensor] | None = None

    def _resolve_source(self, run: RunConfig) -> str:
        if self.config.source != "auto":
            return self.config.source
        return "general" if has_general_text(self.config.data, run) or self.config.file is not None else "training"

    def requirements(self, run: RunConfig, where: str) -> list[str]:
        source = self._resolve_source(run)
        if source in ("general", "general+training") and not (
            has_general_text(self.config.data, run) or self.config.file is not None
        ):
            return [
                f"source: {source} needs general text: set general_data, {where}.data or {where}.file; "
                f"or set {where}.source: training"
            ]
        if source == "training" and len(run.tasks) < 2:
            return [
                "source: training learns importance while a task trains and applies it to the next one, and "
                f"this run has one task, so the penalty would never apply. Set general_data (or {where}.data / "
                f"{where}.file) for a general pass, or add a task"
            ]
        return []

    # hooks ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        self._source = self._resolve_source(ctx.config)
        return model

    def before_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        params = self._live(ctx)
        if self.anchor is None and self.sparse is None:
            self.anchor = detached_copy(params)
        if self._source in ("general", "general+training") and not self.general_done:
            self._set_omega(self._general_importance(params, ctx), self.anchor)
            self.general_done = True
        if self._tracks_training:
            self.path = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        elif self.config.state == "topk" and self.sparse is not None:
            self.anchor = None  # the kept elements carry their own anchor values

    def transform_batch(self, batch: Batch, ctx: StrategyContext) -> Batch:
        """Before the step's first forward: fresh leaves that will carry the step's mean coefficients."""
        if self._scales is None and self._penalizing and self._tracks_training and self.path is not None:
            params = self._live(ctx)
            device = next(iter(params.values())).device
            layers = {layer_of(name) for name in params}
            self._scales = {layer: torch.zeros((), device=device, requires_grad=True) for layer in sorted(layers)}
        return batch

    def extra_losses(self, outputs: Any, batch: dict[str, Tensor], ctx: StrategyContext) -> dict[str, Tensor]:
        if not self._penalizing:
            return {}
        params = self._live(ctx)
        if self._sparse_weights is not None:
            per_layer = sparse_penalty_per_layer(params, self._sparse_weights)
        else:  # each process its rows; every layer's value summed over the processes (c_l needs the whole T_l)
            per_layer = penalty_per_layer(local_dict(params), local_dict(self.anchor), local_dict(self._weights))
            if self._sharded:
                layers = sorted(per_layer)
                summed = summed_over_shards(torch.stack([per_layer[layer] for layer in layers]), True)
                per_layer = dict(zip(layers, summed.unbind()))
        terms = {layer: 0.5 * self.config.lambda_ * value for layer, value in per_layer.items()}
        coefficients = layer_coefficients(terms, outputs.loss, self.config.layer_balance)
        penalty = sum(coefficients[layer].to(term.dtype) * term for layer, term in terms.items())
        if self._scales is not None:  # zero in value and for the weights; d/ds_l = c_l
            carrier = sum(c * (self._scales[layer] - self._scales[layer].detach()) for layer, c in coefficients.items())
            penalty = penalty + carrier.to(penalty.dtype)
        return {"penalty": penalty}

    def after_backward(self, model: nn.Module, ctx: StrategyContext) -> None:
        if not self._tracks_training or self.path is None:
            return
        params = self._live(ctx)
        scaler = getattr(ctx.accelerator, "scaler", None)
        unscale = 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0
        scales, self._scales = self._scales, None
        mean_c = {}
        if scales is not None and self._penalizing:
            mean_c = step_coefficients(scales, unscale, ctx.accelerator)
        grads = {}
        with torch.no_grad():
            for name, p in params.items():
                grad = p.grad.detach().float() * unscale if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                c = mean_c.get(layer_of(name))
                if c:
                    grad = grad - self._own_gradient(name, p, self.config.lambda_ * c)
                grads[name] = grad
        self._step_grads = grads
        self._step_start = {n: p.detach().float().clone() for n, p in params.items()}

    def after_step(self, model: nn.Module, ctx: StrategyContext) -> None:
        if self._step_grads is None or self.path is None:
            return
        params = self._live(ctx)
        with torch.no_grad():
            for name, p in params.items():
                delta = p.detach().float() - self._step_start[name]
                self.path[name].sub_(self._step_grads[name] * delta)
        self._step_grads, self._step_start = None, None

    def after_task(self, task: TaskInfo, ctx: StrategyContext) -> None:
        if not self._tracks_training or self.path is None:
            return
        params = self._live(ctx)
        change = {n: p.detach().float() - self.anchor[n].float() for n, p in params.items()}
        new = si_importance(self.path, change, self.config.xi)
        previous = self._dense_raw(params)
        if previous is not None:
            new = {n: previous[n].float() + new[n] for n in new}
        self.anchor = detached_copy(params)
        self._set_omega(new, self.anchor)
        self.path = None

    # state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"general_done": self.general_done}
        for key in ("anchor", "omega_raw", "path", "sparse"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value
        if self.sparse is not None:
            state["omega_mean"] = self.omega_mean
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: StrategyContext) -> None:
        self.general_done = bool(state.get("general_done", False))
        self.anchor = dict(state["anchor"]) if "anchor" in state else None
        self.path = dict(state["path"]) if "path" in state else None
        self._params = None
        self._scales = None
        self._weights = None
        self._sparse_weights = None
        self.omega_raw = dict(state["omega_raw"]) if "omega_raw" in state else None
        self.sparse = {n: dict(e) for n, e in state["sparse"].items()} if "sparse" in state else None
        self.omega_mean = float(state.get("omega_mean", 1.0))
        self._refresh_weights()

    # internals --------------------------------------------------------------------------

    @property
    def _penalizing(self) -> bool:
        return (self._weights is not None or self._sparse_weights is not None) and self.config.lambda_ != 0

    @property
    def _tracks_training(self) -> bool:
        return self._source in ("training", "general+training")

    def _live(self, ctx: StrategyContext) -> dict[str, nn.Parameter]:
        if self._params is None:
            self._params = sharded_parameters(ctx.unwrapped_model)
            self._sharded = is_sharded(ctx.unwrapped_model)
            for key in ("anchor", "omega_raw", "path", "_weights"):
                value = getattr(self, key)
                if value is not None:
                    check_same_parameters(value, self._params, self.name)
                    setattr(self, key, on_device(value, self._params))
            for key in ("sparse", "_sparse_weights"):
                value = getattr(self, key)
                if value is not None:
                    check_same_parameters(value, self._params, self.name)
                    device = {n: p.device for n, p in self._params.items()}
                    setattr(self, key, {n: {k: t.to(device[n]) for k, t in e.items()} for n, e in value.items()})
        return self._params

    def _own_gradient(self, name: str, p: Tensor, scale: float) -> Tensor:
        """This strategy's penalty gradient on ``p`` at coefficient ``scale`` (= lambda * mean c_l), dense."""
        if self._sparse_weights is None:
            return scale * self._weights[name].float() * (p.detach().float() - self.anchor[name].float())
        entry = self._sparse_weights[name]
        index = entry["index"].to(torch.int64)
        picked = p.detach().reshape(-1).index_select(0, index).float()
        values = scale * entry["weight"].float() * (picked - entry["anchor"].float())
        return torch.zeros(p.numel(), dtype=torch.float32, device=p.device).index_add_(0, index, values).view_as(p)

    def _dense_raw(self, like: dict[str, Tensor]) -> dict[str, Tensor] | None:
        if self.omega_raw is not None:
            return self.omega_raw
        if self.sparse is not None:
            return densify(self.sparse, like)
        return None

    def _set_omega(self, omega: dict[str, Tensor], anchor: dict[str, Tensor] | None) -> None:
        dtype = DTYPES[self.config.state_dtype]
        if self.config.state == "topk":
            assert anchor is not None
            total, count = sum_and_count(omega)
            self.omega_mean = total / max(count, 1) if total > 0 else 1.0
            self.sparse = sparse_state(omega, anchor, self.config.keep_fraction, dtype)
            self.omega_raw = None
        else:
            self.omega_raw = {n: t.to(dtype) for n, t in omega.items()}
        self._refresh_weights()

    def _refresh_weights(self) -> None:
        dtype = DTYPES[self.config.state_dtype]
        if self.sparse is not None:
            scale = 1.0 / self.omega_mean if self.config.normalize and self.omega_mean > 0 else 1.0
            self._sparse_weights = {
                n: {"index": e["index"], "anchor": e["anchor"], "weight": (e["omega"].float() * scale).to(dtype)}
                for n, e in self.sparse.items()
            }
            self._weights = None
        elif self.omega_raw is not None:
            weights = normalized(self.omega_raw) if self.config.normalize else self.omega_raw
            self._weights = {n: t.to(dtype) for n, t in weights.items()}
            self._sparse_weights = None

    def _general_importance(self, params: dict[str, nn.Parameter], ctx: StrategyContext) -> dict[str, Tensor]:
        if self.config.file is not None:
            loaded = load_importance(self.config.file, model=ctx.unwrapped_model, methods=("importance",))
            stats = statistics_for(loaded, list(params), self.config.file)
            return {n: shard_like(stats[n].to(torch.float32), params[n]) for n in params}
        seed = ctx.seed_for(self)  # the base seed, as `retain importance compute --seed` uses it
        examples = estimate_subset(ctx.general_examples(self.config.data, self.name), self.config.max_examples, seed)
        train = ctx.config.train
        start = time.perf_counter()
        omega, steps = path_integral_importance(
            ctx.unwrapped_model,
            params,
            examples,
            ctx.collate,
            lr=self.config.general_lr or train.lr,
            batch_size=self.config.batch_size,
            steps=self.config.general_steps,
            xi=self.config.xi,
            accelerator=ctx.accelerator,
            optimizer=self.config.general_optimizer,
            betas=tuple(train.betas),
            weight_decay=train.weight_decay,
        )
        ctx.log(f"{self.name}/importance_seconds", time.perf_counter() - start)
        ctx.log(f"{self.name}/importance_steps", steps)
        return omega
