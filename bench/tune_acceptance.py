"""Acceptance of ``retain tune``: does a short search beat the hand-chosen defaults at the full budget?

1. ``retain tune stories-contracts --trials 6 --steps 40 --min-general-retention 0.9 --out WORK/tune``
   must finish and write trials.json, best.yaml and report.html;
2. ``best.yaml`` is trained at the scenario's full default budget (``retain train best.yaml --set
   train.steps_per_task=N``: the same base, data, seed and settings as a bench item). The tune itself
   already trained it at that budget when it confirmed its pick (trials shorter than the budget are
   confirmed at it); that run is used unless ``--retrain`` asks for a fresh one;
3. the defaults (full, lora, lora+lwf, full+ewc, full+replay) are trained at that budget with ``retain
   bench`` (or read from ``--defaults RESULTS.json``);
4. the table: new-task score and general retention of each, and by how much the tuned hybrid wins or
   misses against the best default that keeps general retention >= the floor.

Every step runs the ``retain`` command line in a subprocess, as a user would; quality numbers are
deterministic for a given machine and retain version, times are not (the machine is shared).

    python bench/tune_acceptance.py --data-dir ../shared/data --work runs/tune-acceptance
    python bench/tune_acceptance.py ... --defaults runs/bench/results.json   # reuse a defaults run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULTS = "full,lora,lora+lwf,full+ewc,full+replay"
REPO = Path(__file__).resolve().parents[1]


def retain(*args: str) -> float:
    """Run ``python -m retain ARGS`` with this checkout first on the path; seconds it took."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    print("$ retain " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retain", *args], check=True, env=env)
    return time.perf_counter() - start


def summaries(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    return {run["name"]: run["summary"] for run in data["runs"]}


def verdict(tuned: dict, defaults: dict[str, dict], floor: float) -> tuple[str, float | None]:
    """A sentence and the margin (tuned new-task score minus the best default's, both within the floor)."""
    keeping = {n: s for n, s in defaults.items() if (s["general_retention"] or 0) >= floor}
    tuned_keeps = (tuned["general_retention"] or 0) >= floor
    if not keeping:
        return ("no default keeps general retention >= {:g}; the tuned hybrid {}".format(
            floor, "does" if tuned_keeps else "does not either"), None)
    name, best = max(keeping.items(), key=lambda kv: kv[1]["new_task_score"])
    margin = tuned["new_task_score"] - best["new_task_score"]
    if not tuned_keeps:
        return (f"the tuned hybrid misses the floor (retention {tuned['general_retention']:.3f} < {floor:g}) at the "
                f"full budget; best default within it: {name} ({best['new_task_score']:.3f})", margin)
    word = "beats" if margin > 0 else "does not beat"
    return (f"the tuned hybrid {word} the best default within the floor, {name} ({best['new_task_score']:.3f}), "
            f"by {margin:+.3f} new-task score", margin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/tune-acceptance"))
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40, help="steps per trial")
    parser.add_argument("--floor", type=float, default=0.9, help="--min-general-retention")
    parser.add_argument("--budget", type=int, default=300, help="the full default budget (stories-contracts: 300)")
    parser.add_argument("--defaults", type=Path, default=None, help="results.json of the defaults at --budget")
    parser.add_argument("--retrain", action="store_true", help="train best.yaml again even if the tune confirmed it")
    args = parser.parse_args()
    data = ["--data-dir", str(args.data_dir)] if args.data_dir else []
    work = args.work
    seconds: dict[str, float] = {}

    tune = work / "tune"
    seconds["tune"] = retain("tune", "stories-contracts", *data, "--trials", str(args.trials), "--steps", str(args.steps),
                             "--min-general-retention", str(args.floor), "--out", str(tune))
    missing = [f for f in ("trials.json", "best.yaml", "report.html") if not (tune / f).is_file()]
    if missing:
        raise SystemExit(f"tune did not write {', '.join(missing)}")
    best_trial = json.loads((tune / "trials.json").read_text())["best"]

    full = work / "best-full"
    confirmed = tune / "confirm" / f"{best_trial['trial']:04d}" / "results.json"
    if best_trial.get("confirmed") and best_trial.get("steps") == args.budget and not args.retrain:
        print(f"best.yaml was trained at {args.budget} steps when the tune confirmed it: {confirmed}")
        full_results = confirmed
    else:
        full_results = full / "results.json"
        if not full_results.is_file():
            seconds["best.yaml at the full budget"] = retain(
                "train", str(tune / "best.yaml"), "--set", f"train.steps_per_task={args.budget}",
                "--set", f"output.dir={full}")
        if confirmed.is_file():
            again, before = summaries(full_results), summaries(confirmed)
            same = [round(next(iter(x.values()))["new_task_score"], 6) for x in (again, before)]
            print(f"retrained best.yaml vs the tune's confirmation run: new-task score {same[0]} vs {same[1]}")
    tuned = summaries(full_results)
    tuned_summary = next(iter(tuned.values()))

    defaults_path = args.defaults or work / "defaults" / "results.json"
    if not defaults_path.is_file():
        seconds["defaults"] = retain("bench", "stories-contracts", *data, "--strategies", DEFAULTS,
                                     "--steps", str(args.budget), "--out", str(work / "defaults"))
    defaults = summaries(defaults_path)

    recorded = json.loads((tune / "trials.json").read_text())
    trials = recorded.get("selection", recorded.get("trials", []))  # "trials" before the select/report split
    tuned_trial = next(t for t in trials if t["number"] == best_trial["trial"])
    strengths = ", ".join(f"{k}={v:.3g}" for k, v in tuned_trial["params"].items()) or "defaults"
    rows = [(name, s) for name, s in defaults.items()] + [(f"tuned: {tuned_trial['label']} ({strengths})", tuned_summary)]
    width = max(len(r[0]) for r in rows)
    print(f"\nstories-contracts, {args.budget} steps; tune: {args.trials} trials x {args.steps} steps, floor {args.floor:g}")
    print(f"tune's pick: trial #{tuned_trial['number']} at {args.steps} steps: new task "
          f"{tuned_trial['new_task_score']:.3f}, retention {tuned_trial['general_retention']:.3f}")
    print(f"{'strategy':<{width}}  new task (before -> after)  retention  >= floor")
    for name, s in rows:
        keeps = "yes" if (s["general_retention"] or 0) >= args.floor else "no"
        print(f"{name:<{width}}  {s['new_task_score_before']:.3f} -> {s['new_task_score']:.3f}           "
              f"{s['general_retention']:.3f}      {keeps}")
    sentence, _ = verdict(tuned_summary, defaults, args.floor)
    print(sentence)
    for phase, sec in seconds.items():
        print(f"time: {phase}: {sec / 60:.1f} min")


if __name__ == "__main__":
    main()
