"""What a tune leaves behind: every trial as a record, the best one within the floor, the Pareto front,
``trials.json`` and ``report.html`` (the front plotted, every trial in a table)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from rich.markup import escape as escape_markup
from rich.table import Table

from retain.io import atomic_write_text
from retain.report.plots import pareto_front, tradeoff_scatter_svg

#: the retention floor best.yaml uses when the tune ran without --min-general-retention
DEFAULT_FLOOR = 0.9


@dataclass
class TrialRecord:
    number: int
    state: str  # complete | pruned | failed | running
    hybrid: str
    label: str
    params: dict[str, float] = field(default_factory=dict)
    strategies: list[dict[str, Any]] = field(default_factory=list)
    steps: int | None = None
    new_task_score: float | None = None
    new_task_score_before: float | None = None
    general_retention: float | None = None
    kl_from_base: float | None = None
    seconds: float | None = None
    seconds_per_step: float | None = None
    peak_memory_bytes: int | None = None
    intermediate: list[list[float | None]] = field(default_factory=list)
    note: str = ""
    duplicate_of: int | None = None
    confirms: int | None = None  # a confirmation run: the trial it retrains at the full budget

    @property
    def scored(self) -> bool:
        """Finished with both scores, and not a repeat of an earlier trial's settings."""
        return (self.state == "complete" and self.duplicate_of is None
                and self.new_task_score is not None and self.general_retention is not None)

    def name(self) -> str:
        return f"#{self.number} {self.label}"


#: how far below the floor a short trial's retention may be and still be retrained at the full budget
CONFIRM_BAND = 0.1


def confirm_candidates(
    records: list[TrialRecord], floor: float | None, count: int, band: float = CONFIRM_BAND
) -> list[TrialRecord]:
    """Which short-budget trials to retrain at the full budget: spread along the Pareto front of those
    within ``band`` of the floor, from the best new-task score to the most retention; without any, the
    ``count`` most retentive.

    A short trial's retention is not the full run's, in either direction: unprotected runs keep
    forgetting, but protected ones recover as the learning rate decays (on stories-contracts,
    full+replay at ratio 0.25 keeps 0.809 at step 20, 0.891 at 150 and 0.905 at 300 steps; full+lwf
    0.901 at 40 and 0.929 at 300). So a trial just under the floor is worth its confirmation, and the
    most retentive end of the front is always among the picks."""
    floor = DEFAULT_FLOOR if floor is None else floor
    scored = [r for r in records if r.scored]
    near = [r for r in scored if r.general_retention >= floor - band]  # type: ignore[operator]
    if count <= 0 or not scored:
        return []
    if not near:
        return sorted(scored, key=lambda r: (-r.general_retention, -r.new_task_score, r.number))[:count]  # type: ignore[operator]
    line = front(near)[::-1]  # best new-task score first, most retention last
    if len(line) <= count:
        return line
    if count == 1:
        return [line[-1]]
    picks = sorted({round(i * (len(line) - 1) / (count - 1)) for i in range(count)})
    return [line[i] for i in picks]


def choose_best(records: list[TrialRecord], floor: float | None) -> tuple[TrialRecord | None, bool]:
    """(the best trial, whether it keeps the floor): the highest new-task score among finished trials
    whose general retention is at least ``floor`` (ties: higher retention, then the earlier trial); when
    none keeps it, the trial with the highest retention."""
    floor = DEFAULT_FLOOR if floor is None else floor
    scored = [r for r in records if r.scored]
    if not scored:
        return None, False
    keeping = [r for r in scored if r.general_retention >= floor]  # type: ignore[operator]
    if keeping:
        return max(keeping, key=lambda r: (r.new_task_score, r.general_retention, -r.number)), True
    return max(scored, key=lambda r: (r.general_retention, r.new_task_score, -r.number)), False


def front(records: list[TrialRecord]) -> list[TrialRecord]:
    """Finished trials on the Pareto front of (new-task score, general retention), by new-task score."""
    by_name = {r.name(): r for r in records if r.scored}
    points = [(n, r.new_task_score, r.general_retention) for n, r in by_name.items()]
    return [by_name[p[0]] for p in pareto_front(points)]  # type: ignore[arg-type]


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _params(record: TrialRecord) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in record.params.items()) or "defaults"


HEADERS = ["trial", "hybrid", "strengths", "state", "new task", "retention", "seconds"]


def row_cells(r: TrialRecord) -> list[str]:
    return [str(r.number), r.label, _params(r), r.state + (f" ({r.note})" if r.note else ""),
            _num(r.new_task_score), _num(r.general_retention), _num(r.seconds, 0)]


