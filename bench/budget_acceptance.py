"""Acceptance of the forgetting budget on ``retain bench stories-contracts`` (issue 12).

Runs, each as its own ``retain bench`` process (the command is printed and stored next to its results):

* ``full`` without a budget: the new-task gain every budgeted run is compared with;
* ``full+ewc``, ``full+lwf``, ``full+replay`` and ``lora+ewc-lora`` from lambda = 1e7 (the authors' value,
  which learns nothing at a fixed strength) with ``--set budget.min_general_retention=R``;
* for each of those families, a 4-point grid of fixed strengths around the default, without a budget.

Then prints two tables: per budgeted run, the suite-measured general retention (needs >= R - tolerance)
and its share of unconstrained full fine-tuning's new-task gain (needs >= 40%); per family, the budgeted
run against the best grid point that stays within the same budget (retention >= R - tolerance) — new-task
score and total wall-clock seconds (every process of the grid against the one budgeted process, measured
in this same invocation, side by side on the same machine).

Resumable: an item whose folder holds ``done.json`` is not run again (delete it to rerun one item, or pass
``--rerun``). Run: ``python bench/budget_acceptance.py --out /path/outside/the/repo [--help]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retain.errors import RetainError  # noqa: E402
from retain.results.schema import Results, StrategyRun  # noqa: E402


@dataclass(frozen=True)
class Item:
    slug: str
    spec: str  # the bench strategy item
    family: str  # "" for the reference
    budgeted: bool
    value: float | None = None  # the fixed strength of a grid point


FAMILIES = {
    # family: (budgeted item, grid item template, grid values)
    "ewc": ("full+ewc", "full+ewc@ewc.lambda_={}", [3.0, 10.0, 30.0, 100.0]),
    "lwf": ("full+lwf", "full+lwf@lwf.alpha={}", [0.3, 1.0, 3.0, 10.0]),
    "replay": ("full+replay", "full+replay@replay.ratio={}", [0.1, 0.25, 0.5, 0.75]),
    "ewc-lora": ("lora+ewc-lora@ewc-lora.lambda_=1e7", "lora+ewc-lora@ewc-lora.lambda_={}", [3.0, 10.0, 30.0, 100.0]),
}


def items(families: list[str]) -> list[Item]:
    out = [Item("reference-full", "full", "", False)]
    for family in families:
        budgeted, template, values = FAMILIES[family]
        out.append(Item(f"budget-{family}", budgeted, family, True))
        out += [Item(f"grid-{family}-{value:g}", template.format(f"{value:g}"), family, False, value) for value in values]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="one folder per item goes here (keep it outside the repo)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RETAIN_DATA_DIR", ROOT.parent / "shared" / "data")))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--retention", type=float, default=0.95, help="budget.min_general_retention of the budgeted runs")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="suite-measured retention may fall this far below the floor (the checks use a subset)")
    parser.add_argument("--min-gain-share", type=float, default=0.4, help="budgeted gain / unconstrained full's gain")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--no-grid", action="store_true", help="only the reference and the budgeted runs")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every item (e.g. budget.check_every=10)")
    parser.add_argument("--rerun", action="store_true", help="run every item again, even finished ones")
    parser.add_argument("--table-only", action="store_true", help="print the tables from finished items; run nothing")
    return parser.parse_args(argv)


def command(item: Item, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "retain", "bench", "stories-contracts", "--strategies", item.spec, "--steps", str(args.steps),
           "--out", str(args.out / item.slug), "--data-dir", str(args.data_dir), "--overwrite"]
    sets = list(args.sets) + ([f"budget.min_general_retention={args.retention}"] if item.budgeted else [])
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_item(item: Item, args: argparse.Namespace) -> None:
    folder = args.out / item.slug
    if (folder / "done.json").is_file() and not args.rerun:
        print(f"skip {item.slug} (done)", flush=True)
        return
    cmd = command(item, args)
    print(f"run  {item.slug}: {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"     {item.slug} failed (exit {proc.returncode}); see {folder / 'bench.log'}", flush=True)
        return
    (folder / "done.json").write_text(json.dumps({"seconds": seconds, "command": shlex.join(cmd)}, indent=1))


@dataclass
class Outcome:
    item: Item
    run: StrategyRun
    seconds: float

    @property
    def retention(self) -> float | None:
        return self.run.summary.general_retention

    @property
    def score(self) -> float | None:
        return self.run.summary.new_task_score

    @property
    def gain(self) -> float | None:
        s = self.run.summary
        return None if s.new_task_score is None or s.new_task_score_before is None else s.new_task_score - s.new_task_score_before


def load(item: Item, args: argparse.Namespace) -> Outcome | None:
    folder = args.out / item.slug
    try:
        done = json.loads((folder / "done.json").read_text())
        run = Results.load(folder / "results.json").runs[0]
    except (OSError, ValueError, RetainError, IndexError):
        return None
    return Outcome(item, run, float(done["seconds"]))


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def tables(all_items: list[Item], args: argparse.Namespace) -> None:
    outcomes = {i.slug: load(i, args) for i in all_items}
    reference = outcomes.get("reference-full")
    full_gain = reference.gain if reference else None
    floor = args.retention - args.tolerance
    print(f"\nunconstrained full: new task {fmt(reference and reference.score)}, gain {fmt(full_gain)}, retention "
          f"{fmt(reference and reference.retention)}, {fmt(reference and reference.seconds, 0)} s" if reference else
          "\nunconstrained full: not run")
    print(f"\nbudgeted runs (budget.min_general_retention={args.retention}; pass: suite retention >= {floor:g} and gain >= "
          f"{args.min_gain_share:.0%} of full's)\n")
    print("| run | retention (suite) | new task | gain / full's | kept step (task end) | strength start → end | budget s | total s | pass |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---|")
    for family in [f for f in FAMILIES if f in {i.family for i in all_items}]:
        o = outcomes.get(f"budget-{family}")
        if o is None:
            print(f"| {FAMILIES[family][0]} | not run | | | | | | | |")
            continue
        budget = o.run.budget
        share = None if o.gain is None or not full_gain else o.gain / full_gain
        kept = "; ".join(f"{d.kept_step}/{d.end_step}{' rolled back' if d.rolled_back else ''}" for d in budget.tasks) if budget else "—"
        moved = "; ".join(f"{k}: {budget.start[k]:.3g} → {v:.3g}" for k, v in budget.final.items()) if budget else "—"
        ok = o.retention is not None and o.retention >= floor and share is not None and share >= args.min_gain_share
        print(f"| {o.item.spec} | {fmt(o.retention)} | {fmt(o.score)} | {fmt(share, 2)} | {kept} | {moved} | "
              f"{fmt(budget and budget.seconds, 1)} | {o.seconds:.0f} | {'yes' if ok else 'MISS'} |")
    if args.no_grid:
        return
    print(f"\nbudgeted vs the best fixed strength of a 4-point grid within the same budget (retention >= {floor:g})\n")
    print("| family | grid (value: retention / new task) | best in budget | budgeted: new task (retention) | grid s (all 4) | budgeted s | compute ratio | matches or beats |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for family in [f for f in FAMILIES if f in {i.family for i in all_items}]:
        grid = [outcomes.get(i.slug) for i in all_items if i.family == family and not i.budgeted]
        done = [g for g in grid if g is not None]
        cells = ", ".join(f"{g.item.value:g}: {fmt(g.retention)} / {fmt(g.score)}" for g in done) or "not run"
        inside = [g for g in done if g.retention is not None and g.retention >= floor and g.score is not None]
        best = max(inside, key=lambda g: g.score) if inside else None
        o = outcomes.get(f"budget-{family}")
        grid_seconds = sum(g.seconds for g in done)
        verdict = "—"
        if o is not None and o.score is not None:
            in_budget = o.retention is not None and o.retention >= floor
            verdict = "yes" if in_budget and (best is None or o.score >= best.score - 0.005) else "MISS"
        print(f"| {family} | {cells} | {f'{best.item.value:g} ({fmt(best.score)})' if best else 'none'} | "
              f"{fmt(o and o.score)} ({fmt(o and o.retention)}) | {grid_seconds:.0f}{'' if len(done) == len(grid) else ' (partial)'} | "
              f"{fmt(o and o.seconds, 0)} | {fmt(o.seconds / grid_seconds if o and grid_seconds else None, 2)} | {verdict} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    todo = [i for i in items(families) if not (args.no_grid and i.value is not None)]
    if not args.table_only:
        for item in todo:
            run_item(item, args)
    tables(todo, args)


if __name__ == "__main__":
    main()
