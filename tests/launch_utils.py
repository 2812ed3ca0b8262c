"""Two gloo CPU processes beside this one: the shared launch of the several-process tests.

The workers start first; this process computes the one-process references while they train (start-up
is the expensive part, so each test launches once for all its cases).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable, TypeVar

import torch
import torch.multiprocessing as mp

T = TypeVar("T")

# fork: the workers inherit the imported libraries (spawn re-imports torch and transformers in each,
# about 20 s per launch on two cores); spawn where fork is unsafe, or when asked
START_METHOD = os.environ.get("RETAIN_TEST_START_METHOD", "fork" if sys.platform == "linux" else "spawn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def beside_workers(worker: Callable[..., Any], world: int, root: str, one_process: Callable[[], T]) -> T:
    """Start ``worker(rank, world, port, root)`` on ``world`` processes, run ``one_process()`` here on one
    thread meanwhile, wait for the workers (a failed worker raises here), and return the references."""
    workers = mp.start_processes(worker, args=(world, free_port(), root), nprocs=world, join=False,
                                 start_method=START_METHOD)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return one_process()
    finally:
        torch.set_num_threads(previous)
        while not workers.join():
            pass


def join_as_worker(rank: int, world: int, port: int) -> None:
    """This forked process as rank ``rank`` of ``world`` gloo CPU processes: the environment torchrun would
    set, one thread, and a fresh accelerate state (a forked worker inherits this process's single-process
    one from earlier tests)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true",
    )
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
