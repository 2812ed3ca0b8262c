"""Cost of the weight-importance regularizers (l2, ewc, ewc-lora, importance), measured side by side.

Three measurements, each in alternating rounds so machine noise hits every variant alike:

1. Step time: seconds per optimizer step of ``full+X`` over ``full`` and ``lora+X`` over ``lora``
   (the loop's own per-step timing; the one-off Fisher / importance pass before training is not a
   step and is reported in 2). Target <= 1.10.
2. Statistics time: ``importance``'s general pass (SGD steps on batches) against ``ewc``'s
   sampled per-example Fisher on the same examples. Target >= 10x faster.
3. State memory: bytes of each strategy's checkpointed state, and as a fraction of the bytes of
   the trainable parameters.

Model: stories260K (Hugging Face import) with TinyStories text when ``--data-dir`` (default
``../shared/data``) holds it, else a random tiny Llama on synthetic text. Threads are set to 1 (a
shared 2-core machine; more intra-op threads made tiny models slower, not faster).
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
from retain.fisher import diagonal_fisher, path_integral_importance, select_examples  # noqa: E402
from retain.train import finetune  # noqa: E402
from retain.train.checkpoint import latest_checkpoint, load_nested  # noqa: E402

LORA = {"name": "lora", "r": 8}
VARIANTS: dict[str, list[Any]] = {
    "full": ["full"],
    "full+l2": ["full", "l2"],
    "full+ewc": ["full", {"name": "ewc", "source": "general"}],
    "full+ewc(online,2 tasks)": ["full", {"name": "ewc", "mode": "online"}],
    "full+importance": ["full", {"name": "importance", "source": "general"}],
    "full+importance(training)": ["full", {"name": "importance", "source": "general+training"}],
    "lora": [LORA],
    "lora+l2": [LORA, "l2"],
    "lora+ewc": [LORA, {"name": "ewc", "source": "general"}],
    "lora+ewc-lora": [LORA, {"name": "ewc-lora", "source": "general"}],
    "lora+importance": [LORA, {"name": "importance", "source": "general"}],
}
BASELINE = {name: ("lora" if name.startswith("lora") else "full") for name in VARIANTS}


def prepare(data_dir: Path, work: Path) -> tuple[str, Path, Path]:
    """(model dir, task jsonl, general jsonl)."""
    stories = data_dir / "tinystories-val" / "tinystories_val.txt"
    if (data_dir / "stories260k").is_dir() and stories.is_file():
        from retain.models.llama2c import ensure_stories260k
        from retain.train.run import default_cache_dir

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


def run(model_dir: str, task: Path, general: Path, out: Path, strategies: list[Any], steps: int, two_tasks: bool) -> tuple[float, dict]:
    tasks = [{"name": "a", "data": {"path": str(task), "max_length": 256}}]
    if two_tasks:
        tasks.append({"name": "b", "data": {"path": str(general), "max_length": 256}})
    config = load_config_dict({
        "model": {"name_or_path": model_dir},
        "tasks": tasks,
        "strategies": strategies,
        "general_data": {"path": str(general), "max_length": 256},
        "train": {"steps_per_task": steps, "batch_size": 8, "lr": 1e-3, "progress": False, "log_every": 1000},
        "output": {"dir": str(out), "save_per_task": False},
    })
    outcome = finetune(config)
    seconds = sum(s.seconds for s in outcome.task_stats) / sum(s.steps for s in outcome.task_stats)
    state = load_nested(latest_checkpoint(out), "strategies")
    trainable = sum(p.numel() * p.element_size() for p in outcome.model.parameters() if p.requires_grad)
    return seconds, {"state": state, "trainable_bytes": trainable}


def tensor_bytes(node: Any) -> int:
    if isinstance(node, torch.Tensor):
        return node.numel() * node.element_size()
    if isinstance(node, dict):
        return sum(tensor_bytes(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(tensor_bytes(v) for v in node)
    return 0


def step_times(model_dir: str, task: Path, general: Path, work: Path, steps: int, rounds: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    memory: dict[str, tuple[int, int]] = {}
    for round_index in range(rounds):
        for name, strategies in VARIANTS.items():
            out = work / f"run-{round_index}-{len(times[name])}-{name.replace('+', '_')}"
            seconds, info = run(model_dir, task, general, out, strategies, steps, two_tasks="2 tasks" in name)
            times[name].append(seconds)
            regularizer = [s if isinstance(s, str) else s["name"] for s in strategies][-1]
            if regularizer not in ("full", "lora"):
                memory[name] = (tensor_bytes(info["state"].get(regularizer, {})), info["trainable_bytes"])
    print(f"\n1. step time (median of {rounds} alternating rounds, {steps} steps each, batch 8 x 256 tokens)")
    print(f"{'variant':28s} {'s/step':>8s} {'ratio':>7s}  (vs its unregularized counterpart; target <= 1.10)")
    for name in VARIANTS:
        median = statistics.median(times[name])
        ratio = median / statistics.median(times[BASELINE[name]])
        print(f"{name:28s} {median:8.4f} {ratio:7.3f}")
    print("\n3. state memory (checkpointed strategy state)")
    print(f"{'variant':28s} {'bytes':>12s} {'trainable bytes':>16s} {'fraction':>9s}")
    for name, (state, trainable) in memory.items():
        print(f"{name:28s} {state:12d} {trainable:16d} {state / trainable:9.2f}")
    print("   importance(training) also holds, during each step, a gradient copy and a weight copy (2x trainable).")


def statistics_time(model_dir: str, general: Path, examples_count: int, rounds: int) -> None:
    from retain.models.loading import load_model, load_tokenizer
    from retain.config import ModelConfig

    model, tokenizer = load_model(ModelConfig(name_or_path=model_dir))
    examples = select_examples(build_task_data(DataConfig(path=str(general), max_length=256), tokenizer, seed=0).train, examples_count, 0)
    params = dict(model.named_parameters())
    pad = tokenizer.pad_token_id
    batch = lambda items: collate(items, pad)  # noqa: E731
    methods = {
        "importance (SGD pass, batch 8)": lambda: path_integral_importance(model, params, examples, batch, lr=1e-3, batch_size=8),
        "ewc sampled per-example": lambda: diagonal_fisher(model, params, examples, batch, estimator="sampled"),
        "ewc empirical per-example": lambda: diagonal_fisher(model, params, examples, batch, estimator="empirical"),
        "ewc empirical_batch (batch 8)": lambda: diagonal_fisher(model, params, examples, batch, estimator="empirical_batch", batch_size=8),
    }
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, compute in methods.items():
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
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, task, general = prepare(args.data_dir, work)
        statistics_time(model_dir, general, args.examples, args.rounds)
        step_times(model_dir, task, general, work, args.steps, args.rounds)


if __name__ == "__main__":
    main()
