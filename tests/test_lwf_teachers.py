"""Each distillation teacher on its own, on a tiny Llama: the reference it promises, exactly.

Teachers are ``retain.strategies._shared.teachers``; lwf holds one and replaces it at a task's start
(the last test checks which one it holds when). Training is stood in for by seeded weight moves, so
every expected value is computed, not assumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_config
from torch.testing import assert_close

from retain.data import build_task_data, collate
from retain.losses.distill import topk_teacher
from retain.strategies import StrategyContext, TaskInfo, build_strategy
from retain.strategies._shared.teachers import (
    ANCHOR_INDEX,
    AdaptersOff,
    CachedTopK,
    FrozenCopy,
    Snapshot,
    TopK,
    distill_kl,
)


def make_ctx(tmp_path: Path, model: torch.nn.Module, tokenizer, files: list[Path], strategies: list) -> StrategyContext:
    from accelerate import Accelerator

    config = run_config(str(tmp_path), files[0], tmp_path / "out", strategies)
    tasks = [
        TaskInfo(index=i, name=f"t{i}", steps=4,
                 data=build_task_data(config.tasks[0].data.model_copy(update={"path": str(path)}), tokenizer, seed=0))
        for i, path in enumerate(files)
    ]
    return StrategyContext(
        config=config, accelerator=Accelerator(cpu=True), tokenizer=tokenizer, model=model, tasks=tasks,
        run_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
        collate=lambda examples: collate(examples, tokenizer.pad_token_id),
    )


def logits_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    return out


def move(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Stand-in for training: a seeded step on every trainable weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def with_lora(model: torch.nn.Module, ctx: StrategyContext) -> torch.nn.Module:
    wrapped = build_strategy("lora", {"r": 4, "dropout": 0.0}).setup(model, ctx)
    ctx.model = wrapped
    return wrapped


@pytest.fixture
def ctx(tmp_path, llama, tokenizer, pc_file, text_file) -> StrategyContext:
    return make_ctx(tmp_path, llama, tokenizer, [pc_file, text_file], ["full"])


@pytest.fixture
def batch(ctx) -> dict:
    return ctx.collate(ctx.tasks[0].train_examples[:4])


def test_frozen_copy_keeps_the_model_it_was_built_from(ctx, llama, batch):
    base = logits_of(llama, batch)
    teacher = FrozenCopy(llama)
    move(llama, seed=1)
    assert not torch.allclose(logits_of(llama, batch), base, atol=1e-3)  # the student did move

    got = teacher.logits(batch)
    assert_close(got, base, rtol=0, atol=0)
    assert not got.requires_grad
    assert not any(p.requires_grad for p in teacher.module.parameters())
    assert teacher.state_dict() == {}  # rebuilt from the original model on resume


def test_adapters_off_is_the_base_under_trained_lora(ctx, llama, batch):
    base = logits_of(llama, batch)
    model = with_lora(llama, ctx)
    move(model, seed=2, scale=0.2)  # LoRA B starts at zero: this makes the adapters matter
    adapted = logits_of(model, batch)
    assert not torch.allclose(adapted, base, atol=1e-3)
    model.train()

    teacher = AdaptersOff(lambda: model)
    assert_close(teacher.logits(batch), base, rtol=0, atol=1e-6)
    assert model.training  # evaluation mode only for the teacher's forward
    assert_close(logits_of(model, batch), adapted, rtol=0, atol=0)  # the adapters are back on
    assert teacher.state_dict() == {}


def test_snapshot_is_the_model_at_the_second_tasks_start(ctx, llama, batch):
    move(llama, seed=3)  # task 1 trained
    at_start_of_task_2 = logits_of(llama, batch)
    teacher = Snapshot.take(lambda: llama, task=1)
    move(llama, seed=4)  # task 2 trains on
    assert not torch.allclose(logits_of(llama, batch), at_start_of_task_2, atol=1e-3)

    assert_close(teacher.logits(batch), at_start_of_task_2, rtol=0, atol=1e-6)
    state = teacher.state_dict()
    assert state["task_weights_index"] == 1
    assert state["task_weights"].keys() == {n for n, p in llama.named_parameters() if p.requires_grad}


def test_snapshot_under_lora_holds_only_the_adapters(ctx, llama, batch):
    model = with_lora(llama, ctx)
    move(model, seed=5, scale=0.2)
    at_start = logits_of(model, batch)
    teacher = Snapshot.take(lambda: model, task=1)
    move(model, seed=6, scale=0.2)

    assert_close(teacher.logits(batch), at_start, rtol=0, atol=1e-6)
    assert teacher.weights and all("lora_" in name for name in teacher.weights)


def cached_teacher(ctx: StrategyContext, examples: list, top_k: int, base: bool = True) -> CachedTopK:
    return CachedTopK(ctx, lambda: ("task0", examples), top_k=top_k, temperature=2.0, batch_size=4,
                      fingerprint="f" * 64, base=base)


def test_cached_topk_is_the_top_k_of_the_models_log_probs(ctx, llama, batch):
    examples = ctx.tasks[0].train_examples[:8]
    teacher = cached_teacher(ctx, examples, top_k=5).compute({"task0": examples})
    log_q, indices, log_rest = topk_teacher(logits_of(llama, batch), 5, 2.0)
    move(llama, seed=7)  # the table, not the live model, teaches

    got = teacher.logits(batch)
    known = batch["attention_mask"].bool()
    assert_close(got.known, batch["attention_mask"].float())
    assert torch.equal(got.indices[known], indices[known].long())
    assert_close(got.log_q[known], log_q[known])
    assert_close(got.log_rest[known], log_rest[known])
    assert teacher.state_dict() == {}  # the base: its fingerprint is recomputed on resume


def test_cached_topk_finds_rows_by_index_or_tokens_and_skips_strangers(ctx, llama):
    examples = ctx.tasks[0].train_examples[:8]
    teacher = cached_teacher(ctx, examples, top_k=3).compute({"task0": examples})
    in_order = teacher.logits(ctx.collate(examples[:4]))

    stranger = ctx.tasks[1].train_examples[0]  # e.g. a replayed row: not in the table
    mixed = ctx.collate([examples[2], stranger, examples[0]])
    by_tokens = teacher.logits(mixed)
    assert by_tokens.known[1].sum() == 0
    for row, source in [(0, 2), (2, 0)]:
        n = len(examples[source].input_ids)
        assert by_tokens.known[row, :n].all()
        assert_close(by_tokens.log_q[row, :n], in_order.log_q[source, :n], rtol=0, atol=0)

    shuffled = ctx.collate([examples[3], examples[1]])
    shuffled[ANCHOR_INDEX] = torch.tensor([3, 1])
    by_index = teacher.logits(shuffled)
    n = len(examples[3].input_ids)
    assert_close(by_index.log_q[0, :n], in_order.log_q[3, :n], rtol=0, atol=0)


def test_cached_topk_at_full_vocabulary_gives_the_exact_kl(ctx, llama, tokenizer, batch):
    examples = ctx.tasks[0].train_examples[:4]
    teacher_logits = logits_of(llama, batch)
    cached = cached_teacher(ctx, examples, top_k=len(tokenizer)).compute({"task0": examples}).logits(batch)
    assert isinstance(cached, TopK)
    student = teacher_logits + torch.randn(teacher_logits.shape, generator=torch.Generator().manual_seed(8))
    mask = batch["attention_mask"]
    exact = distill_kl(student, teacher_logits, mask, 2.0)
    assert exact.item() > 1e-3
    assert_close(distill_kl(student, cached, mask, 2.0), exact, rtol=1e-4, atol=0)


def test_cached_topk_of_a_later_task_start_is_checkpointed_and_must_stay_on_disk(ctx):
    examples = ctx.tasks[0].train_examples[:4]
    later = cached_teacher(ctx, examples, top_k=3, base=False)
    assert later.state_dict() == {"table_fingerprint": "f" * 64}
    with pytest.raises(RuntimeError, match="disappeared"):  # never computed: nothing on disk
        later.logits(ctx.collate(examples))


@pytest.mark.parametrize(
    "strategies, params, first, later",
    [
        (["full"], {}, FrozenCopy, Snapshot),
        (["full"], {"teacher_at": "base"}, FrozenCopy, FrozenCopy),
        (["lora"], {}, AdaptersOff, Snapshot),
        (["lora"], {"teacher": "copy", "teacher_at": "base"}, FrozenCopy, FrozenCopy),
        (["full"], {"teacher": "cached_topk", "top_k": 4}, CachedTopK, CachedTopK),
    ],
)
def test_lwf_holds_one_teacher_and_replaces_it_at_a_later_tasks_start(
    strategies, params, first, later, tmp_path, llama, tokenizer, pc_file, text_file
):
    ctx = make_ctx(tmp_path, llama, tokenizer, [pc_file, text_file], [*strategies, "lwf"])
    model = with_lora(llama, ctx) if "lora" in strategies else llama
    lwf = build_strategy("lwf", params)
    for task in ctx.tasks:
        ctx.task = task
        lwf.before_task(task, ctx)
        lwf.transform_batch(ctx.collate(task.train_examples[:4]), ctx)
        if task.index == 0:
            held = lwf._teacher
            assert type(held) is first
            move(model, seed=9, scale=0.2)  # task 1 trained
            probe = ctx.collate(ctx.tasks[1].train_examples[:4])
            at_start_of_task_2 = logits_of(model, probe)
    assert type(lwf._teacher) is later
    assert (lwf._teacher is held) == (params.get("teacher_at") == "base")
    if later is Snapshot:
        assert lwf._teacher.task == 1
        move(model, seed=10, scale=0.2)
        assert_close(lwf._teacher.logits(probe), at_start_of_task_2, rtol=0, atol=1e-6)
    if later is CachedTopK:
        assert held.base and not lwf._teacher.base and lwf._teacher.fingerprint != held.fingerprint
