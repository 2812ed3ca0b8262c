"""Sharded training (``train.parallel: fsdp``, FSDP2) on the training side: which launches shard,
which strategies may, and the loop's gradient maths on sharded gradients.

- ``torchrun`` (or ``accelerate launch`` without FSDP flags) with ``train.parallel: fsdp``: retain shards
  the model itself (``retain.models.sharding.shard_model``: every transformer block, then the root).
- ``accelerate launch --use_fsdp --fsdp_version 2``: the same (retain shards; accelerate's wrap policy is
  not used), so both launches train alike. FSDP version 1, Megatron-LM and DeepSpeed are refused.
- One process with ``fsdp``: nothing to shard; the run trains unsharded (and checkpoints in the sharded
  layout, so it resumes on several processes).

Gradients: FSDP2's reduce-scatter averages over processes as DDP's all-reduce does, so the loop's
token-mean scaling holds unchanged. A penalty computed on a process's rows of a weight
(``retain.models.sharding.summed_over_shards``) reaches that process's gradient rows alone, once, as in
one process. The total gradient norm is the square root of the squared local norms added over processes.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

import torch

from retain.errors import ConfigError
from retain.models.sharding import is_dtensor, local

log = logging.getLogger("retain")

REFUSED_LAUNCHES = {
    "DEEPSPEED": "DeepSpeed ZeRO is not supported: retain's anchors, statistics passes and checkpoints are written "
                 "for FSDP2's DTensors; shard with train.parallel: fsdp (torchrun, or accelerate launch --use_fsdp "
                 "--fsdp_version 2) instead",
    "MEGATRON_LM": "Megatron-LM tensor/pipeline parallelism is not supported; shard with train.parallel: fsdp",
}


def launch_kind(accelerator: Any, environ: Mapping[str, str] | None = None) -> str:
    """``ddp`` or ``fsdp`` as the launch asks (before the config says): accelerate's FSDP2 flags mean fsdp.

    The flags are read from accelerate's state and from the environment its launcher sets
    (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``): on CPUs accelerate drops
    them from its state, and training would silently be data-parallel."""
    environ = os.environ if environ is None else environ
    name = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type)).split(".")[-1]
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        name = "DEEPSPEED"
    if name not in REFUSED_LAUNCHES and environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if str(environ.get("FSDP_VERSION", "1")) != "2":
            name = "FSDP"  # refused below as version 1
        else:
            return "fsdp"
    if name in REFUSED_LAUNCHES:
        raise ConfigError(f"this launch is configured for {name}: {REFUSED_LAUNCHES[name]}",
                          hint="`torchrun --nproc_per_node N -m retain train RUN.yaml --set train.parallel=fsdp`")
    if name == "FSDP":
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        version = int(getattr(plugin, "fsdp_version", None) or environ.get("FSDP_VERSION", 1) or 1)
        if version != 2:
            raise ConfigError(
                "this launch is configured for FSDP version 1, whose flattened parameters retain cannot pair "
                "with its per-weight strategy state; use FSDP2",
                hint="`accelerate launch --use_fsdp --fsdp_version 2 ...` or `torchrun ... --set train.parallel=fsdp`",
            )
        return "fsdp"
    return "ddp"


def resolve_parallel(configured: str, accelerator: Any, environ: Mapping[str, str] | None = None) -> str:
    """``fsdp`` when the config or the launch asks for it, else ``ddp``."""
    return "fsdp" if launch_kind(accelerator, environ) == "fsdp" else configured


def sharding_problems(strategies: Iterable[Any]) -> list[str]:
    """Why each strategy of the hybrid cannot train sharded (``Strategy.sharding_problem``), by name."""
    return [f"{s.name}: {problem}" for s in strategies if (problem := s.sharding_problem()) is not None]


def config_sharding_problems(config: Any) -> list[str]:
    """Training settings that cannot run sharded, each with the reason."""
    problems = []
    if config.train.optimizer == "mofo":
        problems.append("train.optimizer: mofo ranks each weight's entries by momentum; sharded, each process would "
                        "rank only its rows (use adamw, or train.parallel: ddp)")
    if config.train.mixed_precision == "fp16":
        problems.append("train.mixed_precision: fp16's gradient scaler would find infinities per process and skip "
                        "steps on some processes only (use bf16)")
    if getattr(config.model, "quantization", None) is not None:
        problems.append("model.quantization: a quantized base cannot be sharded by FSDP2 (train adapters with "
                        "train.parallel: ddp)")
    return problems


def check_sharding_support(strategies: Iterable[Any], config: Any = None) -> None:
    """Refuse, before any model loads, a hybrid with a strategy (or a setting) that cannot train sharded."""
    problems = sharding_problems(strategies) + (config_sharding_problems(config) if config is not None else [])
    if problems:
        raise ConfigError(
            "train.parallel: fsdp (FSDP2) cannot train this hybrid:\n  " + "\n  ".join(problems),
            hint="set train.parallel: ddp, or change what is listed",
        )


def sharded_grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor | None:
    """The L2 norm of every gradient together when gradients are sharded: squared local norms added over
    processes (one all-reduce every process must join); inf/nan when any entry is."""
    grads = [local(p.grad.detach()) for p in parameters if p.grad is not None]
    if not grads:
        return None
    device = grads[0].device
    square = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(device) ** 2 for g in grads]).sum()
    if any(is_dtensor(p.grad) for p in parameters if p.grad is not None) and torch.distributed.is_initialized():
        torch.distributed.all_reduce(square)
    return square.sqrt()


def clip_sharded_grads_(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """``torch.nn.utils.clip_grad_norm_``'s rule (scale by ``max_norm / (norm + 1e-6)`` when below 1) on
    sharded gradients: the norm over every process, each process scaling its rows."""
    norm = sharded_grad_norm(parameters)
    if norm is None:
        return None
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            local(p.grad).mul_(scale.to(p.grad.device))
    return norm
