"""Ctrl-C during training: finish the step, checkpoint it, stop with a message saying where.

The handler only sets a flag, which the run checks after each optimizer step (a step is never cut in
half, so the checkpoint is an exact resume point). The first Ctrl-C also restores the previous
handler, so a second one stops at once (an interrupted save leaves the previous checkpoint intact:
checkpoints are written under a temporary name and renamed). Outside the training loop (loading,
evaluation) Ctrl-C interrupts at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after a completed step; ``checkpoint`` holds that step (or None)."""

    def __init__(self, where: str, checkpoint: Path | None) -> None:
        self.where = where
        self.checkpoint = checkpoint
        saved = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"stopped {where}{saved}")


class StopRequest:
    """A flag set by SIGINT while :meth:`installed` is active."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
