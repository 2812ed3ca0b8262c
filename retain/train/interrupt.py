"""Ctrl-C (SIGINT) or SIGTERM during training: finish the step, checkpoint it, stop with a message saying where.

SIGTERM is what ``docker stop``, Kubernetes and Slurm preemption send before they kill: it is treated
like Ctrl-C (exit 143 instead of 130), so a preempted run loses at most the step in progress.

The handler only sets a flag, which the run checks after each optimizer step (a step is never cut in
half, so the checkpoint is an exact resume point). The first signal also restores the previous
handlers, so a second one stops at once (an interrupted save leaves the previous checkpoint intact:
checkpoints are written under a temporary name and renamed). Outside the training loop (loading,
evaluation) a signal interrupts at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from retain.errors import Interrupted

#: The signals that stop training at the next step boundary.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Interrupted):
    """Training stopped by a signal after a completed step; ``checkpoint`` holds that step (or None)."""

    def __init__(self, where: str, checkpoint: Path | None, signum: int = signal.SIGINT) -> None:
        self.where = where
        self.checkpoint = checkpoint
        saved = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"stopped {where}{saved}", signum)


class StopRequest:
    """A flag set by SIGINT or SIGTERM while :meth:`installed` is active; ``signum`` is the signal."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int = signal.SIGINT

    def saving_note(self) -> str:
        """The line printed while the checkpoint of the stop is written."""
        name = "interrupted" if self.signum == signal.SIGINT else "terminated (SIGTERM)"
        again = "Ctrl-C" if self.signum == signal.SIGINT else "a second SIGTERM"
        return f"{name}: saving a checkpoint of the last completed step ({again} skips it)"

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

        def restore() -> None:
            for signum, handler in previous.items():
                fallback = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                signal.signal(signum, handler if handler is not None else fallback)

        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            self.signum = signum
            restore()

        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)
        try:
            yield self
        finally:
            restore()
