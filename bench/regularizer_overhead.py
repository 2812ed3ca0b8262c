"""Cost of the weight-importance regularizers (l2, ewc, ewc-lora, importance), measured side by side.

Three measurements, each alternating A and B so machine noise hits both alike:

1. Step time: seconds per optimizer step with the regularizer's hooks over the same step without
   them, on one model, alternating step by step (the one-off Fisher / importance pass before
   training is not a step and is reported in 2). Target <= 1.10.
2. Statistics time: ``importance``'s general pass (AdamW steps on batches) against ``ewc``'s
   sampled per-example Fisher on the same examples. Target >= 10x faster.
3. State memory: bytes of each strategy's checkpointed state, and as a fraction of the bytes of
   the trainable parameters.

Model: stories260K (Hugging Face import) with TinyStories text when ``--data-dir`` (default
``../shared/data``) holds it, else a random tiny Llama on synthetic text. Threads are set to 1 (a
shared 2-core machine; more intra-op threads made tiny models slower, not faster; ``--threads``).
Run: ``python bench/regularizer_overhead.py [--steps 30 --rounds 3 --examples 64]``.
"""

from __future__ import annotations

import argparse
import json
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

from retain.config import DataConfig, load_config_dict  # noqa: E402
from retain.data import build_task_data, collate  # noqa: E402
from retain.data.sampling import seeded_subset  # noqa: E402
from retain.stats.fisher import diagonal_fisher  # noqa: E402
from retain.stats.path_integral import path_integral_importance  # noqa: E402

LORA = {"name": "lora", "r": 8}
FEW = {"max_examples": 32}  # the one-off statistics pass is timed in part 2, not here
VARIANTS: dict[str, list[Any]] = {
    "full+l2": ["full", "l2"],
    "full+ewc": ["full", {"name": "ewc", "source": "general", **FEW}],
    "full+importance": ["full", {"name": "importance", "source": "general", **FEW}],
    "full+importance(training)": ["full", {"name": "importance", "source": "general+training", **FEW}],
    "lora+l2": [LORA, "l2"],
    "lora+ewc": [LORA, {"name": "ewc", "source": "general", **FEW}],
    "lora+ewc-lora": [LORA, {"name": "ewc-lora", "source": "general", **FEW}],
    "lora+importance": [LORA, {"name": "importance", "source": "general", **FEW}],
}


def prepare(data_dir: Path, work: Path) -> tuple[str, Path, Path]:
    """(model dir, task jsonl, general jsonl)."""
    stories = data_dir / "tinystories-val" / "tinystories_val.txt"
    if (data_dir / "stories260k").is_dir() and stories.is_file():
        from retain.io import default_cache_dir
        from retain.models.llama2c import ensure_stories260k

        model_dir = str(ensure_stories260k(data_dir, default_cache_dir()))
        texts = [s.strip() for s in stories.read_text(encoding="utf-8").split("\n\n") if s.strip()][:600]
        print(f"model: stories260K ({model_dir}); text: TinyStories validation")
    else:
        from retain.models.tiny import char_tokenizer, tiny_model

        tok = char_tokenizer()
        model_dir = str(work / "tiny")
        tiny_model("llama", len(tok), seed=0, hidden=64, layers=4, heads=4).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        texts = [f"story {i}: the cat sat on the mat and the dog ran in the park. " * 3 for i in range(600)]
        print("model: random tiny Llama (hidden 64, 4 layers); text: synthetic (no --data-dir data found)")
    task, general = work / "task.jsonl", work / "general.jsonl"
    task.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[0::2]))
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1::2]))
    return model_dir, task, general


def interleaved_steps(model_dir: str, task: Path, general: Path, work: Path, strategies: list[Any], steps: int) -> tuple[float, float, int, int]:
    """Median step seconds without and with the regularizer's hooks, alternating step by step on one model.

    The wrapper (full / lora) is set up once; even steps run the plain loop body, odd steps the same
    body with every strategy hook the loop calls (transform_batch, extra_losses, after_backward,
    after_step). Alternating single steps cancels the drift of a shared machine's load.
    Returns (plain s/step, regularized s/step, state bytes, trainable bytes).
    """
    from accelerate import Accelerator

    from retain.models.loading import load_model
    from retain.strategies import Hybrid, StrategyContext, TaskInfo, build_strategies
    from retain.train.loop import build_optimizer, sample_indices

    config = load_config_dict({
        "model": {"name_or_path": model_dir},
        "tasks": [{"name": "a", "data": {"path": str(task), "max_length": 256}}],
        "strategies": strategies,
        "general_data": {"path": str(general), "max_length": 256},
        "train": {"steps_per_task": steps, "batch_size": 8, "lr": 1e-3, "progress": False},
        "output": {"dir": str(work / "unused")},
    })
    model, tokenizer = load_model(config.model)
    data = build_task_data(config.tasks[0].data, tokenizer, seed=0)
    task = TaskInfo(index=0, name="a", steps=2 * steps, data=data)
    accelerator = Accelerator(cpu=True)
    ctx = StrategyContext(
        config=config, accelerator=accelerator, tokenizer=tokenizer, model=model, tasks=[task], run_dir=work,
        cache_dir=work, collate=lambda items: collate(items, tokenizer.pad_token_id), task=task,
    )
    hybrid = Hybrid(build_strategies(config.strategies))
    model = hybrid.setup(model, ctx)
    ctx.model = model
    hybrid.before_task(task, ctx)
    optimizer = build_optimizer(model, config.train)
    model.train()
    plain: list[float] = []
    regularized: list[float] = []
    for step in range(2 * steps):
        with_hooks = step % 2 == 1
        batch = ctx.collate([data.train[i] for i in sample_indices(len(data.train), 0, step * 8, 8)])
        start = time.perf_counter()
        if with_hooks:
            batch = hybrid.transform_batch(batch, ctx)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss = outputs.loss
        if with_hooks:
            terms = hybrid.extra_losses(outputs, batch, ctx)
            loss = loss + sum(terms.values()) if terms else loss
        loss.backward()
        if with_hooks:
            hybrid.after_backward(model, ctx)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if with_hooks:
            hybrid.after_step(model, ctx)
        (regularized if with_hooks else plain).append(time.perf_counter() - start)
    state = hybrid.strategies[-1].state_dict()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return statistics.median(plain), statistics.median(regularized), tensor_bytes(state), trainable


