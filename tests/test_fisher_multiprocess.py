"""Fisher and importance under accelerate with two CPU processes (gloo) equal the one-process result.

Each process takes every second example; sums and counts are added across processes before
dividing, and sampled labels depend only on (seed, example index), so the split must not change the
result beyond floating-point summation order.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from retain.data import collate

TEXTS = [f"line {i}: the quick brown fox {'jumps ' * (i % 4)}over {i} dogs" for i in range(11)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _statistics(accelerator) -> dict[str, torch.Tensor]:
    """Every statistic this package sums across processes, on a tiny Llama (+ LoRA for Delta W)."""
    from peft import LoraConfig, get_peft_model

    from retain.models.adapters import lora_layers
    from retain.models.tiny import char_tokenizer, tiny_model
    from retain.stats.fisher import diagonal_fisher, lora_delta_fisher
    from retain.stats.path_integral import path_integral_importance

    tok = char_tokenizer()
    examples = _examples(tok)
    model = tiny_model("llama", len(tok), seed=0, hidden=32, layers=2, heads=4)
    params = dict(model.named_parameters())
    batch = lambda items: collate(items, tok.pad_token_id)  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    sampled, n = diagonal_fisher(model, params, examples, batch, estimator="sampled", samples=2, seed=3, accelerator=accelerator)
    out.update({f"sampled/{k}": v for k, v in sampled.items()})
    out["sampled_count"] = torch.tensor([float(n)])
    batched, _ = diagonal_fisher(model, params, examples, batch, estimator="empirical_batch", batch_size=4, accelerator=accelerator)
    out.update({f"batch/{k}": v for k, v in batched.items()})
    importance, _ = path_integral_importance(
        model, params, examples, batch, lr=0.05, batch_size=4, accelerator=accelerator, optimizer="sgd"
    )
    out.update({f"importance/{k}": v for k, v in importance.items()})
    adam, _ = path_integral_importance(model, params, examples, batch, lr=1e-3, batch_size=4, accelerator=accelerator)
    out.update({f"importance_adamw/{k}": v for k, v in adam.items()})
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0))
    delta, _ = lora_delta_fisher(peft_model, lora_layers(peft_model), examples, batch, estimator="sampled", seed=1, batch_size=3, accelerator=accelerator)
    out.update({f"delta/{k}": v for k, v in delta.items()})
    out.update(_token_tables(model, batch, examples, accelerator))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _token_tables(model, batch, examples, accelerator) -> dict[str, torch.Tensor]:
    """STM's and LwF's per-token tables, split across processes and gathered; cached by one writer."""
    from retain.losses.distill import next_token_cross_entropy
    from retain.stats.token_tables import cached_table, compute_table

    def per_token(logits, batch_):
        return {"ce": next_token_cross_entropy(logits, batch_["input_ids"])}

    world = 1 if accelerator is None else accelerator.num_processes
    path = Path(os.environ["RETAIN_TEST_DATA"]) / f"cache-{world}" / "ce.safetensors"
    calls = []

    def compute():
        calls.append(1)
        return compute_table(model, examples, batch, per_token, batch_size=3, device=torch.device("cpu"),
                             adapters_off=False, accelerator=accelerator)

    table, first_hit = cached_table(path, {"kind": "test"}, compute, accelerator)
    again, second_hit = cached_table(path, {"kind": "test"}, compute, accelerator)
    assert (first_hit, second_hit, len(calls)) == (False, True, 1) and torch.equal(table.tensors["ce"], again.tensors["ce"])
    return {"table/ce": table.tensors["ce"], "table/lengths": table.lengths.float()}


def _examples(tok):
    from retain.config import DataConfig
    from retain.data import build_task_data

    root = Path(os.environ["RETAIN_TEST_DATA"])
    return build_task_data(DataConfig(path=str(root / "texts.jsonl"), max_length=24, pack=False), tok, seed=0).train


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    stats = _statistics(accelerator)
    if accelerator.is_main_process:
        save_file(stats, out)
    accelerator.wait_for_everyone()


def test_two_gloo_processes_give_the_one_process_statistics(tmp_path, monkeypatch):
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    monkeypatch.setenv("RETAIN_TEST_DATA", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _statistics(None)
    finally:
        torch.set_num_threads(previous)
    out = tmp_path / "two.safetensors"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    double = load_file(str(out))
    assert single.keys() == double.keys()
    assert single["sampled_count"].item() == len(TEXTS)
    # within 1e-6, relative to the tensor's scale where it exceeds 1 (importance reaches ~10, where
    # one float32 rounding step of a different summation order is ~1e-6)
    worst = {k: ((single[k] - double[k]).abs().max() / single[k].abs().max().clamp_min(1.0)).item() for k in single}
    # Adam divides each gradient by the root of its running square: a float32 summation-order
    # difference in a tiny gradient moves its step visibly, so the AdamW path agrees to 1e-4
    adam = {k: v for k, v in worst.items() if k.startswith("importance_adamw/")}
    exact = {k: v for k, v in worst.items() if k not in adam}
    assert max(exact.values()) <= 1e-6, sorted(exact.items(), key=lambda kv: -kv[1])[:3]
    assert max(adam.values()) <= 1e-4, sorted(adam.items(), key=lambda kv: -kv[1])[:3]
    assert all(single[k].abs().max() > 0 for k in single if k.startswith("sampled/model.layers"))
