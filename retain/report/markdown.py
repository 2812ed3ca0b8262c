"""The summary table as markdown (for PR comments, READMEs) and as a rich table (for the terminal),
and the per-eval before/after table that ``retain bench`` and ``retain train`` print at the end.

Both use the same columns and number formatting as the HTML report (``summary.summary_cells``), so a
number reads the same wherever it is seen.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from retain.results.schema import Results
from retain.results.summary import (
    AGGREGATE_HEADERS,
    SUMMARY_HEADERS,
    aggregate_cells,
    fmt_interval,
    fmt_num,
    run_label,
    summary_cells,
)


def _md_cell(text: str) -> str:
    """Escape what would break a markdown table row (pipes, line breaks)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def summary_table_markdown(results: Results) -> str:
    """A GitHub-flavoured markdown table, one row per strategy run; '—' marks a missing value."""
    lines = [
        "| " + " | ".join(SUMMARY_HEADERS) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(SUMMARY_HEADERS) - 1)) + "|",
    ]
    for run in results.runs:
        lines.append("| " + " | ".join(_md_cell(c) for c in summary_cells(run, results)) + " |")
    if results.aggregates:
        lines += ["", "Over seeds (mean [95% interval over seeds and report items]):", "",
                  "| " + " | ".join(AGGREGATE_HEADERS) + " |",
                  "|" + "|".join([":---"] + ["---:"] * (len(AGGREGATE_HEADERS) - 1)) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in aggregate_cells(a)) + " |" for a in results.aggregates]
    return "\n".join(lines) + "\n"


def summary_rich_table(results: Results) -> Table:
    """The summary as a rich Table (numbers right-aligned)."""
    title = f"retain — {results.scenario or results.base_model}"
    table = Table(title=title, show_lines=False)
    for i, header in enumerate(SUMMARY_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i > 0, overflow="fold" if i == 0 else "ellipsis")
    for run in results.runs:
        # Cells are plain text, not rich markup: a strategy named "[red]" must print as is.
        table.add_row(*[Text(c) for c in summary_cells(run, results)])
    return table


def aggregate_rich_table(results: Results) -> Table:
    """Each item over its seeds (``retain bench --seeds``)."""
    table = Table(title="over seeds: mean [95% interval over seeds and report items]; vs the first item: paired")
    for i, header in enumerate(AGGREGATE_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for aggregate in results.aggregates:
        table.add_row(*[Text(c) for c in aggregate_cells(aggregate)])
    return table


def print_summary(results: Results, console: Console | None = None) -> None:
    """Print the summary table (and the over-seeds table) to the terminal (or the given rich console)."""
    console = console or Console()
    console.print(summary_rich_table(results))
    if results.aggregates:
        console.print(aggregate_rich_table(results))


def score_changes_table(results: Results) -> Table:
    """Every score of the base model and after the last task, per run (losses included)."""
    base = results.runs[0].records[0].scores if results.runs and results.runs[0].records else {}
    table = Table(title="scores: base -> after the last task")
    table.add_column("eval")
    table.add_column("base", justify="right")
    for run in results.runs:
        table.add_column(Text(run_label(run, results)), justify="right")
    for key, score in base.items():
        arrow = "↑" if score.higher_is_better else "↓"
        row = [Text(f"{key} ({score.metric} {arrow})"), f"{score.value:.4g}"]
        for run in results.runs:
            last = run.records[-1].scores.get(key) if run.records else None
            row.append("—" if last is None else f"{last.value:.4g}")
        table.add_row(*row)
    return table


def print_score_changes(results: Results, console: Console | None = None) -> None:
    """Print :func:`score_changes_table` (the bench and ``retain train`` end with it)."""
    if results.runs:
        (console or Console()).print(score_changes_table(results))


def print_budget(results: Results, console: Console | None = None) -> None:
    """One line per budgeted run: how its strengths moved and which step each task kept."""
    console = console or Console()
    for run in results.runs:
        budget = run.budget
        if budget is None:
            continue
        moved = ", ".join(f"{k} {budget.start[k]:.3g} → {v:.3g}" for k, v in budget.final.items() if k in budget.start)
        kept = "; ".join(
            f"{d.task}: kept step {d.kept_step} of {d.end_step}" + (" (rolled back)" if d.rolled_back else "")
            + (f", report retention {fmt_num(d.report_general_retention)}{fmt_interval(d.report_interval)}"
               if d.report_general_retention is not None else "")
            for d in budget.tasks
        )
        line = f"budget · {run.name} ({budget.mode}): {moved or 'no strength to adapt'}; {kept}"
        console.print(Text(line + (f"; stopped: {budget.stopped}" if budget.stopped else "")))
