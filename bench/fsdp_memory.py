"""Memory per process of sharded training (FSDP2, ``train.parallel: fsdp``) against one process, on the CPU.

    python bench/fsdp_memory.py [--hidden 768] [--layers 7] [--steps 3]

A random Llama of about 50M parameters (retain.models.tiny's config at --hidden/--layers), full and
full+ewc, trained by 1 process at batch 4 and by 2 FSDP2 processes at batch 2 (the same global batch),
each in a fresh process. Per process it prints:

- ``libs``: resident memory (RSS) after importing torch/transformers/retain, before the model exists;
- ``at start``: RSS when the tasks start (model loaded, sharded, strategies set up);
- ``train peak``: the largest RSS sampled (every 5 ms) while the tasks train, after the model was loaded,
  sharded and the strategies set up: weights, gradients, optimizer and strategy state, activations;
- ``state``: ``train peak - libs``, what the run adds to the process;
- ``counted``: bytes of this process's weights, gradients, AdamW moments and EWC anchor + Fisher counted
  from the tensors it holds (its rows when sharded), the part that should halve;

then the ratio 2-process / 1-process of ``state`` and of ``counted``. Loading happens before sharding, so
every process reads the whole checkpoint once (not in ``train peak``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HYBRIDS = {"full": ["full"], "full+ewc": ["full", {"name": "ewc", "lambda_": 10.0, "max_examples": 4, "batch_size": 2}]}


def rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """The largest RSS seen while running (a thread reading /proc every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __enter__(self) -> "Sampler":
        self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def write_inputs(root: Path, hidden: int, layers: int) -> int:
    from retain.models.tiny import char_tokenizer, tiny_model

    tokenizer = char_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=hidden, layers=layers, heads=12)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"text": f"line {i}: the quick brown fox jumps over {i} lazy dogs and runs home." * 2} for i in range(64)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "general.jsonl").write_text("".join(json.dumps({"text": f"the cat sat on mat {i}. " * 4}) + "\n" for i in range(32)))
    return sum(p.numel() for p in model.parameters())


def worker(root: Path, name: str, batch_size: int, parallel: str, steps: int, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from retain.config import load_config_dict
    from retain.models.sharding import local, sharded_parameters
    from retain.train import finetune
    from retain.train import run as run_module

    libs = rss()
    sampler = Sampler()
    starts: list[int] = []
    original = run_module.FineTune.train_tasks

    def sampled(self: Any, start: Any) -> Any:
        starts.append(rss())
        with sampler:
            return original(self, start)

    run_module.FineTune.train_tasks = sampled  # type: ignore[method-assign]
    config = load_config_dict({
        "model": {"name_or_path": str(root / "model")},
        "tasks": [{"name": "t", "data": {"path": str(root / "task.jsonl"), "max_length": 64}}],
        "strategies": HYBRIDS[name],
        "general_data": {"path": str(root / "general.jsonl"), "max_length": 64},
        "train": {"steps_per_task": steps, "batch_size": batch_size, "lr": 1e-4, "progress": False, "parallel": parallel},
        "checkpoint": {"every": 0},
        "output": {"dir": str(root / "runs" / f"{name}-{parallel}"), "save_per_task": False},
    })
    outcome = finetune(config, overwrite=True)
    rows = sum(local(p).numel() * local(p).element_size() for p in sharded_parameters(outcome.model).values())
    copies = 4 + (2 if name == "full+ewc" else 0)  # weights, gradients, 2 AdamW moments (+ anchor, Fisher)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"{name}-{parallel}-rank{rank}.json").write_text(json.dumps(
        {"libs": libs, "start": starts[0], "peak": sampler.peak, "counted": rows * copies}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        root, name, batch, parallel = args.worker
        worker(Path(root), name, int(batch), parallel, args.steps, Path(root))
        return
    # glibc: return freed large blocks to the system at once, so RSS follows what is allocated (without it
    # the whole model each process loads before sharding stays counted as resident)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0"}
    with tempfile.TemporaryDirectory(prefix="fsdp-mem-") as tmp:
        root = Path(tmp)
        params = write_inputs(root, args.hidden, args.layers)
        print(f"random Llama, {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), fp32, CPU; "
              f"{args.steps} steps at a global batch of 4 x 64 tokens")
        for name in HYBRIDS:
            one = [sys.executable, __file__, "--steps", str(args.steps), "--worker", str(root), name, "4", "ddp"]
            two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   "--steps", str(args.steps), "--worker", str(root), name, "2", "fsdp"]
            for command in (one, two):
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout[-2000:], done.stderr[-4000:])
                    raise SystemExit(f"{name}: a run failed")
        mib = 1024 * 1024
        print(f"{'run':28s} {'libs':>8s} {'at start':>9s} {'train peak':>11s} {'state':>8s} {'counted':>8s}   (MiB per process)")
        for name in HYBRIDS:
            one = json.loads((root / f"{name}-ddp-rank0.json").read_text())
            twos = [json.loads((root / f"{name}-fsdp-rank{r}.json").read_text()) for r in range(2)]
            for label, row in [(f"{name}, 1 process", one)] + [(f"{name}, FSDP2 rank {r} of 2", t) for r, t in enumerate(twos)]:
                print(f"{label:28s} {row['libs'] / mib:8.0f} {row['start'] / mib:9.0f} {row['peak'] / mib:11.0f} "
                      f"{(row['peak'] - row['libs']) / mib:8.0f} "
                      f"{row['counted'] / mib:8.0f}")
            state = max(t["peak"] - t["libs"] for t in twos) / (one["peak"] - one["libs"])
            counted = max(t["counted"] for t in twos) / one["counted"]
            print(f"{name}: 2 FSDP2 processes / 1 process, per process: state {state:.2f}, counted {counted:.2f}, "
                  f"train peak {max(t['peak'] for t in twos) / one['peak']:.2f}")


if __name__ == "__main__":
    main()