def tensor_bytes(node: Any) -> int:
    if isinstance(node, torch.Tensor):
        return node.numel() * node.element_size()
    if isinstance(node, dict):
        return sum(tensor_bytes(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(tensor_bytes(v) for v in node)
    return 0


def step_times(model_dir: str, task: Path, general: Path, work: Path, steps: int) -> None:
    print(f"\n1. step time ({steps} plain and {steps} regularized steps alternating on one model, batch 8 x 256 tokens;")
    print("   medians; the one-off statistics pass before training is part 2, not a step). Target <= 1.10.")
    print(f"{'variant':28s} {'plain s/step':>12s} {'with hooks':>10s} {'ratio':>7s}")
    memory = {}
    for name, strategies in VARIANTS.items():
        plain, regularized, state, trainable = interleaved_steps(model_dir, task, general, work, strategies, steps)
        print(f"{name:28s} {plain:12.4f} {regularized:10.4f} {regularized / plain:7.3f}")
        memory[name] = (state, trainable)
    print("\n3. state memory (the strategy's state_dict: what it keeps between steps and checkpoints)")
    print(f"{'variant':28s} {'bytes':>12s} {'trainable bytes':>16s} {'fraction':>9s}")
    for name, (state, trainable) in memory.items():
        print(f"{name:28s} {state:12d} {trainable:16d} {state / trainable:9.2f}")
    print("   importance(training) also holds, within each step, a gradient copy and a weight copy (2x trainable).")
    print("   ewc mode=separate keeps one (anchor, Fisher) pair per source: 2x trainable each.")


def statistics_time(model_dir: str, general: Path, examples_count: int, rounds: int) -> None:
    from retain.config import ModelConfig
    from retain.models.loading import load_model

    model, tokenizer = load_model(ModelConfig(name_or_path=model_dir))
    examples = seeded_subset(build_task_data(DataConfig(path=str(general), max_length=256), tokenizer, seed=0).train, examples_count, 0)
    params = dict(model.named_parameters())
    pad = tokenizer.pad_token_id
    batch = lambda items: collate(items, pad)  # noqa: E731
    methods = {
        "importance (AdamW pass, batch 8)": lambda: path_integral_importance(model, params, examples, batch, lr=1e-3, batch_size=8),
        "ewc sampled per-example": lambda: diagonal_fisher(model, params, examples, batch, estimator="sampled"),
        "ewc empirical per-example": lambda: diagonal_fisher(model, params, examples, batch, estimator="empirical"),
        "ewc empirical_batch (batch 8)": lambda: diagonal_fisher(model, params, examples, batch, estimator="empirical_batch", batch_size=8),
    }
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(rounds):
        for name in (list(methods) if round_index % 2 == 0 else list(reversed(methods))):
            compute = methods[name]
            start = time.perf_counter()
            compute()
            seconds[name].append(time.perf_counter() - start)
    reference = statistics.median(seconds["ewc sampled per-example"])
    print(f"\n2. statistics over the same {len(examples)} general examples (median of {rounds} alternating rounds)")
    print(f"{'method':34s} {'seconds':>8s} {'sampled-EWC time / this':>24s}  (target for importance >= 10)")
    for name in methods:
        median = statistics.median(seconds[name])
        print(f"{name:34s} {median:8.3f} {reference / median:24.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="Default: $RETAIN_DATA_DIR or ../shared/data.")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared machine).")
    parser.add_argument("--only", choices=["statistics", "steps"], default=None)
    args = parser.parse_args()
    from retain.scenarios.base import default_data_dir

    args.data_dir = args.data_dir or default_data_dir() or ROOT.parent / "shared" / "data"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, task, general = prepare(args.data_dir, work)
        if args.only in (None, "statistics"):
            statistics_time(model_dir, general, args.examples, args.rounds)
        if args.only in (None, "steps"):
            step_times(model_dir, task, general, work, args.steps)


if __name__ == "__main__":
    main()
