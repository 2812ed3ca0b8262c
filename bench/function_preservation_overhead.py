"""Overhead of lwf, fip and stm against the same run without them, measured side by side.

Step time: each pair (e.g. ``lora`` vs ``lora+lwf``) is trained from the same base with the same data,
seed and budget, in alternating rounds (A, B, then B, A, ...) so machine noise hits both sides; the
printed ratio is the median over rounds of B's seconds per optimizer step over A's. Targets:
``lwf`` with a LoRA teacher <= 1.5, ``fip`` <= 2.0, ``stm`` <= 1.02 after its one precompute pass
(whose time is printed, cold and from the cache). Step time excludes ``before_task`` (precomputes).

Memory: separate processes (so peak RSS is per configuration) train a larger random Llama for a few
steps; ``lwf`` on LoRA must add no model copy (its peak RSS and the tensors it holds stay near zero),
while ``lwf`` on full fine-tuning holds one frozen copy, shown for contrast.

The model for step time is stories260K imported to Hugging Face format when ``<data-dir>/stories260k``
exists (TinyStories text), else a small random Llama on synthetic text (printed).
Run: ``python bench/function_preservation_overhead.py [--rounds 3 --steps 20]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retain.config import load_config_dict  # noqa: E402

TIME_PAIRS: list[tuple[str, list[Any], list[Any], float | None]] = [
    ("lwf, LoRA teacher (adapters off), task anchors", ["lora"], ["lora", "lwf"], 1.5),
    ("lwf, LoRA teacher, general anchors (4 per step)", ["lora"], ["lora", {"name": "lwf", "anchor": "general"}], None),
    ("fip, start anchor, pool batch 4", ["full"], ["full", "fip"], 2.0),
    ("stm (after its precompute)", ["full"], ["full", "stm"], 1.02),
]
MEMORY_RUNS: list[tuple[str, list[Any]]] = [
    ("lora", ["lora"]),
    ("lora+lwf", ["lora", "lwf"]),
    ("full", ["full"]),
    ("full+lwf (copy)", ["full", "lwf"]),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data", help="shared data root")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per pair")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per training window")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fewer threads: less noise)")
    parser.add_argument("--memory-hidden", type=int, default=512, help="hidden size of the memory-check model")
    parser.add_argument("--memory-layers", type=int, default=8)
    parser.add_argument("--only", default=None, help="comma-separated strategies to time, e.g. lwf,stm")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Model and data


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, str]:
    """(model dir, task text, general text, description)."""
    stories = args.data_dir / "tinystories-val" / "tinystories_val.txt"
    if (args.data_dir / "stories260k").is_dir() and stories.is_file():
        from retain.models.llama2c import ensure_stories260k

        model_dir = ensure_stories260k(args.data_dir, work / "import")
        texts = [s.strip() for s in stories.read_text(encoding="utf-8").split("\n\n") if s.strip()]
        task_texts, general_texts, what = texts[:400], texts[400:800], "stories260K on TinyStories"
    else:
        from retain.models.tiny import char_tokenizer, tiny_model

        model_dir = work / "tiny"
        tokenizer = char_tokenizer()
        tiny_model("llama", len(tokenizer), seed=0, hidden=64, layers=4, heads=4).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        task_texts = [f"the contract number {i} shall be governed by the laws of delaware." for i in range(200)]
        general_texts = [f"once upon a time a cat named tom {i} played with a red ball." for i in range(200)]
        what = "random tiny Llama (hidden 64, 4 layers) on synthetic text (no shared data found)"
    task, general = work / "task.jsonl", work / "general.jsonl"
    task.write_text("".join(json.dumps({"text": t}) + "\n" for t in task_texts))
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in general_texts))
    return model_dir, task, general, what


def train_once(args: argparse.Namespace, model_dir: Path, task: Path, general: Path, strategies: list[Any], out: Path,
               steps: int) -> tuple[float, dict[str, float]]:
    """Seconds per optimizer step of one run, and the strategies' logged metrics."""
    from retain.train import finetune

    config = load_config_dict({
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "task", "data": {"path": str(task), "max_length": args.max_length}}],
        "general_data": {"path": str(general), "max_length": args.max_length},
        "strategies": strategies,
        "train": {"steps_per_task": steps, "batch_size": args.batch_size, "lr": 1e-3, "progress": False,
                  "log_every": 1000},
        "output": {"dir": str(out), "save_per_task": False},
    })
    outcome = finetune(config)
    stats = outcome.task_stats[0]
    return stats.seconds / stats.steps, strategy_metrics(out / "train_log.jsonl")


def strategy_metrics(log: Path) -> dict[str, float]:
    """What the strategies reported (``ctx.log``) over the run: the latest value of each, from the log rows."""
    metrics: dict[str, float] = {}
    for line in log.read_text().splitlines():
        row = json.loads(line)
        metrics.update({k: v for k, v in row.items() if "/" in k and not k.startswith("loss/")})
    return metrics


def selected_pairs(only: str | None) -> list[tuple[str, list[Any], list[Any], float | None]]:
    if not only:
        return TIME_PAIRS
    return [pair for pair in TIME_PAIRS if pair[0].split(",")[0].split(" ")[0] in only.split(",")]


