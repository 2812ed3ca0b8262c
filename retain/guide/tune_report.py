"""What a tune leaves behind: every trial as a record, the best one within the floor, the Pareto front,
``trials.json`` and ``report.html`` (the front plotted, every trial in a table).

Three figures are kept apart. *Selection*: the search trials, scored on the ``select`` part of every
eval. *Confirmation*: the most promising ones retrained at the full budget on a fresh seed, still on
``select``; the best of those is the winner. *Report*: the winner's confirmation run read once on the
``report`` part, with its intervals (nothing chooses on it, so it carries no winner's curse)."""

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
    seed: int | None = None  # train.seed the run trained with
    stage: str = "search"  # search (selection) | confirm (at the full budget on a fresh seed)
    report: dict[str, Any] | None = None  # the winner only: its figures on the report part (report_figures)

    @property
    def scored(self) -> bool:
        """Finished with both scores, and not a repeat of an earlier trial's settings."""
        return (self.state == "complete" and self.duplicate_of is None
                and self.new_task_score is not None and self.general_retention is not None)

    def name(self) -> str:
        return f"#{self.number} {self.label}"


#: how far below the floor a short trial's retention may be and still be retrained at the full budget
CONFIRM_BAND = 0.1


def confirm_band(steps: int, full_steps: int) -> float:
    """How far below the floor a trial may be and still be confirmed: ``CONFIRM_BAND`` for trials shorter
    than the full budget (protected runs recover retention later), none when the trials already ran the
    full budget (their retention is the full run's, so a trial under the floor only lost a slot to one
    that keeps it)."""
    return 0.0 if steps >= full_steps else CONFIRM_BAND


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


#: what ``report_figures`` copies from a run's summary on the report part
REPORT_KEYS = ("new_task_score", "new_task_score_before", "general_retention", "gain", "new_task_score_interval",
               "general_retention_interval", "gain_interval", "confidence")


def report_figures(summary: Any) -> dict[str, Any]:
    """The reported figures of a run (its ``summary``: the report part, with intervals where measured)."""
    return {key: getattr(summary, key, None) for key in REPORT_KEYS}


def beats_base(report: dict[str, Any] | None) -> bool | None:
    """Whether the run beat the base model on the new task on the report part: the gain interval's upper
    end (the gain itself without an interval) is above 0; None when not measured."""
    if not report:
        return None
    interval = report.get("gain_interval")
    high = interval[1] if interval else report.get("gain")
    return None if high is None else high > 0


def shortfalls(best: TrialRecord, kept: bool, floor: float | None) -> list[str]:
    """What the chosen trial fails, in words: the floor (on confirmation, select part) and the base
    model's new-task score (report part)."""
    out = []
    bound = DEFAULT_FLOOR if floor is None else floor
    if not kept and best.general_retention is not None:
        where = "on confirmation" if best.stage == "confirm" else "in the search (it was not confirmed)"
        out.append(f"misses the floor {where}: general retention {best.general_retention:.3f} < {bound:g}"
                   + (" (the default floor)" if floor is None else "") + " on the select part")
    if beats_base(best.report) is False:
        r = best.report or {}
        interval = r.get("gain_interval")
        spread = f", interval [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
        out.append(f"does not beat the base model on the new task ({_num(r.get('new_task_score'))} vs "
                   f"{_num(r.get('new_task_score_before'))} before; gain {_signed(r.get('gain'))}{spread}, report part)")
    return out


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def _with_interval(value: float | None, interval: list[float] | None, signed: bool = False) -> str:
    text = _signed(value) if signed else _num(value)
    if interval:
        ends = (_signed(interval[0]), _signed(interval[1])) if signed else (_num(interval[0]), _num(interval[1]))
        text += f" [{ends[0]}, {ends[1]}]"
    return text


def figure_lines(best: TrialRecord, records: list[TrialRecord], kept: bool, floor: float | None) -> list[str]:
    """Why the best was chosen, one line per stage: selection, confirmation, report, then what it fails."""
    bound = f"{DEFAULT_FLOOR if floor is None else floor:g}" + (" (default)" if floor is None else "")
    search = next((r for r in records if r.number == (best.confirms if best.confirms is not None else best.number)
                   and r.stage == "search"), None)
    lines = []
    if search is not None:
        lines.append(f"selection (select part, {search.steps} steps per task, seed {search.seed}): new-task score "
                     f"{_num(search.new_task_score)}, general retention {_num(search.general_retention)}")
    which = "confirmed trials" if best.stage == "confirm" else "trials"
    why = (f"of the {which} that keep the floor {bound}, the best new-task score" if kept
           else f"none of the {which} keeps the floor {bound}: the one with the most retention")
    if best.stage == "confirm":
        lines.append(f"confirmation (select part, the full budget of {best.steps} steps per task, fresh seed {best.seed}): "
                     f"new-task score {_num(best.new_task_score)}, general retention {_num(best.general_retention)}; "
                     f"{why}")
    else:
        lines.append(f"not confirmed at the full budget (--confirm 0, or time ran out): chosen on its selection "
                     f"figures; {why}")
    r = best.report
    if r:
        lines.append(f"report (report part, read once for this trial): new-task score "
                     f"{_with_interval(r.get('new_task_score'), r.get('new_task_score_interval'))} "
                     f"({_num(r.get('new_task_score_before'))} before, gain "
                     f"{_with_interval(r.get('gain'), r.get('gain_interval'), signed=True)}), general retention "
                     f"{_with_interval(r.get('general_retention'), r.get('general_retention_interval'))}")
    else:
        lines.append("report: not measured yet (read once, when the search and its confirmations are done)")
    return lines + [f"WARNING: {w}" for w in shortfalls(best, kept, floor)]


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _params(record: TrialRecord) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in record.params.items()) or "defaults"


