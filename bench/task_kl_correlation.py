"""How well KL(base || model) on the task's own inputs (RL's Razor, Shenfeld et al. 2025) predicts general
retention, across finished bench runs: their exported ``final/`` models are scored post hoc.

    python bench/task_kl_correlation.py RUNS_DIR [RUNS_DIR ...] --data-dir ../shared/data

Each RUNS_DIR is a ``retain bench --out`` folder. A run's task KL is the one its results.json recorded
(``drift.task_kl``, measured on the task's own training inputs after the task); a run from before that
field existed is scored from its exported ``runs/<item>[/seed-<s>]/final`` model. Prints one row per run
(task KL, probe KL, report-part retention) and the Spearman rank correlation of task KL with retention
(negative: more drift on the task's inputs, less retention), with a bootstrap interval over runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from retain.data import build_task_data, ensure_pad_token
from retain.eval.drift import kl_from_reference, task_input_reference
from retain.models.loading import load_any
from retain.results.schema import Results
from retain.scenarios.base import get_scenario


def ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort()
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    for v in np.unique(values):  # ties share their mean rank
        out[values == v] = out[values == v].mean()
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def base_reference(data_dir: Path | None) -> object:
    """The base model's outputs on the first 64 training inputs of the scenario's task (for old runs)."""
    scenario = get_scenario("stories-contracts", data_dir=data_dir)
    base, tokenizer = load_any(scenario.base_model)
    examples = build_task_data(scenario.tasks[0].data, ensure_pad_token(tokenizer), seed=0).train
    return task_input_reference(base, examples, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = None
    rows = []
    for out in args.outs:
        for results_file in sorted(out.glob("runs/**/results.json")):
            run = Results.load(results_file).runs[0]
            final = results_file.parent / "final"
            if run.summary.general_retention is None:
                continue
            task_kl = run.summary.task_kl
            if task_kl is None:
                if not any(final.glob("*.safetensors")):
                    continue
                if reference is None:
                    reference = base_reference(args.data_dir)
                model, _ = load_any(str(final))
                task_kl = kl_from_reference(reference, model)
            rows.append((run.name, run.seed, task_kl, run.summary.kl_from_base, run.summary.general_retention))
            print(f"{run.name:28s} seed {run.seed}  task KL {task_kl:.4f}  probe KL {run.summary.kl_from_base:.4f}  "
                  f"retention {run.summary.general_retention:.4f}", flush=True)
    task = np.array([r[2] for r in rows])
    probe = np.array([r[3] for r in rows])
    retention = np.array([r[4] for r in rows])
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(rows), len(rows)) for _ in range(2000)]
    for label, x in (("task KL", task), ("probe KL", probe)):
        boot = [spearman(x[d], retention[d]) for d in draws if len(set(d)) > 2]
        low, high = np.nanpercentile(boot, [2.5, 97.5])
        print(f"Spearman({label}, retention) over {len(rows)} runs: {spearman(x, retention):+.3f} "
              f"[{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
