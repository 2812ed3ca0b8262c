"""Strength sweep of every regularizer on ``retain bench stories-contracts`` at the default budget.

Each grid item (``full+ewc@ewc.lambda_=1000``) is one ``retain bench`` run at the scenario's default
budget (300 steps, default batch and eval; no ``--steps``/``--quick``), in its own process, written to
``OUT/items/<item>/results.json``. An item whose results exist is skipped, so an interrupted sweep
resumes where it stopped. The table compares each regularized run with its plain counterpart
(``full`` or ``lora``, same seed and data order):

- ``new`` the new-task score (contracts next-token accuracy) after training; ``gain`` its change from
  the base; ``gain %`` the share of the counterpart's gain kept;
- ``retention`` general score after / before (TinyStories next-token accuracy); ``forget`` 1 - retention,
  and ``forget %`` the share of the counterpart's forgetting left;
- ``KL`` mean token KL(base || model) on the probe prompts.

The **knee** of a strategy is its strongest setting that keeps at least ``--min-gain`` (60%) of the
counterpart's gain while forgetting clearly less (at most ``--max-forget`` = 90% of the counterpart's
forgetting); the table marks it with ``*``. Quality numbers are deterministic (same seed, CPU).

    nohup python bench/strength_sweep.py --out /work/runs/sweep11 > /work/runs/sweep11/log.txt 2>&1 &
    python bench/strength_sweep.py --out /work/runs/sweep11 --table-only
    python bench/strength_sweep.py --out DIR --only ewc,l2          # a subset of the grid

Runs with ``OMP_NUM_THREADS=1`` (a shared machine). ``--src`` runs the items from another copy of the
package (e.g. a frozen export of the commit being measured) so editing the tree mid-sweep changes
nothing; the commit each item ran is stored beside its results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Grid:
    """One strategy's sweep: the item template (``{v}`` is the value), its counterpart and values."""

    strategy: str
    counterpart: str
    template: str
    values: tuple[float, ...]
    protects_more_when_higher: bool = True

    def items(self) -> list[tuple[float, str]]:
        return [(v, self.template.format(v=f"{v:g}")) for v in self.values]


GRIDS: dict[str, Grid] = {
    "l2": Grid("l2", "full", "full+l2@l2.lambda_={v}", (0.1, 0.3, 1.0, 10.0, 100.0)),
    "ewc": Grid("ewc", "full", "full+ewc@ewc.lambda_={v}", (1.0, 10.0, 30.0, 100.0, 1000.0)),
    "ewc-lora": Grid("ewc-lora", "lora", "lora+ewc-lora@ewc-lora.lambda_={v}", (1.0, 3.0, 10.0, 100.0, 1000.0, 10000.0, 80000.0)),
    "importance": Grid("importance", "full", "full+importance@importance.lambda_={v}", (1.0, 10.0, 100.0, 1000.0)),
    "lwf": Grid("lwf", "full", "full+lwf@lwf.alpha={v}", (0.3, 1.0, 3.0, 10.0)),
    "fip": Grid("fip", "full", "full+fip@fip.weight={v}", (0.1, 1.0, 10.0)),
    "replay": Grid("replay", "full", "full+replay@replay.ratio={v}", (0.01, 0.05, 0.25)),
    "stm": Grid("stm", "full", "full+stm@stm.threshold={v}", (2.5, 10.0, 50.0), protects_more_when_higher=False),
}
BASELINES = ("full", "lora")


def item_dir(out: Path, item: str) -> Path:
    from retain.scenarios.bench import run_directory_name

    return out / "items" / run_directory_name(item)


def commit_of(src: Path) -> str:
    marker = src / "SWEEP_COMMIT"
    if marker.is_file():
        return marker.read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_item(item: str, out: Path, src: Path, data_dir: Path | None) -> float:
    """One bench run in a fresh process (its own memory, the ``src`` package); returns seconds."""
    target = item_dir(out, item)
    target.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    code = (
        "import sys; from pathlib import Path; from retain.scenarios.bench import run_bench; "
        "run_bench('stories-contracts', [sys.argv[1]], out=Path(sys.argv[2]), progress=False, "
        "data_dir=Path(sys.argv[3]) if sys.argv[3] else None)"
    )
    start = time.perf_counter()
    with open(target / "log.txt", "w") as log:
        subprocess.run(
            [sys.executable, "-c", code, item, str(target), str(data_dir or "")],
            env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=str(target),
        )
    seconds = time.perf_counter() - start
    (target / "meta.json").write_text(json.dumps({"item": item, "commit": commit_of(src), "seconds": seconds}))
    return seconds


