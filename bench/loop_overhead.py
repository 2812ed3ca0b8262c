"""Seconds per step of retain's loop against a minimal hand-written PyTorch loop.

Same model (stories260K when $RETAIN_DATA_DIR or ../shared/data is present, else a tiny random
Llama), same examples, same sample order, same AdamW + schedule + clipping, same number of steps,
the same logging cadence and one device read per step in both; runs alternate (retain, hand,
retain, hand, ...) so machine noise hits both. Prints each round and the median ratio.
Target: retain / hand <= 1.05.

    python bench/loop_overhead.py [--steps 40] [--rounds 3] [--batch-size 8] [--length 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retain.config import load_config_dict  # noqa: E402
from retain.data import build_task_data, collate  # noqa: E402
from retain.train import finetune  # noqa: E402
from retain.data.sampling import Stream, derive_seed  # noqa: E402
from retain.train.loop import build_optimizer, build_scheduler, sample_indices  # noqa: E402


def load_base(cache: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = Path(os.environ.get("RETAIN_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if (data / "stories260k").is_dir():
        from retain.models.llama2c import ensure_stories260k

        path = ensure_stories260k(data, cache)
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), "stories260K", data
    from retain.models.tiny import char_tokenizer, tiny_model

    tokenizer = char_tokenizer()
    return tiny_model("llama", len(tokenizer), hidden=64, layers=4), tokenizer, "tiny random llama", None


def training_text(data: Path | None, out: Path) -> Path:
    path = out / "train.jsonl"
    if data is not None:
        text = (data / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    else:
        text = " ".join(f"sentence number {i} about cats and dogs." for i in range(5000))
    path.write_text(json.dumps({"text": text}) + "\n")
    return path


def run_retain(model, tokenizer, config) -> float:
    outcome = finetune(config, model=copy.deepcopy(model), tokenizer=tokenizer)
    stats = outcome.task_stats[0]
    return stats.seconds / stats.steps


def run_hand(model, tokenizer, config, examples, log_path: Path) -> float:
    """The loop a careful engineer writes by hand: same work, nothing else.

    Like retain's loop it reads the device once per step (loss and tokens together, which the
    divergence check needs anyway) and appends a JSON row every ``log_every`` steps.
    """
    model = copy.deepcopy(model)
    model.train()
    train = config.train
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, train.steps_per_task)
    params = [p for p in model.parameters() if p.requires_grad]
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    start = time.perf_counter()
    for step in range(train.steps_per_task):
        idx = sample_indices(len(examples), derive_seed(train.seed, Stream.DATA_ORDER, 0), step * train.batch_size,
                             train.batch_size)  # the order retain's loop reads task 0 in
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        value, tokens = torch.stack([loss.detach(), batch["attention_mask"].sum().float()]).tolist()
        if not math.isfinite(value):
            raise RuntimeError(f"loss became {value} at step {step}")
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss, window_steps, window_tokens = window_loss + value, window_steps + 1, window_tokens + int(tokens)
        if (step + 1) % train.log_every == 0 or step + 1 == train.steps_per_task:
            row = {"step": step + 1, "loss": window_loss / window_steps, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_second": window_tokens / (time.perf_counter() - window_start)}
            with open(log_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    return (time.perf_counter() - start) / train.steps_per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model, tokenizer, label, data = load_base(tmp_path / "cache")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        text = training_text(data, tmp_path)
        print(f"model: {label}; {args.steps} steps x batch {args.batch_size} x {args.length} tokens; {args.threads} threads")

        def config(round_index: int):
            return load_config_dict(
                {
                    "model": {"name_or_path": label},
                    "tasks": [{"name": "bench", "data": {"path": str(text), "max_length": args.length}}],
                    "strategies": ["full"],
                    "train": {"steps_per_task": args.steps, "batch_size": args.batch_size, "lr": 1e-3,
                              "log_every": 10, "progress": True},
                    "checkpoint": {"every": 0},
                    "output": {"dir": str(tmp_path / f"run{round_index}"), "save_per_task": False},
                }
            )

        examples = build_task_data(config(0).tasks[0].data, tokenizer, seed=0).train
        hand_log = tmp_path / "hand_log.jsonl"
        run_hand(model, tokenizer, config(0), examples, hand_log)  # warm-up: allocator, kernels
        ours, hand = [], []
        for r in range(args.rounds):
            ours.append(run_retain(model, tokenizer, config(r)))
            hand.append(run_hand(model, tokenizer, config(r), examples, hand_log))
            print(f"round {r + 1}: retain {ours[-1] * 1000:.1f} ms/step   hand-written {hand[-1] * 1000:.1f} ms/step   ratio {ours[-1] / hand[-1]:.3f}")
        ratio = statistics.median(o / h for o, h in zip(ours, hand))
        print(f"median ratio retain/hand-written: {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
