"""What EWC and element-wise importance cost, side by side on the same data, and their state bytes.

Two parts (stories260K with TinyStories text from ``--data-dir``, default ``../shared/data``; else a
random tiny Llama on synthetic text):

1. **Fisher scale vs example length**: the same token stream cut into examples scoring 8, 32 and 128
   tokens; the trace of the sampled Fisher per example (the previous convention: squared gradient of
   each example's mean token loss) and per scored token (the current one). A normalization whose
   lambda transfers between datasets keeps the trace flat across lengths.
2. **Total extra cost and state**: the statistics pass of ``ewc`` (sampled per-example Fisher) and of
   ``importance`` (SI along an AdamW path, batch 8) on the same general examples, alternating ABAB
   rounds; the per-step penalty cost of each (its ``extra_losses`` and their backward, timed
   directly, variants interleaved round-robin: the difference of two whole steps drowns in the noise
   of a shared machine); the total extra seconds of a run of ``--run-steps``
   steps (statistics + steps x per-step overhead) and its ratio; the bytes of each strategy's state
   (``state_dict``) as a share of the trainable weights, for importance ``state: dense`` and the
   compact ``state: topk`` (``keep_fraction`` 0.1 / 0.15, Omega in bfloat16).

Timing: run with ``OMP_NUM_THREADS=1`` on a quiet machine; only ratios measured in one run are
meaningful. ``python bench/importance_cost.py [--examples 128 --reps 100 --rounds 3 --only trace]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from regularizer_overhead import prepare, tensor_bytes  # noqa: E402

from retain.config import DataConfig, ModelConfig, load_config_dict  # noqa: E402
from retain.data import build_task_data, collate  # noqa: E402
from retain.data.sampling import seeded_subset  # noqa: E402
from retain.data.tokenize import Example  # noqa: E402
from retain.stats.fisher import diagonal_fisher  # noqa: E402
from retain.stats.path_integral import path_integral_importance  # noqa: E402

LENGTHS = (8, 32, 128)
TOPK = {"name": "importance", "source": "general", "state": "topk", "state_dtype": "bfloat16"}


def load(model_dir: str) -> tuple[Any, Any]:
    from retain.models.loading import load_model

    return load_model(ModelConfig(name_or_path=model_dir))


def fisher_trace_table(model_dir: str, general: Path, tokens: int) -> None:
    """Part 1: the same text cut at 8 / 32 / 128 scored tokens, Fisher trace per example and per token."""
    model, tokenizer = load(model_dir)
    stream: list[int] = []
    for example in build_task_data(DataConfig(path=str(general), max_length=256), tokenizer, seed=0).train:
        stream += list(example.input_ids)
        if len(stream) >= tokens + 1:
            break
    stream = stream[: tokens + max(LENGTHS)]
    params = dict(model.named_parameters())
    batch = lambda items: collate(items, tokenizer.pad_token_id)  # noqa: E731
    print(f"\n1. sampled Fisher trace of the same {tokens} tokens of TinyStories text, cut into examples")
    print(f"{'scored tokens':>13s} {'examples':>8s} {'per example (old)':>18s} {'per token (now)':>16s}")
    for length in LENGTHS:
        examples = [
            Example(input_ids=stream[i : i + length + 1], labels=stream[i : i + length + 1])
            for i in range(0, tokens, length)
        ]
        traces = []
        for normalize in ("example", "token"):
            fisher, _ = diagonal_fisher(model, params, examples, batch, estimator="sampled", normalize=normalize)
            traces.append(sum(float(f.sum()) for f in fisher.values()))
        print(f"{length:13d} {len(examples):8d} {traces[0]:18.4g} {traces[1]:16.4g}")
    longest = max(LENGTHS)
    print(f"   per token, by position inside the {longest}-token examples (what remains is the model's, not the scale's):")
    for low, high in ((0, 8), (8, 32), (32, longest)):
        examples = [
            Example(
                input_ids=stream[i : i + longest + 1],
                labels=[-100] * (low + 1) + stream[i + low + 1 : i + high + 1] + [-100] * (longest - high),
            )
            for i in range(0, tokens, longest)
        ]
        fisher, _ = diagonal_fisher(model, params, examples, batch, estimator="sampled")
        print(f"   positions {low + 1:3d}-{high:3d}: {sum(float(f.sum()) for f in fisher.values()):10.4g}")


def statistics_seconds(model_dir: str, general: Path, count: int, rounds: int) -> dict[str, float]:
    """Part 2a: median seconds of each statistics pass on the same examples, alternating rounds."""
    model, tokenizer = load(model_dir)
    examples = seeded_subset(build_task_data(DataConfig(path=str(general), max_length=256), tokenizer, seed=0).train, count, 0)
    params = dict(model.named_parameters())
    batch = lambda items: collate(items, tokenizer.pad_token_id)  # noqa: E731
    passes = {
        "ewc": lambda: diagonal_fisher(model, params, examples, batch, estimator="sampled"),
        "importance": lambda: path_integral_importance(model, params, examples, batch, lr=3e-3, batch_size=8),
    }
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for index in range(rounds):
        for name in (list(passes) if index % 2 == 0 else list(reversed(passes))):
            start = time.perf_counter()
            passes[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def build_variant(model_dir: str, task: Path, general: Path, work: Path, strategies: list[Any]) -> tuple[Any, Any, Any]:
    """(model, hybrid, ctx) with the strategies set up and their statistics computed (before_task)."""
    from accelerate import Accelerator

    from retain.models.loading import load_model
    from retain.strategies import Hybrid, StrategyContext, TaskInfo, build_strategies

    config = load_config_dict({
        "model": {"name_or_path": model_dir},
        "tasks": [{"name": "a", "data": {"path": str(task), "max_length": 256}}],
        "strategies": strategies,
        "general_data": {"path": str(general), "max_length": 256},
        "train": {"steps_per_task": 10, "batch_size": 8, "lr": 3e-3, "progress": False},
        "output": {"dir": str(work / "unused")},
    })
    model, tokenizer = load_model(config.model)
    data = build_task_data(config.tasks[0].data, tokenizer, seed=0)
    info = TaskInfo(index=0, name="a", steps=10, data=data)
    ctx = StrategyContext(
        config=config, accelerator=Accelerator(cpu=True), tokenizer=tokenizer, model=model, tasks=[info], run_dir=work,
        cache_dir=work, collate=lambda items: collate(items, tokenizer.pad_token_id), task=info,
    )
    hybrid = Hybrid(build_strategies(config.strategies))
    model = hybrid.setup(model, ctx)
    ctx.model = model
    hybrid.before_task(info, ctx)
    with torch.no_grad():  # weights away from the anchor, as during training
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator))
    return model, hybrid, ctx


def penalty_seconds(variants: dict[str, tuple[Any, Any, Any]], reps: int) -> dict[str, float]:
    """Median seconds of one step's penalty (extra_losses + its backward), variants interleaved round-robin."""
    from types import SimpleNamespace

    outputs = SimpleNamespace(loss=torch.tensor(2.0), logits=None)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            model, hybrid, ctx = variants[name]
            start = time.perf_counter()
            terms = hybrid.extra_losses(outputs, {}, ctx)
            sum(terms.values()).backward()
            seconds[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in seconds.items()}


