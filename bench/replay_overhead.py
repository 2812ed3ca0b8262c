"""Cost of the data and subspace strategies, measured side by side in one process.

1. Step time of ``full + replay`` over plain ``full`` (replace and append modes, several ratios): replay
   should cost at most ``1 + ratio`` times a step without it. Measured on the second task, where the
   buffer holds the first task's data and the general pool.
2. Step time of ``o-lora`` over ``lora`` at the same rank (O-LoRA adds the frozen stack and the
   orthogonality term).
3. Time to generate 200 synthetic examples with stories260K (sampling only), and the whole synthetic
   set pipeline (400 candidates -> near-duplicate removal -> k-means down to 200).

Runs alternate A/B/C... within each repeat (the machine is shared and noisy); ratios are of medians.

    python bench/replay_overhead.py [--steps 40] [--repeats 3] [--threads 1] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from retain.config import load_config_dict
from retain.models.tiny import char_tokenizer, tiny_model
from retain.train import finetune

TEXT_A = "the licensee shall not assign this agreement without prior written consent. "
TEXT_B = "once upon a time a little dog ran in the park and played with a red ball. "


def write_data(folder: Path) -> dict[str, Path]:
    paths = {"a": folder / "a.jsonl", "b": folder / "b.jsonl", "pool": folder / "pool.jsonl"}
    for key, text in (("a", TEXT_A), ("b", TEXT_B), ("pool", TEXT_B.upper())):
        paths[key].write_text("".join(json.dumps({"text": text * 3 + f" {i}"}) + "\n" for i in range(200)))
    return paths


def seconds_per_step(model, tokenizer, paths: dict[str, Path], out: Path, strategies: list, steps: int) -> float:
    """Mean seconds per optimizer step of the second task (replay has a full buffer there)."""
    config = load_config_dict(
        {
            "model": {"name_or_path": "in-memory-tiny-llama"},
            "tasks": [
                {"name": "a", "data": {"path": str(paths["a"]), "max_length": 128}},
                {"name": "b", "data": {"path": str(paths["b"]), "max_length": 128}},
            ],
            "strategies": strategies,
            "general_data": {"path": str(paths["pool"]), "max_length": 128},
            "train": {"steps_per_task": steps, "batch_size": 16, "lr": 1e-3, "progress": False},
            "checkpoint": {"every": 0},
            "output": {"dir": str(out), "save_per_task": False},
        }
    )
    outcome = finetune(config, model=copy.deepcopy(model), tokenizer=tokenizer)
    stats = outcome.task_stats[1]
    return stats.seconds / stats.steps


def bench_step_times(steps: int, repeats: int) -> None:
    tokenizer = char_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=128, layers=4, heads=4)
    variants = {
        "full": (["full"], None),
        "full+replay@0.05": (["full", {"name": "replay", "ratio": 0.05}], 0.05),
        "full+replay@0.25": (["full", {"name": "replay", "ratio": 0.25}], 0.25),
        "full+replay@0.25 append": (["full", {"name": "replay", "ratio": 0.25, "mode": "append"}], 0.25),
        "lora": ([{"name": "lora", "r": 8}], None),
        "o-lora": ([{"name": "o-lora", "r": 8}], None),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_data(Path(tmp))
        for repeat in range(repeats):
            for name, (strategies, _) in variants.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}-{repeat}"
                times[name].append(seconds_per_step(model, tokenizer, paths, out, strategies, steps))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nstep time, second task, {steps} steps x {repeats} alternating repeats, batch 16 x 128 tokens, "
          f"tiny llama 4x128, {torch.get_num_threads()} threads")
    print(f"{'variant':28} {'median s/step':>14} {'ratio':>8} {'rows x':>7} {'bound':>7}  ok")
    for name, (strategies, ratio) in variants.items():
        reference = "lora" if "lora" in name else "full"
        rel = median[name] / median[reference]
        append = ratio is not None and strategies[-1].get("mode") == "append"
        rows = 1 / (1 - ratio) if append else 1.0  # append keeps every task row and adds the replayed ones
        bound = 1 + ratio if ratio is not None and not append else None
        ok = "" if bound is None else ("yes" if rel <= bound else "NO")
        bound_text = f"{bound:.2f}" if bound is not None else "-"
        print(f"{name:28} {median[name]:14.4f} {rel:8.3f} {rows:7.3f} {bound_text:>7}  {ok}   (vs {reference})")
    print("bound = 1 + ratio for the default replace mode (same rows per step); append mode trains 1/(1 - ratio)\n"
          "times the rows by design, so its step time is compared with that row factor instead.")


def bench_synthetic(data_dir: Path) -> None:
    from retain.models.llama2c import ensure_stories260k
    from retain.models.loading import load_any
    from retain.strategies.synthetic_replay.generation import SamplingSettings, generate_candidates, synthesize

    with tempfile.TemporaryDirectory() as cache:
        model_dir = ensure_stories260k(data_dir, cache)
        model, tokenizer = load_any(str(model_dir))
        settings = SamplingSettings(max_new_tokens=64, batch_size=32)
        prompts = ["Once upon a time", "One day, a little girl named Lily", "The big dog was"]
        generate_candidates(model, tokenizer, 8, settings, prompts=prompts)  # warm-up
        start = time.perf_counter()
        records = generate_candidates(model, tokenizer, 200, settings, prompts=prompts, seed=1)
        sampling = time.perf_counter() - start
        start = time.perf_counter()
        kept = synthesize(model, tokenizer, 200, settings, candidates=400, prompts=prompts, seed=2)
        pipeline = time.perf_counter() - start
    print(f"\nsynthetic examples with stories260K ({torch.get_num_threads()} threads, 64 new tokens, top-p 0.6, T 0.9, penalty 1.2)")
    print(f"  200 candidates sampled:            {sampling:7.2f} s  ({len(records) / sampling:.1f} examples/s, {len(records)} non-empty)")
    print(f"  400 candidates -> dedup -> k-means: {pipeline:7.2f} s  ({len(kept)} kept)")
    print(f"  example: {records[0]['text'][:120]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine's noise down)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_steps:
        bench_step_times(args.steps, args.repeats)
    if (args.data_dir / "stories260k").is_dir():
        bench_synthetic(args.data_dir)
    else:
        print(f"\nsynthetic generation skipped: no stories260k under {args.data_dir}")


if __name__ == "__main__":
    main()