def summary_of(out: Path, item: str) -> dict | None:
    path = item_dir(out, item) / "results.json"
    if not path.is_file():
        return None
    run = json.loads(path.read_text())["runs"][0]
    s = run["summary"]
    return {
        "new": s["new_task_score"],
        "gain": s["new_task_score"] - s["new_task_score_before"],
        "retention": s["general_retention"],
        "kl": s["kl_from_base"],
    }


def knee(rows: list[tuple[float, dict]], plain: dict, min_gain: float, max_forget: float, higher: bool) -> float | None:
    """The strongest value keeping >= ``min_gain`` of the plain gain with <= ``max_forget`` of its forgetting."""
    plain_forget = 1.0 - plain["retention"]
    ok = [
        v for v, r in rows
        if r["gain"] >= min_gain * plain["gain"] and (1.0 - r["retention"]) <= max_forget * plain_forget
    ]
    if not ok:
        return None
    return max(ok) if higher else min(ok)


def table(out: Path, grids: list[Grid], min_gain: float, max_forget: float) -> str:
    plains = {name: summary_of(out, name) for name in BASELINES}
    lines = [
        "| item | new | gain | gain % of plain | retention | forget % of plain | KL |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in BASELINES:
        p = plains[name]
        if p:
            lines.append(f"| {name} | {p['new']:.3f} | {p['gain']:+.3f} | 100% | {p['retention']:.3f} | 100% | {p['kl']:.3f} |")
    knees = {}
    for grid in grids:
        plain = plains[grid.counterpart]
        rows = [(v, r) for v, item in grid.items() if (r := summary_of(out, item)) is not None]
        if not rows or plain is None:
            continue
        chosen = knee(rows, plain, min_gain, max_forget, grid.protects_more_when_higher)
        knees[grid.strategy] = chosen
        plain_forget = 1.0 - plain["retention"]
        for (v, r), (_, item) in zip(rows, [(v, i) for v, i in grid.items() if summary_of(out, i) is not None]):
            share = r["gain"] / plain["gain"] if plain["gain"] else float("nan")
            forget = (1.0 - r["retention"]) / plain_forget if plain_forget > 0 else float("nan")
            mark = " *" if v == chosen else ""
            lines.append(
                f"| {item}{mark} | {r['new']:.3f} | {r['gain']:+.3f} | {share:.0%} | {r['retention']:.3f} | "
                f"{forget:.0%} | {r['kl']:.3f} |"
            )
    lines.append("")
    lines.append(
        f"knee (* above): strongest setting keeping >= {min_gain:.0%} of the plain counterpart's gain with "
        f"<= {max_forget:.0%} of its forgetting:"
    )
    for grid in grids:
        if grid.strategy in knees:
            value = knees[grid.strategy]
            lines.append(f"- {grid.strategy}: " + ("none in the grid" if value is None else f"{value:g}"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/runs/sweep11"))
    parser.add_argument("--src", type=Path, default=ROOT, help="Package root the items run from (default: this tree).")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--only", default="", help="Comma-separated strategies of the grid (default: all).")
    parser.add_argument("--table-only", action="store_true", help="Print the table of the results so far; run nothing.")
    parser.add_argument("--min-gain", type=float, default=0.6)
    parser.add_argument("--max-forget", type=float, default=0.9)
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    names = [n for n in args.only.split(",") if n] or list(GRIDS)
    unknown = sorted(set(names) - set(GRIDS))
    if unknown:
        parser.error(f"unknown strategies {unknown}; the grid has {', '.join(GRIDS)}")
    grids = [GRIDS[n] for n in names]
    if not args.table_only:
        queue = [b for b in BASELINES if any(g.counterpart == b for g in grids)]
        queue += [item for g in grids for _, item in g.items()]
        for item in queue:
            if summary_of(args.out, item) is not None:
                print(f"skip {item} (results exist)", flush=True)
                continue
            print(f"run  {item} ...", flush=True)
            seconds = run_item(item, args.out, args.src, args.data_dir)
            print(f"done {item} in {seconds:.0f}s", flush=True)
    text = table(args.out, grids, args.min_gain, args.max_forget)
    print(text)
    if not args.table_only:
        (args.out / "table.md").write_text(text)


if __name__ == "__main__":
    main()
