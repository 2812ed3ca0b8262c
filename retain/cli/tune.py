"""``retain tune``: search hybrids and strengths on your run or a scenario; resumable; best.yaml at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retain.cli.app import app, command, console


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
    compute: Optional[str] = typer.Option(
        None, "--compute", help="low | medium | high: low trains adapters only. Default: as the run YAML records, else high; may only narrow it."),
    privacy: Optional[str] = typer.Option(
        None, "--privacy", help="strict: never replay real data. Default: as recorded, else normal; may only narrow it."),
    stakes: Optional[str] = typer.Option(
        None, "--stakes", help="high: every hybrid includes lwf or fip. Default: as recorded, else normal; may only narrow it."),
    adapters: Optional[bool] = typer.Option(
        None, "--adapters/--full-weights", help="Search only adapter or only full-weight hybrids. Default: as recorded, else either."),
    confirm: int = typer.Option(
        2, "--confirm", min=0, help="Retrain this many promising trials at the full budget on fresh seeds; the best of them wins."),
    hybrids: Optional[str] = typer.Option(
        None, "--hybrids", help="Comma-separated hybrids to search (e.g. full+replay,lora+lwf); default: the most promising."),
) -> None:
    """Search hybrids and their strengths by training each for a short budget; write the best as best.yaml."""
    from rich.markup import escape

    from retain.guide.rules import tighten
    from retain.guide.target import load_target
    from retain.guide.tune import MARKER, TuneOptions, Tuner, check_folder, space_lines
    from retain.guide.tune_report import figure_lines, front_tables
    from retain.io_lock import writing_to

    flags = {"compute": None if compute is None else compute.strip().lower(),
             "privacy": None if privacy is None else privacy.strip().lower(),
             "stakes": None if stakes is None else stakes.strip().lower(),
             "weights": None if adapters is None else ("adapters" if adapters else "full")}
    if not (out / MARKER).is_file():
        check_folder(out, {})  # refuse a foreign non-empty folder before any data loads
    loaded = load_target(target, data_dir=data_dir, seed=seed)  # without --seed the run's own train.seed stands
    constraints = tighten(loaded.constraints, flags, loaded.task_count, source=target)  # never wider than recorded
    options = TuneOptions(trials=trials, steps=steps, min_general_retention=min_general_retention,
                          max_minutes=max_minutes, ladder=ladder, seed=int(loaded.base["train"]["seed"]),
                          constraints=constraints, confirm=confirm,
                          hybrids=[h.strip() for h in hybrids.split(",") if h.strip()] if hybrids else None)
    tuner = Tuner(loaded, options, out, progress=_Bar())
    given = ", ".join(f"--{k} {v}" if k != "weights" else ("--adapters" if v == "adapters" else "--full-weights")
                      for k, v in flags.items() if v is not None)
    origin = (f"recorded in {target}" + (f", narrowed by {given}" if given else "")
              if loaded.constraints is not None else
              "none recorded in the target" + (f"; {given} as given" if given else "") + ", the rest the widest")
    console.print(f"[bold]constraints[/]: {escape(tuner.constraints.describe())} ({escape(origin)})", highlight=False)
    rest = len(tuner.allowed) - len(tuner.eligible)
    more = (f" of {len(tuner.allowed)} they allow, most promising first (--hybrids or more --trials for the other {rest})"
            if rest > 0 else ", all they allow")
    console.print(f"[bold]search space[/]: {len(tuner.eligible)} hybrids{more}; each strength drawn from its range:",
                  highlight=False)
    for line in space_lines(tuner.eligible, tuner.labels):
        console.print(f"  {escape(line)}", highlight=False)
    for key, why in tuner.skipped.items():
        console.print(escape(f"  skipped {key}: {why}"), highlight=False)
    with writing_to(out, "retain tune"):  # one writer per tune folder
        result = tuner.run()
    for table in front_tables(result.records, min_general_retention, result.confirmed):
        console.print(table)
    if result.best is None:
        console.print("no trial finished")
    else:
        best = result.best
        strengths = ", ".join(f"{k}={v:.3g}" for k, v in best.params.items()) or "its settings"
        console.print(f"best: trial #{best.confirms if best.confirms is not None else best.number} {escape(best.label)} "
                      f"({escape(strengths)}), best.yaml at {best.steps} steps per task, seed {best.seed}; why:",
                      highlight=False)
        for line in figure_lines(best, result.records, result.keeps_floor, min_general_retention):
            style = "[red]" if line.startswith("WARNING") else ""
            console.print(f"  {style}{escape(line)}{'[/]' if style else ''}", highlight=False)
    console.print(f"trials: {out / 'trials.json'}\nbest:   {out / 'best.yaml'}  (retain train {out / 'best.yaml'})"
                  f"\nreport: {out / 'report.html'}")
