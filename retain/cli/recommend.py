"""``retain recommend``: a hybrid (and alternatives) for your constraints, with reasons and evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from retain.cli.app import app, command, console


def _check(value: str, allowed: tuple[str, ...], option: str) -> str:
    from retain.errors import ConfigError

    value = value.strip().lower()
    if value not in allowed:
        raise ConfigError(f"{option} {value!r}: choose one of {', '.join(allowed)}")
    return value


def constraints_from_options(compute: str, privacy: str, stakes: str, adapters: bool | None, tasks: int = 1,
                             min_general_retention: float | None = None) -> Any:
    """The ``Constraints`` of the options ``recommend`` and ``tune`` share, each value checked by name."""
    from retain.errors import ConfigError
    from retain.guide.rules import Constraints, check_consistent

    if min_general_retention is not None and not 0.0 < min_general_retention <= 1.0:
        raise ConfigError(f"--min-general-retention {min_general_retention:g}: give a share of the base model's "
                          "general score between 0 and 1 (e.g. 0.98)")
    return check_consistent(Constraints(
        compute=_check(compute, ("low", "medium", "high"), "--compute"),  # type: ignore[arg-type]
        privacy=_check(privacy, ("strict", "normal"), "--privacy"),  # type: ignore[arg-type]
        stakes=_check(stakes, ("high", "normal"), "--stakes"),  # type: ignore[arg-type]
        weights="any" if adapters is None else ("adapters" if adapters else "full"),
        tasks=tasks,
        min_general_retention=min_general_retention,
    ))


@app.command()
@command
def recommend(
    compute: str = typer.Option("medium", "--compute", help="low | medium | high: memory and time you can spend."),
    privacy: str = typer.Option("normal", "--privacy", help="strict: no real training data may be kept | normal."),
    stakes: str = typer.Option("normal", "--stakes", help="high: general behaviour must not change | normal."),
    adapters: Optional[bool] = typer.Option(
        None, "--adapters/--full-weights", help="Ship adapters, or fine-tune every weight (default: either).",
    ),
    tasks: int = typer.Option(1, "--tasks", min=1, help="How many tasks you will train in sequence."),
    min_general_retention: Optional[float] = typer.Option(
        None, "--min-general-retention",
        help="Floor R on measured general retention (default: 0.95 with --stakes high, else 0.9)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write a run YAML of the recommended hybrid here, with your constraints recorded in it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Recommend a hybrid of methods for your constraints: reasons, and measured evidence for each."""
    from rich.markup import escape

    from retain.guide.catalogue import display_name
    from retain.guide.evidence import load_evidence
    from retain.guide.rules import rank, recorded_constraints
    from retain.guide.template import run_yaml
    from retain.io import atomic_write_text, output_errors, prepare_output

    constraints = constraints_from_options(compute, privacy, stakes, adapters, tasks, min_general_retention)
    if out is not None:  # before any output: an edited run YAML is never replaced unless asked
        prepare_output(out, overwrite=overwrite, kind="file")
    evidence = load_evidence()
    allowed, excluded = rank(constraints, evidence)
    if not allowed:  # pragma: no cover - the catalogue always has an adapter and a full-weight hybrid that fit
        from retain.errors import ConfigError

        raise ConfigError(f"no hybrid fits {constraints.describe()}")
    console.print(f"[bold]constraints[/]: {constraints.describe()}")
    if evidence is not None:
        split = any(r.report for r in evidence.rows.values())
        how = ("ranked on the select part of every eval, printed on the report part with intervals" if split
               else "general retention and new-task gain on one sample, measured before the select/report split")
        console.print(f"[bold]evidence[/]: {evidence.provenance()}; {how}", highlight=False)
    for place, item in enumerate(allowed[:3]):
        title = "recommended" if place == 0 else f"alternative {place}"
        name = display_name(item.hybrid)
        key = f"  ({item.hybrid.key})" if item.hybrid.key != item.hybrid.label else ""
        console.print(f"\n[bold]{title}: [cyan]{escape(name)}[/][/]{escape(key)}", highlight=False)
        console.print(f"  {escape(item.hybrid.summary)}", highlight=False)
        for reason in item.reasons:
            console.print(f"  - {escape(reason)}", highlight=False)
        row = item.evidence
        if row is None or row.general_retention is None:
            console.print("  measured: not in the packaged table", highlight=False)
        else:
            console.print(f"  measured: {escape(row.describe())}", highlight=False)
    if excluded:
        console.print("\n[bold]ruled out[/]:", highlight=False)
        for item in excluded:
            console.print(escape(f"  {display_name(item.hybrid):<30} {item.excluded_by[0]}"), highlight=False)
    if out is not None:
        best = allowed[0].hybrid
        header = (f"retain recommend: {best.label} for {constraints.describe()}\n"
                  + "\n".join(f"- {r}" for r in allowed[0].reasons))
        with output_errors(out, "write the run YAML"):
            atomic_write_text(out, run_yaml(best, tasks, header, recorded_constraints(constraints)))
        console.print(f"\nrun YAML: {out} (replace the <REPLACE ...> values, then `retain train {out}`)")