def _rich_table(title: str, rows: list[TrialRecord], best: TrialRecord | None) -> Table:
    table = Table(title=title)
    for h in HEADERS:
        table.add_column(h, justify="right" if h in ("new task", "retention", "seconds", "trial") else "left")
    for r in rows:
        cells = row_cells(r)
        if best is not None and r is best:
            cells[1] += " ★"
        table.add_row(*(escape_markup(c) for c in cells))
    return table


def front_tables(records: list[TrialRecord], floor: float | None, confirmed: list[TrialRecord] | None = None) -> list[Table]:
    """The Pareto front (and the confirmation runs) as rich tables, the best marked."""
    confirmed = confirmed or []
    best, _ = pick(records, confirmed, floor)
    steps = next((r.steps for r in records if r.steps), None)
    tables = [_rich_table(f"Pareto front at {steps} steps: new-task score vs general retention", front(records), best)]
    if confirmed:
        tables.append(_rich_table(f"confirmed at the full budget ({confirmed[0].steps} steps)", confirmed, best))
    return tables


def pick(records: list[TrialRecord], confirmed: list[TrialRecord], floor: float | None) -> tuple[TrialRecord | None, bool]:
    """The best of the confirmation runs when there are any, else of the trials."""
    return choose_best(confirmed if confirmed else records, floor)


def write_trials_json(
    path: Path, settings: dict[str, Any], records: list[TrialRecord], floor: float | None,
    confirmed: list[TrialRecord] | None = None,
) -> None:
    confirmed = confirmed or []
    best, kept = pick(records, confirmed, floor)
    data = {
        "tune": settings,
        "best": None if best is None else {"trial": best.confirms if best.confirms is not None else best.number,
                                           "steps": best.steps, "confirmed": best.confirms is not None,
                                           "keeps_floor": kept, "floor": DEFAULT_FLOOR if floor is None else floor},
        "front": [r.number for r in front(records)],
        "trials": [asdict(r) for r in records],
        "confirmed": [asdict(r) for r in confirmed],
    }
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False, default=str) + "\n")


_CSS = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}th,td{border:1px solid #ddd;padding:.25rem .5rem}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#666}.fig svg{max-width:100%;height:auto}tr.best td{background:#fff6d5}"""


def _html_table(records: list[TrialRecord], best: TrialRecord | None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in HEADERS)
    rows = []
    for r in records:
        cls = ' class="best"' if best is not None and r is best else ""
        cells = "".join(f'<td class="num">{escape(c)}</td>' if i in (0, 4, 5, 6) else f"<td>{escape(c)}</td>"
                        for i, c in enumerate(row_cells(r)))
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_tune_html(
    settings: dict[str, Any], records: list[TrialRecord], floor: float | None, confirmed: list[TrialRecord] | None = None
) -> str:
    confirmed = confirmed or []
    best, kept = pick(records, confirmed, floor)
    scored = [r for r in records if r.scored]
    plot = tradeoff_scatter_svg([(r.name(), r.new_task_score, r.general_retention) for r in scored]) if scored else ""
    floor_text = f"{DEFAULT_FLOOR if floor is None else floor:g}" + (" (default)" if floor is None else "")
    if best is None:
        verdict = "no trial finished yet"
    else:
        where = f" confirmed at {best.steps} steps" if best.confirms is not None else ""
        verdict = (f"best: trial #{best.number} {escape(best.label)} ({escape(_params(best))}){where}, new-task score "
                   f"{_num(best.new_task_score)}, general retention {_num(best.general_retention)}"
                   + ("" if kept else f" — no trial kept the floor {floor_text}; this one kept the most"))
    meta = (f"target <b>{escape(str(settings.get('target')))}</b> · {len(records)} trials · "
            f"{escape(str(settings.get('steps') or 'default'))} steps per task · retention floor {escape(floor_text)}"
            + (" · ladder" if settings.get("ladder") else ""))
    body = (f"<h1>retain tune</h1><p class=\"meta\">{meta}</p><p>{verdict}</p>"
            f"<h2>Pareto front</h2><div class=\"fig\">{plot}</div>"
            f"{_html_table(front(records), best)}"
            + (f"<h2>Confirmed at the full budget</h2>{_html_table(confirmed, best)}" if confirmed else "")
            + f"<h2>All trials</h2>{_html_table(records, best)}"
            "<p class=\"meta\">retention = mean bounded general score after / before; new task = the last task's "
            "primary score. Pruned trials stopped early: their scores are not final and they are not plotted.</p>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>retain tune</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_tune_report(
    path: Path, settings: dict[str, Any], records: list[TrialRecord], floor: float | None,
    confirmed: list[TrialRecord] | None = None,
) -> None:
    atomic_write_text(path, render_tune_html(settings, records, floor, confirmed))
