"""One short check for a machine with a CUDA GPU: bf16 throughput against a hand-written loop, QLoRA,
gradient checkpointing, peak memory, and (with two GPUs) two-process equivalence. Prints ratios measured
side by side in one run; on a machine without CUDA it says so and exits 0.

    python bench/gpu_check.py [--steps 30] [--batch-size 16] [--length 256] [--rounds 2] [--model DIR]

Model: stories260K from $RETAIN_DATA_DIR (or ../shared/data), or --model DIR (any causal LM folder).
Sections (each prints one line per measurement, then a ratio):

1. loop overhead, bf16: retain ``full`` / hand-written full loop, retain ``full+ewc`` / the same hand loop;
   retain ``lora`` / hand-written peft LoRA loop, retain ``lora+lwf`` / the same hand loop. Same examples,
   sample order, AdamW, schedule and clipping; one device read per step in both; runs alternate.
2. memory: peak ``torch.cuda.max_memory_allocated`` of lora (bf16 weights), lora + gradient checkpointing,
   and QLoRA (4-bit nf4 base, bf16 compute), each as a ratio to the bf16 lora run; seconds/step likewise.
3. two GPUs (only when ``torch.cuda.device_count() >= 2``): ``accelerate launch --num_processes 2 -m retain
   train`` at batch 2 per process against one process at batch 4, same global batch: max abs difference of
   the final weights, for full and full+ewc.
4. FSDP2 (2+ GPUs): ``torchrun --nproc_per_node N -m retain train`` with ``train.parallel: fsdp`` at batch 2
   per process against one process at batch 2N: max abs difference of the consolidated final weights, for
   full and full+ewc. ``--skip loop,memory,ddp`` runs this section alone (one short command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cuda_or_exit() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to measure (run it on a GPU machine).")
        sys.exit(0)


def base_model_dir(args: argparse.Namespace, cache: Path) -> tuple[Path, Path | None]:
    """(model folder, data folder): --model, or stories260K imported from the shared data."""
    data = Path(os.environ.get("RETAIN_DATA_DIR", REPO.parent / "shared" / "data"))
    data = data if data.is_dir() else None
    if args.model:
        return Path(args.model), data
    if data is None or not (data / "stories260k").is_dir():
        print("gpu_check: stories260K not found: set RETAIN_DATA_DIR or pass --model DIR")
        sys.exit(2)
    from retain.models.llama2c import ensure_stories260k

    return Path(ensure_stories260k(data, cache)), data


def text_files(data: Path | None, out: Path) -> tuple[Path, Path]:
    """Training text (Shakespeare, or synthetic) and general text (TinyStories, or synthetic) as jsonl."""
    train, general = out / "train.jsonl", out / "general.jsonl"
    if data is not None and (data / "tinyshakespeare" / "input.txt").is_file():
        text = (data / "tinyshakespeare" / "input.txt").read_text()[:300_000]
    else:
        text = " ".join(f"sentence number {i} about cats and dogs." for i in range(8000))
    train.write_text(json.dumps({"text": text}) + "\n")
    stories = sorted((data / "tinystories-val").glob("*.txt")) if data is not None and (data / "tinystories-val").is_dir() else []
    general_text = stories[0].read_text()[:100_000] if stories else " ".join(f"once upon a time {i}." for i in range(4000))
    general.write_text(json.dumps({"text": general_text}) + "\n")
    return train, general


def config_dict(model_dir: Path, train: Path, general: Path, out: Path, strategies: list[Any], args: argparse.Namespace,
                **extra: Any) -> dict[str, Any]:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{"name": "bench", "data": {"path": str(train), "max_length": args.length}}],
        "strategies": strategies,
        "general_data": {"path": str(general), "max_length": args.length},
        "train": {"steps_per_task": args.steps, "batch_size": args.batch_size, "lr": 1e-3, "log_every": 10,
                  "progress": False, "mixed_precision": "bf16"},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out), "save_per_task": False},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def measure(fn: Callable[[], float]) -> tuple[float, int]:
    """(seconds per step, peak bytes) of one run."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = fn()
    torch.cuda.synchronize()
    return seconds, int(torch.cuda.max_memory_allocated())


def run_retain(config: dict[str, Any]) -> float:
    from retain.config import load_config_dict
    from retain.train import finetune

    outcome = finetune(load_config_dict(config))
    stats = outcome.task_stats[0]
    return stats.seconds / stats.steps


