"""Generate ``retain/guide/evidence.json``, the table behind ``retain recommend``'s evidence lines.

The evidence is each catalogue hybrid's general retention and new-task gain on ``retain bench
stories-contracts`` at the default budget, with the date and retain version of the run. Regenerate it
whenever strategy defaults change:

    # train every catalogue hybrid that runs on one task (about 3-5 minutes each on 2 cores), then write the table
    python bench/make_evidence.py --run --data-dir ../shared/data --work runs/evidence

    # or build it from bench results you already have (later files win for the same item)
    python bench/make_evidence.py runs/bench/results.json [more/results.json ...]

With ``--run``, items already present in the given results files are not trained again. Only rows
of catalogue hybrids are kept (other bench items in a results file are ignored). A bench item that
trains exactly a catalogue hybrid under another name (lwf's ``auto`` settings, which resolve to the
catalogue's explicit ones on stories-contracts) counts as it with ``--same NAME=KEY``; several seeds of
an item are combined first with ``python bench/seed_table.py DIR... --out combined.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from retain.guide.catalogue import CATALOGUE, min_tasks
from retain.guide.evidence import evidence_from_results
from retain.guide.space import general_prompts
from retain.io import atomic_write_text
from retain.results.schema import Results

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "retain" / "guide" / "evidence.json"


def single_task_items() -> list[str]:
    """Catalogue hybrids the one-task benchmark can train (o-lora and progressive prompts need two)."""
    return [h.key for h in CATALOGUE if min_tasks(h) <= 1]


def shared_settings(data_dir: Path | None) -> dict:
    """What synthetic-replay writes from on stories-contracts: openings of the general pool's stories."""
    from retain.data.records import load_records
    from retain.scenarios.base import get_scenario

    scenario = get_scenario("stories-contracts", data_dir=data_dir)
    texts = [str(r.get("text", "")) for r in load_records(scenario.general_data)[:64]]
    return {"strategies": {"synthetic-replay": {"prompts": general_prompts(texts)}}}


def run_missing(done: set[str], data_dir: Path | None, work: Path, steps: int | None) -> Path | None:
    from retain.scenarios.bench import run_bench

    items = [k for k in single_task_items() if k not in done]
    if not items:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(shared_settings(data_dir), handle)
    print(f"training {len(items)} hybrids: {', '.join(items)}")
    run_bench("stories-contracts", items, out=work, steps=steps, config_file=Path(handle.name), data_dir=data_dir)
    return work / "results.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="results.json files of retain bench stories-contracts")
    parser.add_argument("--run", action="store_true", help="train the catalogue hybrids missing from RESULTS first")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/evidence"), help="bench output folder (--run)")
    parser.add_argument("--steps", type=int, default=None, help="steps per task (default: the scenario's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--same", action="append", default=[], metavar="NAME=KEY",
                        help="the bench item NAME trains exactly the catalogue hybrid KEY (repeatable)")
    args = parser.parse_args()
    same = dict(pair.split("=", 1) for pair in args.same)
    catalogue = {h.key for h in CATALOGUE}
    unknown = sorted(k for k in same.values() if k not in catalogue)
    if unknown:
        parser.error(f"--same names a key that is not in the catalogue: {', '.join(unknown)}")

    results = [Results.load(p) for p in args.results]
    if args.run:
        done = {same.get(run.name, run.name) for r in results for run in r.runs}
        made = run_missing(done, args.data_dir, args.work, args.steps)
        if made is not None:
            results.append(Results.load(made))
    keys = {h.key for h in CATALOGUE}
    evidence = evidence_from_results(results, keys=same)
    kept = {k: v for k, v in evidence.rows.items() if k in keys}
    evidence = type(evidence)(evidence.scenario, evidence.steps, evidence.created, evidence.retain_version, kept)
    atomic_write_text(args.out, evidence.to_json())
    print(f"{len(kept)} hybrids -> {args.out} ({evidence.provenance()})")
    for key, row in sorted(kept.items(), key=lambda kv: -(kv[1].general_retention or 0)):  # ranked on select
        print(f"  {key:<70} {row.describe()}")


if __name__ == "__main__":
    main()