def step_seconds(model_dir: str, task: Path, work: Path, steps: int) -> float:
    """Median seconds of a plain training step (forward, backward, AdamW) at batch 8 x 256, for scale."""
    from retain.models.loading import load_model

    model, tokenizer = load_model(ModelConfig(name_or_path=model_dir))
    examples = build_task_data(DataConfig(path=str(task), max_length=256), tokenizer, seed=0).train
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    times = []
    for step in range(steps):
        batch = collate([examples[(step * 8 + i) % len(examples)] for i in range(8)], tokenizer.pad_token_id)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_table(model_dir: str, task: Path, general: Path, work: Path, count: int, reps: int, rounds: int, run_steps: int) -> None:
    stats = statistics_seconds(model_dir, general, count, rounds)
    few = {"max_examples": 16}  # the per-step cost does not depend on how the statistics were estimated
    specs: dict[str, tuple[str, list[Any]]] = {
        "ewc (sampled Fisher)": ("ewc", ["full", {"name": "ewc", "source": "general", **few}]),
        "importance dense": ("importance", ["full", {"name": "importance", "source": "general", **few}]),
        "importance dense, bf16 Omega": ("importance", ["full", {"name": "importance", "source": "general", "state_dtype": "bfloat16", **few}]),
        "importance topk 0.15 bf16": ("importance", ["full", {**TOPK, "keep_fraction": 0.15, **few}]),
        "importance topk 0.10 bf16": ("importance", ["full", {**TOPK, "keep_fraction": 0.1, **few}]),
    }
    variants = {label: build_variant(model_dir, task, general, work, strategies) for label, (_, strategies) in specs.items()}
    penalty = penalty_seconds(variants, reps)
    plain = step_seconds(model_dir, task, work, 10)
    print(f"\n2. extra cost on the same {count} general examples (statistics: median of {rounds} alternating rounds;")
    print(f"   per step: the penalty's forward + backward, median of {reps} interleaved repetitions; a plain")
    print(f"   training step at batch 8 x 256 tokens takes {plain:.4f}s here)")
    print(f"{'variant':30s} {'stats s':>8s} {'step +s':>8s} {'+% step':>8s} {f'total {run_steps} steps':>16s} {'state bytes':>12s} {'/ trainable':>11s} {'/ ewc state':>11s}")
    rows = {}
    for label, (kind, _) in specs.items():
        model, hybrid, _ = variants[label]
        state = tensor_bytes(hybrid.strategies[-1].state_dict())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        rows[label] = (stats[kind], penalty[label], stats[kind] + run_steps * penalty[label], state, trainable)
    ewc_total, ewc_state = rows["ewc (sampled Fisher)"][2], rows["ewc (sampled Fisher)"][3]
    for label, (seconds, extra, total, state, trainable) in rows.items():
        print(
            f"{label:30s} {seconds:8.2f} {extra:8.4f} {100 * extra / plain:7.1f}% {total:16.2f} {state:12d} "
            f"{state / trainable:11.3f} {state / ewc_state:11.3f}"
        )
    for label, (_, _, total, _, _) in rows.items():
        if label.startswith("importance"):
            print(f"   ewc total / {label} total: {ewc_total / total:.2f}x")
    print(f"   statistics alone: ewc {stats['ewc']:.2f}s, importance {stats['importance']:.2f}s: {stats['ewc'] / stats['importance']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="Default: $RETAIN_DATA_DIR or ../shared/data.")
    parser.add_argument("--examples", type=int, default=128, help="General examples of both statistics passes.")
    parser.add_argument("--reps", type=int, default=100, help="Timed penalty evaluations per variant.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-steps", type=int, default=300, help="Run length for the total extra cost.")
    parser.add_argument("--trace-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["trace", "cost"], default=None)
    args = parser.parse_args()
    from retain.scenarios.base import default_data_dir

    args.data_dir = args.data_dir or default_data_dir() or ROOT.parent / "shared" / "data"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, task, general = prepare(args.data_dir, work)
        if args.only in (None, "trace"):
            fisher_trace_table(model_dir, general, args.trace_tokens)
        if args.only in (None, "cost"):
            cost_table(model_dir, task, general, work, args.examples, args.reps, args.rounds, args.run_steps)


if __name__ == "__main__":
    main()