def run_hand(model_dir: Path, examples: list[Any], pad_id: int, args: argparse.Namespace, lora: bool) -> float:
    """The loop a careful engineer writes: bf16 autocast, AdamW, schedule, clipping, one read per step."""
    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    from retain.data import collate
    from retain.data.sampling import sample_indices

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).cuda()
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(args.steps):
        idx = sample_indices(len(examples), 0, step * args.batch_size, args.batch_size)
        batch = {k: v.cuda(non_blocking=True) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise RuntimeError(f"loss became {value} at step {step}")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def loop_overhead(model_dir: Path, train: Path, general: Path, tmp: Path, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from retain.config import DataConfig
    from retain.data import build_task_data, ensure_pad_token

    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(model_dir))
    examples = build_task_data(DataConfig(path=str(train), max_length=args.length), tokenizer, seed=0).train
    print(f"\n1. loop overhead, bf16, {args.steps} steps x batch {args.batch_size} x {args.length} tokens")
    pairs = [("full", ["full"], False), ("full+ewc", ["full", "ewc"], False),
             ("lora", ["lora"], True), ("lora+lwf", ["lora", {"name": "lwf", "anchor": "general"}], True)]
    run_hand(model_dir, examples, tokenizer.pad_token_id, args, lora=False)  # warm-up: kernels, allocator
    for name, strategies, lora in pairs:
        ours, hand = [], []
        for r in range(args.rounds):
            config = config_dict(model_dir, train, general, tmp / f"{name}-{r}", strategies, args)
            seconds, peak = measure(lambda: run_retain(config))
            ours.append(seconds)
            hand_seconds, hand_peak = measure(lambda: run_hand(model_dir, examples, tokenizer.pad_token_id, args, lora))
            hand.append(hand_seconds)
            print(f"   {name:9s} round {r + 1}: retain {seconds * 1000:7.2f} ms/step ({peak / 2**20:7.1f} MiB)   "
                  f"hand {'lora' if lora else 'full'} {hand_seconds * 1000:7.2f} ms/step ({hand_peak / 2**20:7.1f} MiB)")
        ratio = statistics.median(o / h for o, h in zip(ours, hand))
        print(f"   {name:9s} median ratio retain/hand-written: {ratio:.3f}")


def memory(model_dir: Path, train: Path, general: Path, tmp: Path, args: argparse.Namespace) -> None:
    print("\n2. memory and speed: lora (bf16 weights) vs gradient checkpointing vs QLoRA (nf4 base, bf16 compute)")
    runs = {
        "lora bf16": config_dict(model_dir, train, general, tmp / "m-lora", ["lora"], args, model__dtype="bfloat16"),
        "lora bf16 + grad ckpt": config_dict(model_dir, train, general, tmp / "m-gc", ["lora"], args,
                                             model__dtype="bfloat16", train__gradient_checkpointing=True),
        "qlora nf4": config_dict(model_dir, train, general, tmp / "m-q", ["lora"], args, model__dtype="bfloat16",
                                 model__quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                      "bnb_4bit_compute_dtype": "bfloat16"}),
    }
    results: dict[str, tuple[float, int]] = {}
    for name, config in runs.items():
        try:
            results[name] = measure(lambda: run_retain(config))
        except Exception as err:  # noqa: BLE001 - report and go on: one failed option must not hide the others
            print(f"   {name:22s} FAILED: {type(err).__name__}: {err}")
            continue
        seconds, peak = results[name]
        print(f"   {name:22s} {seconds * 1000:7.2f} ms/step   peak {peak / 2**20:8.1f} MiB")
    if "lora bf16" in results:
        ref_seconds, ref_peak = results["lora bf16"]
        for name, (seconds, peak) in results.items():
            if name != "lora bf16":
                print(f"   {name:22s} / lora bf16: time {seconds / ref_seconds:.3f}   peak memory {peak / ref_peak:.3f}")