def time_pairs(args: argparse.Namespace, work: Path) -> None:
    model_dir, task, general, what = prepare(args, work)
    print(f"step time: {what}; batch {args.batch_size} x {args.max_length} tokens, {args.steps} steps per run, "
          f"{args.rounds} alternating rounds, {torch.get_num_threads()} torch thread(s)")
    rows = []
    run_id = 0
    for label, baseline, candidate, target in selected_pairs(args.only):
        ratios, seconds_a, seconds_b, precompute = [], [], [], []
        for round_index in range(args.rounds):
            order = [("A", baseline), ("B", candidate)]
            if round_index % 2:
                order.reverse()
            measured = {}
            for side, strategies in order:
                run_id += 1
                measured[side], metrics = train_once(args, model_dir, task, general, strategies, work / f"run{run_id}", args.steps)
                if side == "B" and "stm/precompute_seconds" in metrics:
                    precompute.append((metrics["stm/precompute_seconds"], metrics.get("stm/cache_hits", 0)))
                    print(f"  stm: {metrics['stm/masked_tokens']:.0f} tokens masked "
                          f"({100 * metrics['stm/masked_fraction']:.1f}% of labelled tokens)")
            seconds_a.append(measured["A"])
            seconds_b.append(measured["B"])
            ratios.append(measured["B"] / measured["A"])
        ratio = statistics.median(ratios)
        verdict = "" if target is None else ("  ok" if ratio <= target else "  OVER TARGET")
        rows.append((label, statistics.median(seconds_a), statistics.median(seconds_b), ratio, target, verdict))
        print(f"  {label}: ratios per round {', '.join(f'{r:.3f}' for r in ratios)}")
        for seconds, hit in precompute:
            print(f"  stm precompute: {seconds:.3f}s ({'from the cache' if hit else 'cold: one forward pass'})")
    print()
    print(f"{'pair':52s} {'A s/step':>9s} {'B s/step':>9s} {'B/A':>7s} {'target':>7s}")
    for label, a, b, ratio, target, verdict in rows:
        print(f"{label:52s} {a:9.4f} {b:9.4f} {ratio:7.3f} {('<= ' + format(target, 'g')) if target else '-':>7s}{verdict}")


# --------------------------------------------------------------------------------------------
# Memory: one process per configuration, so ru_maxrss is that configuration's peak


def memory_child(spec: dict[str, Any]) -> None:
    from retain.models.tiny import char_tokenizer, tiny_model
    from retain.strategies.lwf import LearningWithoutForgetting
    from retain.train import finetune

    torch.set_num_threads(1)
    work = Path(spec["work"])
    tokenizer = char_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=spec["hidden"], layers=spec["layers"], heads=8)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    data = work / "memory.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat and slept."}) + "\n" for i in range(64)))
    config = load_config_dict({
        "model": {"name_or_path": "in-memory"},
        "tasks": [{"name": "task", "data": {"path": str(data), "max_length": 48}}],
        "strategies": spec["strategies"],
        "train": {"steps_per_task": 3, "batch_size": 4, "lr": 1e-4, "progress": False},
        "output": {"dir": str(work / spec["name"]), "save_per_task": False},
    })
    instances: list[LearningWithoutForgetting] = []
    original_before_task = LearningWithoutForgetting.before_task

    def recording_before_task(self: LearningWithoutForgetting, task: Any, ctx: Any) -> None:
        original_before_task(self, task, ctx)
        instances.append(self)

    LearningWithoutForgetting.before_task = recording_before_task  # type: ignore[method-assign]
    finetune(config, model=model, tokenizer=tokenizer)
    held = sum(
        sum(p.numel() * p.element_size() for p in s._teacher_copy.parameters())
        for s in instances if s._teacher_copy is not None
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"peak_rss": peak, "teacher_copy_bytes": held, "model_bytes": model_bytes}))


def memory_runs(args: argparse.Namespace, work: Path) -> None:
    results = {}
    for name, strategies in MEMORY_RUNS:
        spec = {"work": str(work), "name": name.replace(" ", "_").replace("(", "").replace(")", ""),
                "strategies": strategies, "hidden": args.memory_hidden, "layers": args.memory_layers}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"memory run {name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 1024 * 1024
    model_mib = results["lora"]["model_bytes"] / mib
    print(f"memory: random Llama hidden {args.memory_hidden}, {args.memory_layers} layers = {model_mib:.1f} MiB of weights; "
          "peak RSS per process")
    print(f"{'run':18s} {'peak RSS MiB':>13s} {'teacher copy MiB':>17s}")
    for name, _ in MEMORY_RUNS:
        r = results[name]
        print(f"{name:18s} {r['peak_rss'] / mib:13.1f} {r['teacher_copy_bytes'] / mib:17.1f}")
    lora_delta = (results["lora+lwf"]["peak_rss"] - results["lora"]["peak_rss"]) / mib
    full_delta = (results["full+lwf (copy)"]["peak_rss"] - results["full"]["peak_rss"]) / mib
    print(f"lwf on LoRA adds {lora_delta:+.1f} MiB peak RSS ({lora_delta / model_mib:+.2f} model copies); "
          f"lwf with a copy on full adds {full_delta:+.1f} MiB ({full_delta / model_mib:+.2f} copies)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        memory_child(json.loads(args.child))
        return
    torch.set_num_threads(args.threads)
    import logging
    import os

    logging.getLogger("retain").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="retain-fp-bench-") as tmp:
        work = Path(tmp)
        os.environ["RETAIN_CACHE_DIR"] = str(work / "cache")  # a cold STM cache for the first run
        start = time.perf_counter()
        if not args.skip_time:
            time_pairs(args, work)
        if not args.skip_memory:
            print()
            memory_runs(args, work)
        print(f"\n(total {time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
