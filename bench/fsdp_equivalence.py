"""Sharded training equals one process: FSDP2 on 2 CPU processes (gloo) at batch 2 per process against one
unsharded process at batch 4, for each hybrid of issue 22. Prints max |weight difference| of the final
model folders (goal <= 1e-5, as for DDP) and whether the logged losses agree.

    python bench/fsdp_equivalence.py [--steps 4] [--hidden 64] [--layers 2] [--ddp]

Tiny random Llama (retain.models.tiny), two prompt/completion tasks of uneven completion lengths, general
text; grad_accum 2, so FSDP2's held gradients (set_requires_gradient_sync) are exercised. A hybrid
retain refuses under ``train.parallel: fsdp`` is listed with the reason. importance's default layer
balance (``penalty_share``) weighs each layer by the micro-batch's own task loss, which differs between
a batch of 4 and two of 2 (under DDP alike); its ``uniform`` row is the batch-invariant comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retain.models.tiny import write_arithmetic_run  # noqa: E402 (after the path is set)

EWC = {"name": "ewc", "lambda_": 1.0e3, "max_examples": 6}
HYBRIDS: dict[str, tuple[list[Any], int]] = {
    "full": (["full"], 1),
    "full+ewc": (["full", EWC], 2),
    "full+ewc (online)": (["full", {**EWC, "mode": "online"}], 2),
    "full+importance": (["full", {"name": "importance", "max_examples": 6}], 2),
    "full+importance (uniform)": (["full", {"name": "importance", "max_examples": 6, "layer_balance": "uniform"}], 2),
    "full+importance (training)": (["full", {"name": "importance", "source": "training", "layer_balance": "uniform"}], 2),
    "full+l2": (["full", {"name": "l2", "lambda_": 10.0}], 1),
    "full+lwf (copy teacher)": (["full", {"name": "lwf", "alpha": 2.0, "teacher": "copy"}], 1),
    "full+fip": (["full", {"name": "fip", "pool_size": 6, "pool_batch": 2}], 1),
    "full+fip (path, bounded)": (["full", {"name": "fip", "pool_size": 6, "pool_batch": 2, "anchor": "path",
                                           "reanchor_every": 2, "max_step_norm": 0.05}], 1),
    "full+fip (path)": (["full", {"name": "fip", "pool_size": 6, "pool_batch": 2, "anchor": "path", "reanchor_every": 2}], 1),
    "full+fip (bounded)": (["full", {"name": "fip", "pool_size": 6, "pool_batch": 2, "max_step_norm": 0.05}], 1),
    "freeze (top layer) + ewc": ([{"name": "freeze", "top_layers": 1}, EWC], 2),
    "full+replay": (["full", {"name": "replay", "ratio": 0.25, "source": "general"}], 1),
    "full+stm": (["full", {"name": "stm", "threshold": 105.0}], 1),
}


def write_inputs(root: Path, hidden: int, layers: int) -> None:
    write_arithmetic_run(root, hidden=hidden, layers=layers)  # the same case as tests/test_multiprocess.py


def config(root: Path, name: str, out: Path, batch_size: int, parallel: str, steps: int) -> Any:
    from retain.config import load_config_dict

    strategies, tasks = HYBRIDS[name]
    return load_config_dict({
        "model": {"name_or_path": str(root / "model")},
        "tasks": [{"name": n, "data": {"path": str(root / f"{n}.jsonl"), "max_length": 32}} for n in ["add", "mul"][:tasks]],
        "strategies": strategies,
        "general_data": {"path": str(root / "general.jsonl"), "max_length": 64, "pack": False},
        "train": {"steps_per_task": steps, "batch_size": batch_size, "grad_accum": 2, "lr": 3e-3, "progress": False,
                  "log_every": 1, "parallel": parallel},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out), "save_per_task": False},
    })


def train_all(root: Path, layout: str, batch_size: int, parallel: str, steps: int) -> None:
    """Every hybrid in turn; a refusal is written next to the run instead of its model."""
    from retain.errors import ConfigError
    from retain.train import finetune

    rank = int(os.environ.get("RANK", "0"))
    for name in HYBRIDS:
        out = root / layout / name.replace(" ", "_")
        try:
            finetune(config(root, name, out, batch_size, parallel, steps), overwrite=True)
        except ConfigError as err:
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                (out / "refused.txt").write_text(str(err).replace("\n", " "))


def weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(next((run / "final").glob("*.safetensors")))).items()}


def losses(run: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (run / "train_log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ddp", action="store_true", help="also 2 DDP processes, for the DDP gap beside FSDP2's")
    parser.add_argument("--only", default="", help="comma-separated hybrids of the table (default: all)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        for name in set(HYBRIDS) - set(args.only.split(",")):
            del HYBRIDS[name]
    if args.worker:  # one of the two FSDP2 processes
        import torch

        torch.set_num_threads(1)
        train_all(Path(args.worker), "two", 2, "fsdp", args.steps)
        if args.ddp:
            train_all(Path(args.worker), "two-ddp", 2, "ddp", args.steps)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="fsdp-eq-") as tmp:
        root = Path(tmp)
        write_inputs(root, args.hidden, args.layers)
        two = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
             "--worker", str(root), "--steps", str(args.steps), *(["--ddp"] if args.ddp else []),
             *(["--only", args.only] if args.only else [])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        import torch

        torch.set_num_threads(1)
        train_all(root, "one", 4, "ddp", args.steps)
        output, _ = two.communicate()
        if two.returncode != 0:
            print(output[-4000:])
            raise SystemExit(f"the two FSDP2 processes failed (exit {two.returncode})")
        print(f"FSDP2, 2 CPU processes x batch 2 vs 1 process x batch 4 (grad_accum 2, {args.steps} steps per task, "
              f"tiny Llama hidden {args.hidden}, {args.layers} layers)")
        print(f"{'hybrid':28s} {'max |weight diff|':>18s} {'max |loss diff|':>16s} {'DDP weight diff':>16s}  note")
        for name in HYBRIDS:
            one, two_run = root / "one" / name.replace(" ", "_"), root / "two" / name.replace(" ", "_")
            if (two_run / "refused.txt").is_file():
                print(f"{name:28s} {'refused':>18s} {'':>16s} {'':>16s}  {(two_run / 'refused.txt').read_text()[:150]}")
                continue
            a, b = weights(one), weights(two_run)
            gap = max((a[k] - b[k]).abs().max().item() for k in a)
            loss_gap = max(abs(x - y) for x, y in zip(losses(one), losses(two_run)))
            verdict = "ok" if gap <= 1e-5 else "ABOVE 1e-5"
            ddp = root / "two-ddp" / name.replace(" ", "_")
            ddp_gap = "" if not (ddp / "final").is_dir() else f"{max((a[k] - c[k]).abs().max().item() for c in [weights(ddp)] for k in a):.2e}"
            if gap > 1e-5 and ddp_gap and float(ddp_gap) >= gap:
                verdict += " (DDP's gap is as large: summation order, amplified by Adam)"
            print(f"{name:28s} {gap:18.2e} {loss_gap:16.2e} {ddp_gap:>16s}  {verdict}")


if __name__ == "__main__":
    main()