HEADERS = ["trial", "hybrid", "strengths", "seed", "state", "new task", "retention", "seconds"]
NUMERIC = ("trial", "seed", "new task", "retention", "seconds")


def row_cells(r: TrialRecord) -> list[str]:
    return [str(r.number), r.label, _params(r), "—" if r.seed is None else str(r.seed),
            r.state + (f" ({r.note})" if r.note else ""),
            _num(r.new_task_score), _num(r.general_retention), _num(r.seconds, 0)]


def _rich_table(title: str, rows: list[TrialRecord], best: TrialRecord | None) -> Table:
    table = Table(title=title)
    for h in HEADERS:
        table.add_column(h, justify="right" if h in NUMERIC else "left")
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
    tables = [_rich_table(f"selection: Pareto front at {steps} steps (select part): new-task score vs general retention",
                          front(records), best)]
    if confirmed:
        tables.append(_rich_table(f"confirmation at the full budget ({confirmed[0].steps} steps, fresh seeds, select part)",
                                  confirmed, best))
    return tables


def pick(records: list[TrialRecord], confirmed: list[TrialRecord], floor: float | None) -> tuple[TrialRecord | None, bool]:
    """The best of the confirmation runs when there are any, else of the trials (select figures both)."""
    return choose_best(confirmed if confirmed else records, floor)


def write_trials_json(
    path: Path, settings: dict[str, Any], records: list[TrialRecord], floor: float | None,
    confirmed: list[TrialRecord] | None = None,
) -> None:
    """``selection`` (the search trials, select part), ``confirmation`` (the full-budget reruns on fresh
    seeds, select part) and ``report`` (the winner on the report part, once) as separate keys."""
    confirmed = confirmed or []
    best, kept = pick(records, confirmed, floor)
    data = {
        "tune": settings,
        "best": None if best is None else {
            "trial": best.confirms if best.confirms is not None else best.number,
            "steps": best.steps, "seed": best.seed, "confirmed": best.confirms is not None, "chosen_on": "select",
            "keeps_floor": kept, "floor": DEFAULT_FLOOR if floor is None else floor,
            "beats_base_model": beats_base(best.report), "warnings": shortfalls(best, kept, floor)},
        "front": [r.number for r in front(records)],
        "selection": [asdict(r) for r in records],
        "confirmation": [asdict(r) for r in confirmed],
        "report": None if best is None or best.report is None else {
            "trial": best.confirms if best.confirms is not None else best.number, "stage": best.stage,
            "seed": best.seed, "steps": best.steps, "part": "report", **best.report},
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
        cells = "".join(f'<td class="num">{escape(c)}</td>' if HEADERS[i] in NUMERIC else f"<td>{escape(c)}</td>"
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
        verdict = "<p>no trial finished yet</p>"
    else:
        lines = figure_lines(best, records, kept, floor)
        verdict = (f"<p>best: trial #{best.number} {escape(best.label)} ({escape(_params(best))})"
                   + ("" if kept else f" — no trial kept the floor {escape(floor_text)}; this one kept the most")
                   + "</p><ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>")
    meta = (f"target <b>{escape(str(settings.get('target')))}</b> · {len(records)} trials · "
            f"{escape(str(settings.get('steps') or 'default'))} steps per task · retention floor {escape(floor_text)}"
            + (" · ladder" if settings.get("ladder") else ""))
    body = (f"<h1>retain tune</h1><p class=\"meta\">{meta}</p>{verdict}"
            f"<h2>Pareto front (selection, select part)</h2><div class=\"fig\">{plot}</div>"
            f"{_html_table(front(records), best)}"
            + (f"<h2>Confirmed at the full budget (fresh seeds, select part)</h2>{_html_table(confirmed, best)}"
               if confirmed else "")
            + f"<h2>All trials</h2>{_html_table(records, best)}"
            "<p class=\"meta\">retention = mean bounded general score after / before; new task = the last task's "
            "primary score; trials and confirmations on the select part of every eval, the best once on the report "
            "part. Pruned trials stopped early: their scores are not final and they are not plotted.</p>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>retain tune</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_tune_report(
    path: Path, settings: dict[str, Any], records: list[TrialRecord], floor: float | None,
    confirmed: list[TrialRecord] | None = None,
) -> None:
    atomic_write_text(path, render_tune_html(settings, records, floor, confirmed))
