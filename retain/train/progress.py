"""A rich progress bar with loss and tokens/s; silent when disabled or not on the main process."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TaskProgress:
    def __init__(self, description: str, total: int, start: int, enabled: bool, console: Console | None = None) -> None:
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> "TaskProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, completed: int, metrics: dict[str, Any]) -> None:
        if self._progress is None:
            return
        info = f"loss {metrics.get('loss', float('nan')):.4f}  {metrics['tokens_per_second']:,.0f} tok/s"
        if metrics.get("skipped_steps"):
            info += f"  skipped {metrics['skipped_steps']:.0f}"
        extras = [f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("loss/")]
        if extras:
            info += "  " + "  ".join(extras)
        self._progress.update(self._task, completed=completed, info=info)


def console_print(console: Console | None, message: str) -> None:
    """One line for the person running the command: on ``console``, else on standard error. Plain text
    (no markup), so paths and key names with brackets print as they are."""
    (console or Console(stderr=True)).print(message, markup=False, highlight=False)