def two_gpus(model_dir: Path, train: Path, general: Path, tmp: Path, args: argparse.Namespace) -> None:
    import torch
    import yaml
    from safetensors.torch import load_file

    if torch.cuda.device_count() < 2:
        print(f"\n3. two-GPU equivalence: skipped ({torch.cuda.device_count()} GPU)")
        return
    print("\n3. two-GPU equivalence: 2 processes x batch 2 vs 1 process x batch 4 (constant lr, no clipping, fp32)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, strategies in (("full", ["full"]), ("full+ewc", ["full", "ewc"])):
        finals = []
        for processes, batch in ((1, 4), (2, 2)):
            out = tmp / f"ddp-{name}-{processes}"
            config = config_dict(model_dir, train, general, out, strategies, args)
            config["train"].update({"steps_per_task": 6, "batch_size": batch, "scheduler": "constant",
                                    "max_grad_norm": None, "mixed_precision": "no"})
            path = tmp / f"ddp-{name}-{processes}.yaml"
            path.write_text(yaml.safe_dump(config))
            launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"] if processes == 2 else [sys.executable]
            done = subprocess.run([*launch, "-m", "retain", "train", str(path)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"   {name}: {processes} process(es) FAILED: {done.stderr.strip().splitlines()[-1:]}")
                break
            finals.append(load_file(str(out / "final" / "model.safetensors")))
        if len(finals) == 2:
            diff = max((finals[0][k].float() - finals[1][k].float()).abs().max().item() for k in finals[0])
            print(f"   {name:9s} max abs weight difference after 6 steps: {diff:.3e}")


def fsdp2_gpus(model_dir: Path, train: Path, general: Path, tmp: Path, args: argparse.Namespace) -> None:
    """FSDP2 (train.parallel: fsdp) on every GPU against one process with the same global batch: weight
    difference of the consolidated final model and the largest peak GPU memory of a process."""
    import torch
    import yaml
    from safetensors.torch import load_file

    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"\n4. FSDP2: skipped ({gpus} GPU)")
        return
    print(f"\n4. FSDP2 on {gpus} GPUs x batch 2 vs 1 process x batch {2 * gpus} (fp32, constant lr, no clipping)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, strategies in (("full", ["full"]), ("full+ewc", ["full", "ewc"])):
        finals, peaks = [], []
        for processes, batch, parallel in ((1, 2 * gpus, "ddp"), (gpus, 2, "fsdp")):
            out = tmp / f"fsdp-{name}-{processes}"
            config = config_dict(model_dir, train, general, out, strategies, args)
            config["train"].update({"steps_per_task": 6, "batch_size": batch, "scheduler": "constant",
                                    "max_grad_norm": None, "mixed_precision": "no", "parallel": parallel})
            path = tmp / f"fsdp-{name}-{processes}.yaml"
            path.write_text(yaml.safe_dump(config))
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
                      if processes > 1 else [sys.executable])
            script = tmp / "peak.py"
            script.write_text(_PEAK_SCRIPT)
            done = subprocess.run([*launch, str(script), str(path)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"   {name}: {processes} process(es) FAILED: {done.stderr.strip().splitlines()[-1:]}")
                break
            finals.append(load_file(str(out / "final" / "model.safetensors")))
            peaks.append(max(_peaks(done.stdout), default=0))
        if len(finals) == 2:
            diff = max((finals[0][k].float() - finals[1][k].float()).abs().max().item() for k in finals[0])
            ratio = f"{peaks[1] / peaks[0]:.2f}" if peaks[0] and peaks[1] else "n/a"
            print(f"   {name:9s} max abs weight difference after 6 steps: {diff:.3e}; peak memory per process "
                  f"FSDP2 / one process: {ratio}")


_PEAK_SCRIPT = """import os, sys, torch
from retain.train.run import finetune, load_run_config
finetune(load_run_config(sys.argv[1]))
print("PEAK", os.environ.get("RANK", "0"), torch.cuda.max_memory_allocated(), flush=True)
"""


def _peaks(stdout: str) -> list[int]:
    return [int(line.split()[2]) for line in stdout.splitlines() if line.startswith("PEAK ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="a causal LM folder instead of stories260K")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: loop,memory,ddp,fsdp")
    args = parser.parse_args()
    cuda_or_exit()
    import torch

    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir, data = base_model_dir(args, tmp / "cache")
        train, general = text_files(data, tmp)
        print(f"gpu_check: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
              f"model {model_dir.name}")
        if "loop" not in skip:
            loop_overhead(model_dir, train, general, tmp, args)
        if "memory" not in skip:
            memory(model_dir, train, general, tmp, args)
        if "ddp" not in skip:
            two_gpus(model_dir, train, general, tmp, args)
        if "fsdp" not in skip:
            fsdp2_gpus(model_dir, train, general, tmp, args)


if __name__ == "__main__":
    main()
