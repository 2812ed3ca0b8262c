"""What several processes (DDP through accelerate) need from a run, in one place.

- Launch checks: processes that would not train together are refused before any work, and several
  processes on a machine without GPUs are made to train together on the CPU (gloo).
- Sharded launches are ``retain.train.sharding``'s (FSDP2 trains; FSDP1, DeepSpeed, Megatron are refused
  with the reason); :func:`check_data_parallel` guards a run configured for DDP.
- ``on_main_process``: work done once (the run folder's rules) with its value or error given to all.
- ``parameter_layout``: when a strategy changes the parameters, the DDP wrapper is built again.
- The process group outlives a run (``retain bench`` runs several in one process) and is destroyed at
  exit; its timeout is long because the other processes wait while the main one evaluates and writes.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from retain.errors import ConfigError
from retain.models.sharding import once

# The other processes wait in a barrier while the main one scores the eval suite, writes checkpoints
# and model folders; a large suite on a large model can take longer than torch's default (10 to 30 min).
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)


def process_group_kwargs() -> list[Any]:
    """accelerate's handler that sets the process group's timeout (used when the group is created)."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)]


T = TypeVar("T")


def on_main_process(accelerator: Any, work: Callable[[], T]) -> T:
    """``work()`` run by the main process alone, its value (or its error) given to every process
    (``retain.models.sharding.once``).

    For what must happen once: the run folder's rules (``--overwrite`` empties it, ``config.yaml`` is
    written) would race if every process applied them.
    """
    return once(accelerator, work)


def launched_without_devices(environ: Any) -> bool:
    """Several processes (``torchrun``, ``accelerate launch --multi_gpu``) on a machine without GPUs: they
    must train together on the CPU (gloo). Left alone, accelerate would make each one a separate
    single-process run, all writing the same run folder."""
    return int(environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )


def check_process_count(processes: int, environ: Any) -> None:
    """Refuse a launch that asked for several processes and got one (or processes that do not know of
    each other): the run would silently train with a smaller global batch, or several runs would
    write one folder."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world > processes:
        raise ConfigError(
            f"{world} processes were started (WORLD_SIZE={world}) but they do not train together "
            f"(accelerate set up {processes}); each would write the same output.dir",
            hint="on GPUs use `accelerate launch --num_processes N -m retain train RUN.yaml`; on CPUs "
                 "`torchrun --nproc_per_node N -m retain train RUN.yaml`",
        )
    simple_launcher = "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ
    mpi = any(k in environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    if processes == 1 and simple_launcher and not mpi:
        raise ConfigError(
            "`accelerate launch --num_processes N` started one process, not N: on CPUs accelerate starts "
            "several processes only through MPI (--mpirun_hostfile), so this would train alone with a "
            "global batch N times smaller than asked",
            hint="on CPUs run `torchrun --nproc_per_node N -m retain train RUN.yaml`; on GPUs "
                 "`accelerate launch --num_processes N -m retain train RUN.yaml`; or drop --num_processes",
        )


def requested_cpu_processes(environ: Any, parent_cmdline: list[str] | None) -> int | None:
    """N when ``accelerate launch --cpu --num_processes N`` (N > 1) started this one process.

    accelerate's simple launcher starts a single process on CPUs (several only through MPI) and does
    not pass N on; it leaves ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR`` without ``WORLD_SIZE``. N is read
    from the launcher's own command line (the parent process), so the command users type keeps working.
    """
    if "WORLD_SIZE" in environ or "MASTER_ADDR" not in environ or "ACCELERATE_USE_CPU" not in environ:
        return None
    if any(k in environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")):
        return None
    args = list(parent_cmdline or [])
    if not any(a.endswith("accelerate") or a == "launch" for a in args):
        return None
    for i, arg in enumerate(args):
        value = None
        if arg in ("--num_processes", "--num-processes") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(("--num_processes=", "--num-processes=")):
            value = arg.split("=", 1)[1]
        if value is not None and value.isdigit() and int(value) > 1:
            return int(value)
    return None


def parent_cmdline() -> list[str] | None:
    """The parent process's arguments (Linux /proc), or None where they cannot be read."""
    import os

    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def torchrun_command(processes: int, retain_args: list[str], python: str) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N -m retain ARGS``: N CPU processes that train
    together (gloo), the same as ``torchrun --nproc_per_node N -m retain ARGS``."""
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "retain",
            *retain_args]


SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_data_parallel(distributed_type: Any) -> None:
    """Refuse a sharded launch for a run configured data-parallel (DDP).

    The DDP path reads whole weights in many places (anchors, statistics split across processes,
    teachers, evaluation and checkpoints on the main process alone); sharded training has its own path
    (``train.parallel: fsdp``, ``retain.train.sharding``), which launches with accelerate's FSDP2 flags
    select before this is reached.
    """
    name = getattr(distributed_type, "name", str(distributed_type)).split(".")[-1]
    if name in SHARDED:
        raise ConfigError(
            f"this run is configured data-parallel (train.parallel: ddp) and the launch for {name}, which shards "
            "the weights",
            hint="shard with train.parallel: fsdp (FSDP2: `torchrun --nproc_per_node N -m retain train RUN.yaml "
                 "--set train.parallel=fsdp`), or launch without FSDP/DeepSpeed",
        )


def end_training(accelerator: Any) -> None:
    """Trackers closed. With several processes the process group stays until the process exits, since a
    later run in the same process (``retain bench`` runs one per strategy) needs it; accelerate's
    ``end_training`` would destroy it."""
    if accelerator.num_processes == 1:
        accelerator.end_training()
        return
    for tracker in accelerator.trackers:
        tracker.finish()
    _destroy_process_group_at_exit()


@functools.cache
def _destroy_process_group_at_exit() -> None:
    import atexit

    def destroy() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def parameter_layout(model: nn.Module) -> tuple[tuple[str, int, bool], ...]:
    """Which parameter objects the model has and which train: what a DDP wrapper was built for."""
    return tuple((name, id(p), p.requires_grad) for name, p in model.named_parameters())
