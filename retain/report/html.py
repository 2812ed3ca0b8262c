"""One self-contained HTML report: inline CSS and inline SVG, no script and no external URL.

The page must open offline (on a cluster, from a CI artifact), so nothing is fetched: every figure is
an inline ``<svg>``, and every string that came from data (names, prompts, generations) is escaped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path

from retain.io import atomic_write_text
from retain.report import plots
from retain.results.schema import SCHEMA_VERSION, Results, StepRecord, StrategyRun
from retain.results.summary import (
    SUMMARY_HEADERS,
    Series,
    budget_series,
    fmt_bytes,
    fmt_num,
    retention_series,
    summary_cells,
    sweep_series,
    tradeoff_points,
)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
.meta { color: #666; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.figs { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.fig svg { max-width: 100%; height: auto; }
pre { white-space: pre-wrap; margin: 0; font-size: .85rem; max-width: 40rem; }
.muted { color: #888; font-size: .8rem; }
.wide { max-width: 100%; overflow-x: auto; }
"""

#: Score columns per table in "Scores at every step": a suite of many evals becomes several tables
#: that fit a page, never one that runs off its right edge.
SCORE_COLUMNS_PER_TABLE = 6


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    """An HTML table of already-formatted cell text (escaped here); columns >= numeric_from align right."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{_e(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>" if body else ""


def _fig(svg: str) -> str:
    return f'<div class="fig">{svg}</div>'


# --- sections ----------------------------------------------------------------------------------


def _title(results: Results) -> str:
    return f"retain report — {results.scenario}" if results.scenario else "retain report"


def _header(results: Results) -> str:
    meta = (
        f"base model <b>{_e(results.base_model)}</b>"
        + (f" · scenario <b>{_e(results.scenario)}</b>" if results.scenario else "")
        + f" · {len(results.runs)} strateg{'y' if len(results.runs) == 1 else 'ies'}"
        + f" · created {_e(results.created)} · retain {_e(results.retain_version)}"
        + f" · results schema {_e(SCHEMA_VERSION)}"
        + (f" (read from a {_e(results.schema_version)} file)" if results.schema_version != SCHEMA_VERSION else "")
    )
    return f"<h1>{_e(_title(results))}</h1><p class=\"meta\">{meta}</p>"


def _summary_section(results: Results) -> str:
    table = _table(SUMMARY_HEADERS, (summary_cells(run, results) for run in results.runs))
    note = (
        '<p class="muted">retention = general score after / before (1.0 = unchanged). '
        "BWT and forgetting need two or more tasks. KL from base in nats per token; "
        "weight drift = ||θ−θ₀|| / ||θ₀||.</p>"
    )
    return _section("Summary", table + note)


def _plots_section(results: Results, sweeps: Mapping[str, Sequence[Series]]) -> str:
    figs = []
    points = tradeoff_points(results)
    if points:
        figs.append(_fig(plots.tradeoff_scatter_svg(points)))
    series = [s for s in retention_series(results) if any(y is not None for y in s[2])]
    if series:
        figs.append(_fig(plots.retention_plot_svg(series)))
    for param, param_series in sweeps.items():
        figs.append(_fig(plots.sweep_plot_svg(param_series, param)))
    return _section("Learning vs forgetting", f'<div class="figs">{"".join(figs)}</div>' if figs else "")


def _heatmaps_section(results: Results) -> str:
    figs = [
        _fig(plots.heatmap_svg(run.matrix, run.task_names, title=run.name))
        for run in results.runs
        if run.matrix and run.task_names
    ]
    if not figs:
        return ""
    intro = (
        '<p class="muted">R[i][j]: primary score on task j after training through task i; '
        "blank = not evaluated.</p>"
    )
    return _section("Accuracy matrices", intro + f'<div class="figs">{"".join(figs)}</div>')


def _budget_run(run: StrategyRun) -> str:
    budget = run.budget
    assert budget is not None
    bounds = ", ".join(f"{k} = {v:g}" for k, v in budget.bounds.items())
    moved = "; ".join(f"{k}: {budget.start[k]:.3g} → {v:.3g}" for k, v in budget.final.items() if k in budget.start)
    meta = (
        f"<p>{_e(budget.mode)} · {_e(bounds)} · on_exhausted: {_e(budget.on_exhausted)} · a check every "
        f"{budget.check_every} steps on {budget.probe_examples} windows/records per eval · {fmt_num(budget.seconds)} s"
        + (f" · strengths {_e(moved)}" if moved else " · no adaptable strength: the budget only rolls back")
        + (f" · <b>stopped</b>: {_e(budget.stopped)}" if budget.stopped else "") + "</p>"
    )
    rows = [[d.task, str(d.end_step), str(d.kept_step), "yes" if d.rolled_back else "no",
             "yes" if d.within_budget else "no", d.reason] for d in budget.tasks]
    table = _table(["task", "last step", "kept step", "rolled back", "in budget", "why"], rows, numeric_from=1)
    strengths, quantities = budget_series(run)
    figs = [_fig(plots.budget_quantity_svg(series, bound, label, f"{run.name}: {label}"))
            for label, (series, bound) in quantities.items()]
    if strengths:
        figs.append(_fig(plots.budget_strengths_svg(strengths, f"{run.name}: strengths")))
    return f"<h3>{_e(run.name)}</h3>{meta}{table}" + (f'<div class="figs">{"".join(figs)}</div>' if figs else "")


def _budget_section(results: Results) -> str:
    parts = [_budget_run(run) for run in results.runs if run.budget is not None]
    if not parts:
        return ""
    intro = (
        '<p class="muted">Measured every check on a fixed subset of the suite (the dashed line is the bound); each '
        "declared strength moves in log space to hold the bound, and a task that ends over budget restores its best "
        "in-budget point (kept step). Task-end scores above are those of the kept model.</p>"
    )
    return _section("Forgetting budget", intro + "".join(parts))


def _eval_columns(records: Sequence[StepRecord]) -> list[str]:
    names: list[str] = []
    for rec in records:
        names.extend(n for n in rec.scores if n not in names)
    return names


def _eval_header(name: str, records: Sequence[StepRecord]) -> str:
    score = next(r.scores[name] for r in records if name in r.scores)
    arrow = "↑" if score.higher_is_better else "↓"
    return f"{name} ({score.metric} {arrow})"


_KEY_HEADERS = ["#", "after task", "step"]
_TRAINING_HEADERS = ["train loss", "KL from base", "ppl Δ", "weight drift", "seconds", "s/step", "peak memory"]


def _record_key(rec: StepRecord) -> list[str]:
    return [str(rec.index), rec.task or "base", str(rec.global_step)]


def _training_cells(rec: StepRecord) -> list[str]:
    drift = rec.drift
    return [
        fmt_num(rec.train_loss),
        fmt_num(drift.kl_from_base if drift else None),
        fmt_num(drift.ppl_delta if drift else None),
        fmt_num(drift.weight_rel_l2 if drift else None),
        fmt_num(rec.seconds),
        fmt_num(rec.seconds_per_step),
        fmt_bytes(rec.peak_memory_bytes),
    ]


def _records_tables(run: StrategyRun) -> str:
    """The scores, at most ``SCORE_COLUMNS_PER_TABLE`` evals per table, then training cost and drift: each
    table repeats the step columns, so every one reads alone and fits the page."""
    columns = _eval_columns(run.records)
    tables = [
        _table(
            [*_KEY_HEADERS, *[_eval_header(c, run.records) for c in chunk]],
            ([*_record_key(r), *[fmt_num(r.scores[c].value) if c in r.scores else fmt_num(None) for c in chunk]]
             for r in run.records),
            numeric_from=2,
        )
        for chunk in (columns[i: i + SCORE_COLUMNS_PER_TABLE] for i in range(0, len(columns), SCORE_COLUMNS_PER_TABLE))
    ]
    tables.append(_table([*_KEY_HEADERS, *_TRAINING_HEADERS], ([*_record_key(r), *_training_cells(r)] for r in run.records),
                         numeric_from=2))
    return "".join(tables)


def _records_section(results: Results) -> str:
    parts = [f"<h3>{_e(run.name)}</h3>{_records_tables(run)}" for run in results.runs if run.records]
    return _section("Scores at every step", "".join(parts))


def _samples_table(run: StrategyRun) -> str:
    before = run.records[0].samples
    after = run.records[-1].samples if len(run.records) > 1 else {}
    prompts = list(before) + [p for p in after if p not in before]
    if not prompts:
        return ""
    last = run.records[-1].task or "last task"
    head = f"<tr><th>prompt</th><th>base model</th><th>after {_e(last)}</th></tr>"
    rows = "".join(
        f"<tr><td><pre>{_e(p)}</pre></td><td><pre>{_e(before.get(p, '—'))}</pre></td>"
        f"<td><pre>{_e(after.get(p, '—'))}</pre></td></tr>"
        for p in prompts
    )
    return f"<h3>{_e(run.name)}</h3><table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def _samples_section(results: Results) -> str:
    return _section("Sample generations", "".join(_samples_table(run) for run in results.runs if run.records))


# --- entry points ------------------------------------------------------------------------------


def render_html(results: Results, sweeps: Mapping[str, Sequence[Series]] | None = None) -> str:
    """The whole report page as a string.

    ``sweeps`` maps a swept parameter name to the series to plot against it; by default they are
    found from run names of the form ``<strategy>@<param>=<value>`` (see ``summary.sweep_series``).
    """
    sweeps = sweep_series(results) if sweeps is None else sweeps
    body = "".join(
        [
            _header(results),
            _summary_section(results),
            _plots_section(results, sweeps),
            _budget_section(results),
            _heatmaps_section(results),
            _records_section(results),
            _samples_section(results),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(_title(results))}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def write_report(
    results: Results, out_path: str | os.PathLike[str], sweeps: Mapping[str, Sequence[Series]] | None = None
) -> Path:
    """Render and write the report atomically; returns the path written."""
    target = Path(out_path)
    atomic_write_text(target, render_html(results, sweeps))
    return target
