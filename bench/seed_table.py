"""One over-seeds table from several ``retain bench --seeds`` folders (benches run side by side, one thread
each, on the same scenario): means with intervals over seeds and report items, the spread between seeds,
and each item's paired difference to the reference item (``tie`` unless its interval excludes 0).

    python bench/seed_table.py runs/seeds_a runs/seeds_b --reference full [--out combined.json]

Runs of the same item and seed found in several folders must agree (training is deterministic); the
first is kept. Also prints, per item, the select-part means (what a default or a ranking is chosen on).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retain.report.markdown import summary_table_markdown
from retain.results.aggregate import aggregate_seeds
from retain.results.schema import Results, StrategyRun
from retain.results.summary import fmt_num


def load_runs(folders: list[Path], reference: str) -> tuple[Results, list[StrategyRun]]:
    runs: dict[tuple[str, int | None], StrategyRun] = {}
    first = None
    for folder in folders:
        results = Results.load(folder / "results.json")
        first = first or results
        for run in results.runs:
            key = (run.name, run.seed)
            if key in runs and runs[key].summary.general_retention != run.summary.general_retention:
                raise SystemExit(f"{folder}: {run.name} seed {run.seed} differs from an earlier folder's run")
            runs.setdefault(key, run)
    ordered = sorted(runs.values(), key=lambda r: (r.name != reference, r.name, r.seed if r.seed is not None else -1))
    assert first is not None
    return first, ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--reference", default="full")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    first, runs = load_runs(args.folders, args.reference)
    combined = Results(scenario=first.scenario, base_model=first.base_model, runs=runs, aggregates=aggregate_seeds(runs))
    if args.out is not None:
        combined.save(args.out)
    table = summary_table_markdown(combined)
    print(table[table.index("Over seeds"):] if "Over seeds" in table else table)
    print("\nselect part (what chooses), means over seeds:\n")
    print("| item | retention | new task | gain |\n|:---|---:|---:|---:|")
    for aggregate in combined.aggregates:
        s = aggregate.select
        print(f"| {aggregate.name} | {fmt_num(s.get('general_retention'))} | {fmt_num(s.get('new_task_score'))} | "
              f"{fmt_num(s.get('gain'))} |")
    widths = [a.general_retention.interval[1] - a.general_retention.interval[0]
              for a in combined.aggregates if a.general_retention is not None and a.general_retention.interval]
    if widths:
        print(f"\nretention interval width (high - low): {min(widths):.4f} to {max(widths):.4f}")
    per_seed = [r.summary.general_retention_interval for r in runs if r.summary.general_retention_interval]
    if per_seed:
        half = [(hi - lo) / 2 for lo, hi in per_seed]
        print(f"one seed's retention interval (report windows only): +-{min(half):.4f} to +-{max(half):.4f}")


if __name__ == "__main__":
    main()
