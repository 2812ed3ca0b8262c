"""``retain tune``: search hybrids and strengths on your run or a scenario; resumable; best.yaml at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retain.cli.app import app, command, console
from retain.cli.recommend import constraints_from_options


class _Bar:
    """A rich progress bar over trials (the library's TuneProgress hooks)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]tune"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self.task = None
        self.best = ""

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task("tune", total=total, completed=done, info="")
        self.progress.start()

    def trial_started(self, number: int, label: str) -> None:
        self.progress.update(self.task, info=f"trial {number}: {label}{self.best}")

    def trial_finished(self, record, best) -> None:  # noqa: ANN001
        done = record.state in ("complete", "pruned") and record.duplicate_of is None
        if best is not None:
            self.best = f"  · best #{best.number} {best.label} {best.new_task_score:.3f}/{best.general_retention:.3f}"
        self.progress.update(self.task, advance=1 if done else 0, info=f"trial {record.number} {record.state}{self.best}")

    def confirm_started(self, record, steps: int) -> None:  # noqa: ANN001
        console.print(f"confirming trial #{record.number} {record.label} at the full budget ({steps} steps per task)",
                      highlight=False)

    def stop(self) -> None:
        self.progress.stop()


@app.command()
@command
def tune(
    target: str = typer.Argument(..., help="A run YAML (its data and eval suite) or a scenario (stories-contracts, synthetic)."),
    out: Path = typer.Option(..., "--out", help="Tune folder: study.db, trials.json, best.yaml, report.html, trials/."),
    trials: int = typer.Option(20, "--trials", min=1, help="Trials in all (a resumed tune counts the finished ones)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Steps per task per trial (default: the run's)."),
    min_general_retention: Optional[float] = typer.Option(
        None, "--min-general-retention", help="Floor R: maximize new-task score subject to general retention >= R."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Start no trial after this many minutes."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Data folder of the stories-contracts scenario."),
    ladder: bool = typer.Option(False, "--ladder", help="lora → +lwf → +replay (or synthetic) → fip …; stop at the first rung that keeps R."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed of the sampler and of every trial's training (default: the run's train.seed)."),
    compute: str = typer.Option("high", "--compute", help="low | medium | high: rules out what low compute cannot afford."),
    privacy: str = typer.Option("normal", "--privacy", help="strict: never replay real data."),
    stakes: str = typer.Option("normal", "--stakes", help="high: every hybrid includes lwf or fip."),
    adapters: Optional[bool] = typer.Option(None, "--adapters/--full-weights", help="Search only adapter or only full-weight hybrids."),
    confirm: int = typer.Option(
        2, "--confirm", min=0, help="With --steps below the run's budget: retrain this many promising trials at the full budget."),
    hybrids: Optional[str] = typer.Option(
        None, "--hybrids", help="Comma-separated hybrids to search (e.g. full+replay,lora+lwf); default: the most promising."),
) -> None:
    """Search hybrids and their strengths by training each for a short budget; write the best as best.yaml."""
    from rich.markup import escape

    from retain.guide.target import load_target
    from retain.guide.tune import MARKER, TuneOptions, Tuner, check_folder
    from retain.guide.tune_report import front_tables

    constraints = constraints_from_options(compute, privacy, stakes, adapters)
    if not (out / MARKER).is_file():
        check_folder(out, {})  # refuse a foreign non-empty folder before any data loads
    loaded = load_target(target, data_dir=data_dir, seed=seed)  # without --seed the run's own train.seed stands
    options = TuneOptions(trials=trials, steps=steps, min_general_retention=min_general_retention,
                          max_minutes=max_minutes, ladder=ladder, seed=int(loaded.base["train"]["seed"]),
                          constraints=constraints, confirm=confirm,
                          hybrids=[h.strip() for h in hybrids.split(",") if h.strip()] if hybrids else None)
    tuner = Tuner(loaded, options, out, progress=_Bar())
    names = escape(", ".join(tuner.labels[h.key] for h in tuner.eligible))
    console.print(f"[bold]search space[/]: {len(tuner.eligible)} hybrids ({names})",
                  highlight=False)
    for key, why in tuner.skipped.items():
        console.print(escape(f"  skipped {key}: {why}"), highlight=False)
    result = tuner.run()
    for table in front_tables(result.records, min_general_retention, result.confirmed):
        console.print(table)
    if result.best is None:
        console.print("no trial finished")
    else:
        floor = 0.9 if min_general_retention is None else min_general_retention
        verdict = "keeps" if result.keeps_floor else "[red]misses[/]"
        console.print(
            f"best: trial #{result.best.number} {result.best.label} at {result.best.steps} steps per task, new-task score "
            f"{result.best.new_task_score:.3f}, general retention {result.best.general_retention:.3f} "
            f"({verdict} the floor {floor:g})", highlight=False)
    console.print(f"trials: {out / 'trials.json'}\nbest:   {out / 'best.yaml'}  (retain train {out / 'best.yaml'})"
                  f"\nreport: {out / 'report.html'}")
