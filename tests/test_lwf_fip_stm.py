"""Behaviour of lwf, fip and stm on tiny models: teachers, anchors, masks, caches, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_config
from resume_utils import assert_kill_resume_matches

from retain.data import Example, build_task_data, collate
from retain.errors import ConfigError
from retain.losses.distill import IGNORE_INDEX, kl_with_temperature, next_token_cross_entropy
from retain.models.fingerprint import base_fingerprint
from retain.models.tiny import tiny_model
from retain.strategies import StrategyContext, TaskInfo, build_strategy

# --------------------------------------------------------------------------------------------
# helpers: hooks driven by hand, as the loop does, on a tiny model


def make_ctx(tmp_path: Path, model, tokenizer, task_files: list[Path], general: Path | None = None, strategies=("full",)):
    from accelerate import Accelerator

    config = run_config(str(tmp_path), task_files[0], tmp_path / "out", list(strategies))
    if general is not None:
        config = config.model_copy(update={"general_data": config.tasks[0].data.model_copy(update={"path": str(general)})})
    tasks = []
    for index, path in enumerate(task_files):
        data = build_task_data(config.tasks[0].data.model_copy(update={"path": str(path)}), tokenizer, seed=0)
        tasks.append(TaskInfo(index=index, name=f"t{index}", steps=10, data=data))
    return StrategyContext(
        config=config,
        accelerator=Accelerator(cpu=True),
        tokenizer=tokenizer,
        model=model,
        tasks=tasks,
        run_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        collate=lambda examples: collate(examples, tokenizer.pad_token_id),
    )


def batch_of(ctx, task: TaskInfo, step: int, size: int = 4):
    examples = task.train_examples
    return ctx.collate([examples[(step * size + i) % len(examples)] for i in range(size)])


def train(model, strategy, ctx, task: TaskInfo, steps: int, lr: float = 1e-2, start: bool = True) -> list[dict]:
    """The loop's hook order for ``steps`` optimizer steps; returns each step's extra loss terms."""
    ctx.task = task
    if start:
        strategy.before_task(task, ctx)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for step in range(steps):
        ctx.step_in_task = step
        batch = strategy.transform_batch(batch_of(ctx, task, step), ctx)
        outputs = model(**batch)
        terms = strategy.extra_losses(outputs, batch, ctx)
        (outputs.loss + sum(terms.values())).backward()
        strategy.after_backward(model, ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        strategy.after_step(model, ctx)
        history.append({k: v.item() for k, v in terms.items()})
    return history


def with_lora(model, ctx, r: int = 4):
    wrapped = build_strategy("lora", {"r": r, "dropout": 0.0}).setup(model, ctx)
    ctx.model = wrapped
    return wrapped


def tensor_bytes_held_by(obj) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` (modules, dicts, lists, attributes)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()

    def walk(node) -> None:
        if id(node) in seen or isinstance(node, (str, bytes, int, float, type)) or node is None:
            return
        seen.add(id(node))
        if isinstance(node, torch.Tensor):
            storage = node.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(node, torch.nn.Module):
            for tensor in [*node.parameters(), *node.buffers()]:
                walk(tensor)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple, set)):
            for value in node:
                walk(value)
        elif hasattr(node, "__dict__"):
            walk(vars(node))

    walk(obj)
    return sum(storages.values())


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture
def base_llama(tokenizer):
    return tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)


# --------------------------------------------------------------------------------------------
# lwf


def test_lwf_lora_teacher_is_the_frozen_base_and_costs_no_copy(tmp_path, tokenizer, base_llama, pc_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], strategies=["lora", "lwf"])
    probe = batch_of(ctx, ctx.tasks[0], 0)
    with torch.no_grad():
        original_logits = base_llama(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    model = with_lora(base_llama, ctx)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pointers_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    lwf = build_strategy("lwf", {})

    ctx.task = ctx.tasks[0]
    lwf.before_task(ctx.tasks[0], ctx)
    held = tensor_bytes_held_by(lwf)
    assert lwf._source == "adapters_off" and lwf._teacher_copy is None
    assert held < 0.01 * model_bytes(model), f"lwf holds {held} bytes of tensors: a copy of the model?"

    history = train(model, lwf, ctx, ctx.tasks[0], steps=6, lr=2e-2, start=False)
    assert tensor_bytes_held_by(lwf) == held
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # LoRA starts at the base function
    assert history[-1]["kl"] > 1e-5
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers_before
    for name, value in base_before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), f"teacher weight {name} moved"
    teacher = lwf._teacher_logits(ctx, probe["input_ids"], probe["attention_mask"])
    assert torch.allclose(teacher, original_logits, atol=1e-6)


def test_lwf_copy_teacher_for_full_finetuning_stays_frozen(tmp_path, tokenizer, base_llama, pc_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file])
    probe = batch_of(ctx, ctx.tasks[0], 0)
    with torch.no_grad():
        original_logits = base_llama(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    lwf = build_strategy("lwf", {"alpha": 0.5})
    ctx.task = ctx.tasks[0]
    lwf.before_task(ctx.tasks[0], ctx)
    assert tensor_bytes_held_by(lwf) >= model_bytes(base_llama)  # the copy is real, and the helper sees it
    assert not any(p.requires_grad for p in lwf._teacher_copy.parameters())
    train(base_llama, lwf, ctx, ctx.tasks[0], steps=4, start=False)
    with torch.no_grad():
        student_logits = base_llama(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    teacher = lwf._teacher_logits(ctx, probe["input_ids"], probe["attention_mask"])
    assert torch.allclose(teacher, original_logits, atol=1e-6)
    expected = 0.5 * kl_with_temperature(student_logits, original_logits, probe["attention_mask"], 2.0)
    got = lwf.extra_losses(type("Out", (), {"logits": student_logits})(), probe, ctx)["kl"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def _logits(model, probe):
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


def test_lwf_teacher_is_the_model_at_the_start_of_the_current_task(tmp_path, tokenizer, base_llama, pc_file, text_file):
    """LwF (Li & Hoiem; Avalanche) distils from the model as the current task starts: the base for the
    first task, then the model that learned tasks 1..t-1, so task 2 does not pull task 1's learning back."""
    from retain.train.checkpoint import flatten_state, unflatten_state

    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file, text_file])
    probe = batch_of(ctx, ctx.tasks[1], 0)
    base_logits = _logits(base_llama, probe)
    lwf = build_strategy("lwf", {"alpha": 0.5})
    base_only = build_strategy("lwf", {"alpha": 0.5, "teacher_at": "base"})
    base_only.before_task(ctx.tasks[0], ctx)
    train(base_llama, lwf, ctx, ctx.tasks[0], steps=4, lr=2e-2)
    start_of_task_2 = _logits(base_llama, probe)
    assert not torch.allclose(start_of_task_2, base_logits, atol=1e-4)
    ctx.task = ctx.tasks[1]
    history = train(base_llama, lwf, ctx, ctx.tasks[1], steps=3, lr=2e-2)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the teacher is where task 2 started
    assert torch.allclose(lwf._teacher_logits(ctx, probe["input_ids"], probe["attention_mask"]), start_of_task_2, atol=1e-5)
    assert lwf._teacher_copy is None  # the snapshot replaced the base copy
    # teacher_at: base keeps the loaded model
    assert torch.allclose(base_only._teacher_logits(ctx, probe["input_ids"], probe["attention_mask"]), base_logits, atol=1e-5)
    # the snapshot is part of the checkpoint
    resumed = build_strategy("lwf", {"alpha": 0.5})
    tensors, skeleton = flatten_state(lwf.state_dict())
    fresh = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    ctx.model = fresh
    resumed.load_state_dict(unflatten_state(json.loads(json.dumps(skeleton)), tensors), ctx)
    assert torch.allclose(resumed._teacher_logits(ctx, probe["input_ids"], probe["attention_mask"]), start_of_task_2, atol=1e-5)


def test_lwf_lora_task_start_teacher_holds_only_the_adapters(tmp_path, tokenizer, base_llama, pc_file, text_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file, text_file], strategies=["lora", "lwf"])
    model = with_lora(base_llama, ctx)
    probe = batch_of(ctx, ctx.tasks[1], 0)
    lwf = build_strategy("lwf", {})
    train(model, lwf, ctx, ctx.tasks[0], steps=4, lr=2e-2)
    start_of_task_2 = _logits(model, probe)
    with model.disable_adapter():
        base_logits = _logits(model, probe)
    assert not torch.allclose(start_of_task_2, base_logits, atol=1e-4)
    history = train(model, lwf, ctx, ctx.tasks[1], steps=3, lr=2e-2)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(lwf._teacher_logits(ctx, probe["input_ids"], probe["attention_mask"]), start_of_task_2, atol=1e-5)
    assert tensor_bytes_held_by(lwf) < 0.2 * model_bytes(model)  # the adapters, not a copy of the model


def test_lwf_base_teacher_with_a_merging_strategy_is_refused():
    from conftest import run_config

    from retain.strategies.registry import validate_run_config

    def two_tasks(lwf: dict):
        config = run_config("m", "t.jsonl", "out", ["lora", "ewc-lora", {"name": "lwf", **lwf}])
        return config.model_copy(update={"tasks": [config.tasks[0], config.tasks[0].model_copy(update={"name": "u"})]})

    with pytest.raises(ConfigError, match="teacher_at: base"):
        validate_run_config(two_tasks({"teacher_at": "base"}))
    validate_run_config(two_tasks({"teacher_at": "base", "teacher": "copy"}))  # a true copy of the base
    validate_run_config(two_tasks({}))  # task_start: consistent with the merges


def test_lwf_adapters_off_needs_a_peft_model(tmp_path, tokenizer, base_llama, pc_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file])
    with pytest.raises(ConfigError, match="PEFT"):
        build_strategy("lwf", {"teacher": "adapters_off"}).before_task(ctx.tasks[0], ctx)
    with pytest.raises(ConfigError, match="anchor: general"):
        build_strategy("lwf", {"anchor": "task", "pool_size": 3})


@pytest.mark.parametrize("anchor", ["task", "general"])
def test_cached_topk_teacher_equals_live_teacher_at_full_vocabulary(anchor, tmp_path, tokenizer, base_llama, pc_file, text_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    params = {"anchor": anchor, "seed": 1} | ({"pool_size": 12} if anchor == "general" else {})
    live = build_strategy("lwf", {**params, "teacher": "copy"})
    full_k = build_strategy("lwf", {**params, "teacher": "cached_topk", "top_k": len(tokenizer)})
    small_k = build_strategy("lwf", {**params, "teacher": "cached_topk", "top_k": 5})
    ctx.task = ctx.tasks[0]
    for strategy in (live, full_k, small_k):
        strategy.before_task(ctx.tasks[0], ctx)
    train(base_llama, build_strategy("full", {}), ctx, ctx.tasks[0], steps=3)  # move the student off the teacher
    batch = batch_of(ctx, ctx.tasks[0], 5)
    outputs = base_llama(**batch)
    values = {name: s.extra_losses(outputs, batch, ctx)["kl"] for name, s in [("live", live), ("full", full_k), ("small", small_k)]}
    assert values["live"].item() > 1e-4
    assert values["full"].item() == pytest.approx(values["live"].item(), rel=1e-4)
    assert 0.0 < values["small"].item() <= values["live"].item() + 1e-6  # the k+1-bucket KL is a lower bound
    assert len(list((tmp_path / "cache" / "lwf").glob("*.safetensors"))) == 2


def test_lwf_with_prompt_tuning_compares_input_positions_only(tmp_path, tokenizer, base_llama, pc_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], strategies=["prompt-tuning", "lwf"])
    batch = batch_of(ctx, ctx.tasks[0], 0)
    with torch.no_grad():
        base_logits = base_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = build_strategy("prompt-tuning", {"num_virtual_tokens": 3}).setup(base_llama, ctx)
    ctx.model = model
    lwf = build_strategy("lwf", {"temperature": 1.0})
    ctx.task = ctx.tasks[0]
    lwf.before_task(ctx.tasks[0], ctx)
    outputs = model(**batch)
    assert outputs.logits.shape[1] == batch["input_ids"].shape[1] + 3
    expected = kl_with_temperature(outputs.logits[:, 3:], base_logits, batch["attention_mask"], 1.0)
    assert lwf.extra_losses(outputs, batch, ctx)["kl"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_lwf_general_anchors_reduce_drift_from_the_base(tmp_path, tokenizer, pc_file, text_file):
    def drift(alpha: float) -> float:
        model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
        reference = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
        ctx = make_ctx(tmp_path / f"a{alpha}", model, tokenizer, [pc_file], general=text_file)
        train(model, build_strategy("lwf", {"anchor": "general", "alpha": alpha, "temperature": 1.0}), ctx, ctx.tasks[0], 8)
        probe = ctx.collate(ctx.general_examples(None, "test")[:8])
        with torch.no_grad():
            ref, new = reference(**probe).logits, model(**probe).logits
        return kl_with_temperature(new, ref, probe["attention_mask"], 1.0).item()

    without, with_lwf = drift(0.0), drift(5.0)
    assert with_lwf < 0.5 * without, (without, with_lwf)


# --------------------------------------------------------------------------------------------
# fip


def test_fip_term_is_zero_at_the_anchor_and_keeps_the_pool_closer(tmp_path, tokenizer, pc_file, text_file):
    def run(weight: float) -> tuple[list[dict], float]:
        model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
        ctx = make_ctx(tmp_path / f"w{weight}", model, tokenizer, [pc_file], general=text_file)
        fip = build_strategy("fip", {"weight": weight, "pool_size": 16, "pool_batch": 4})
        history = train(model, fip, ctx, ctx.tasks[0], 8)
        probe = {k: v for k, v in ctx.collate(fip._pool).items()}
        with torch.no_grad():
            from retain.losses.distill import bhattacharyya_distance

            anchor = fip._anchor_logits(model, probe)
            now = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        return history, bhattacharyya_distance(now, anchor, probe["attention_mask"]).item()

    history, distance_with = run(5.0)
    assert history[0]["bhattacharyya"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["bhattacharyya"] > 0.0
    _, distance_without = run(1e-9)
    assert distance_with < 0.5 * distance_without, (distance_without, distance_with)


def test_fip_path_mode_reanchors_on_schedule(tmp_path, tokenizer, base_llama, pc_file, text_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    fip = build_strategy("fip", {"anchor": "path", "reanchor_every": 3, "pool_size": 8, "pool_batch": 2})
    snapshots = []
    original_after_step = fip.after_step

    def after_step(model, ctx):
        original_after_step(model, ctx)
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    fip.after_step = after_step
    train(base_llama, fip, ctx, ctx.tasks[0], steps=7)
    assert fip._reanchors == 2 and fip._anchor_step == 6
    assert all(torch.equal(value, snapshots[5][name]) for name, value in fip._anchor.items())  # after step 6
    assert not all(torch.equal(value, snapshots[6][name]) for name, value in fip._anchor.items())

    start = build_strategy("fip", {"anchor": "start", "pool_size": 8, "pool_batch": 2})
    model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx.model = model
    train(model, start, ctx, ctx.tasks[0], steps=7)
    assert start._reanchors == 0
    assert all(torch.equal(start._anchor[n], initial[n]) for n in start._anchor)


def test_fip_anchor_says_whether_it_is_the_task_start_or_the_run_start(tmp_path, tokenizer, pc_file, text_file):
    assert build_strategy("fip", {"anchor": "start"}).config.anchor == "task_start"  # the old name
    anchors = {}
    for anchor in ("task_start", "run_start"):
        model = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        ctx = make_ctx(tmp_path / anchor, model, tokenizer, [pc_file, text_file], general=text_file)
        fip = build_strategy("fip", {"anchor": anchor, "pool_size": 8, "pool_batch": 2})
        train(model, fip, ctx, ctx.tasks[0], steps=3, lr=2e-2)
        start_of_task_2 = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, fip, ctx, ctx.tasks[1], steps=2, lr=2e-2)
        anchors[anchor] = (fip._anchor, initial, start_of_task_2)
    kept, initial, second = anchors["run_start"]
    assert all(torch.equal(kept[n], initial[n]) for n in kept)
    kept, initial, second = anchors["task_start"]
    assert all(torch.equal(kept[n], second[n]) for n in kept)
    assert not all(torch.equal(kept[n], initial[n]) for n in kept)


def test_fip_default_reduction_is_the_authors_sum_over_sequences(tmp_path, tokenizer, base_llama, pc_file, text_file):
    """Authors: sum over the old batch of each example's distance; mean_tokens (the old default) is
    pool_batch times weaker for sequences of equal length."""
    from retain.losses.distill import bhattacharyya_distance

    assert build_strategy("fip", {}).config.reduction == "sum_sequences"
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    fip = build_strategy("fip", {"pool_size": 8, "pool_batch": 4, "weight": 1.0})  # the authors' weight
    train(base_llama, fip, ctx, ctx.tasks[0], steps=3, lr=2e-2)
    ctx.task = ctx.tasks[0]
    batch = fip.transform_batch(batch_of(ctx, ctx.tasks[0], 0), ctx)
    outputs = base_llama(**batch)
    term = fip.extra_losses(outputs, batch, ctx)["bhattacharyya"].item()
    pool = ctx.collate([fip._pool[i] for i in fip._picks[ctx.micro_batch]])
    with torch.no_grad():
        now = base_llama(input_ids=pool["input_ids"], attention_mask=pool["attention_mask"]).logits
        anchor = fip._anchor_logits(base_llama, pool)
    per_sequence = [
        bhattacharyya_distance(now[i : i + 1], anchor[i : i + 1], pool["attention_mask"][i : i + 1]).item() for i in range(4)
    ]
    assert term == pytest.approx(sum(per_sequence), rel=1e-4)
    mean = bhattacharyya_distance(now, anchor, pool["attention_mask"]).item()
    assert term > 2.0 * mean


def test_fip_step_bound_projects_each_update_onto_the_ball(tmp_path, tokenizer, base_llama, pc_file, text_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    bound = 1e-3
    fip = build_strategy("fip", {"max_step_norm": bound, "pool_size": 8, "pool_batch": 2})
    norms = []
    original_after_backward = fip.after_backward

    def after_backward(model, ctx):
        original_after_backward(model, ctx)
        norms.append({n: p.detach().clone() for n, p in model.named_parameters()})

    fip.after_backward = after_backward
    original_after_step = fip.after_step
    steps = []

    def after_step(model, ctx):
        before = norms[-1]
        original_after_step(model, ctx)
        moved = torch.stack([((p - before[n]) ** 2).sum() for n, p in model.named_parameters()]).sum().sqrt().item()
        steps.append((fip._last_step_norm, moved))

    fip.after_step = after_step
    train(base_llama, fip, ctx, ctx.tasks[0], steps=4, lr=5e-2)
    for unbounded, moved in steps:
        assert unbounded > bound  # AdamW at this lr steps far further than the bound
        assert moved == pytest.approx(bound, rel=1e-3)


def test_fip_past_pool_and_state_round_trip(tmp_path, tokenizer, base_llama, pc_file, text_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file, text_file])
    fip = build_strategy("fip", {"pool": "past", "pool_size": 6, "pool_batch": 2})
    assert train(base_llama, fip, ctx, ctx.tasks[0], steps=2) == [{}, {}]  # first task, no general data: off
    history = train(base_llama, fip, ctx, ctx.tasks[1], steps=3)
    assert all("bhattacharyya" in h for h in history)
    past = {tuple(e.input_ids) for e in ctx.tasks[0].train_examples}
    assert len(fip._pool) == 6 and all(tuple(e.input_ids) in past for e in fip._pool)

    resumed = build_strategy("fip", {"pool": "past", "pool_size": 6, "pool_batch": 2})
    from retain.train.checkpoint import flatten_state, unflatten_state

    tensors, skeleton = flatten_state(fip.state_dict())
    resumed.load_state_dict(unflatten_state(json.loads(json.dumps(skeleton)), tensors), ctx)
    assert resumed._pool_indices == fip._pool_indices and resumed._cursor == fip._cursor
    assert [e.input_ids for e in resumed._pool] == [e.input_ids for e in fip._pool]
    assert all(torch.equal(resumed._anchor[n], fip._anchor[n]) for n in fip._anchor)


# --------------------------------------------------------------------------------------------
# stm


def count_ce_passes(monkeypatch) -> list[int]:
    import retain.strategies.stm as stm_module

    calls: list[int] = []
    real = stm_module.token_ce_table

    def counting(ctx, examples, batch_size, adapters_off):
        calls.append(len(examples))
        return real(ctx, examples, batch_size, adapters_off)

    monkeypatch.setattr(stm_module, "token_ce_table", counting)
    return calls


def test_stm_masks_exactly_the_surprising_completion_tokens(tmp_path, tokenizer, base_llama, pc_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file])
    threshold = 100.0  # about the median perplexity of the random tiny model
    stm = build_strategy("stm", {"threshold": threshold})
    ctx.task = ctx.tasks[0]
    stm.before_task(ctx.tasks[0], ctx)
    batch = batch_of(ctx, ctx.tasks[0], 1)
    with torch.no_grad():
        ce = next_token_cross_entropy(base_llama(**batch).logits, batch["input_ids"])
    out = stm.transform_batch(batch, ctx)
    labelled = batch["labels"] != IGNORE_INDEX
    labelled[:, 0] = False
    expected_drop = labelled & (ce.exp() > threshold)
    assert 0 < int(expected_drop.sum()) < int(labelled.sum())
    assert torch.equal(out["labels"] == IGNORE_INDEX, (batch["labels"] == IGNORE_INDEX) | expected_drop)
    assert torch.equal(out["input_ids"], batch["input_ids"])

    total = 0
    for example in ctx.tasks[0].train_examples:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            ce_one = next_token_cross_entropy(base_llama(input_ids=ids).logits, ids)[0]
        eligible = torch.tensor(example.labels) != IGNORE_INDEX
        eligible[0] = False
        total += int((eligible & (ce_one.exp() > threshold)).sum())
    assert ctx.metrics["stm/masked_tokens"] == total

    stranger = ctx.collate([Example(input_ids=[1, 5, 6, 7], labels=[1, 5, 6, 7])])
    assert torch.equal(stm.transform_batch(stranger, ctx)["labels"], stranger["labels"])  # e.g. a replayed row


def test_stm_matched_ablations_drop_as_many_tokens_per_example(tmp_path, tokenizer, base_llama, pc_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file])
    counts = {}
    masks = {}
    for mode in ("highest", "random_matched", "lowest_matched", "lowest_all"):
        stm = build_strategy("stm", {"threshold": 100.0, "mode": mode})
        stm.before_task(ctx.tasks[0], ctx)
        counts[mode] = [int(m.sum()) for m in torch.split(stm._drop[0].bool(), stm._lengths[0].tolist())]
        masks[mode] = stm._drop[0]
        eligible = stm._counts[0][1]
    assert counts["highest"] == counts["random_matched"] == counts["lowest_matched"]
    assert not torch.equal(masks["highest"], masks["lowest_matched"])
    # the official ablation: every eligible token below the threshold, the complement of highest
    assert not (masks["lowest_all"].bool() & masks["highest"].bool()).any()
    assert sum(counts["lowest_all"]) + sum(counts["highest"]) == eligible
    assert counts["lowest_all"] != counts["highest"]


def test_stm_keeps_one_token_when_a_batch_would_lose_them_all(tmp_path, tokenizer, base_llama, pc_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file])
    stm = build_strategy("stm", {"threshold": 1.0001})  # every completion token is "surprising"
    ctx.task = ctx.tasks[0]
    stm.before_task(ctx.tasks[0], ctx)
    out = stm.transform_batch(batch_of(ctx, ctx.tasks[0], 0), ctx)
    assert int((out["labels"][:, 1:] != IGNORE_INDEX).sum()) == 1
    assert torch.isfinite(base_llama(**out).loss)
    assert ctx.metrics["stm/emptied_batches"] == 1


def test_stm_cache_is_reused_and_invalidated_by_model_or_data(tmp_path, tokenizer, base_llama, pc_file, text_file, monkeypatch):
    calls = count_ce_passes(monkeypatch)

    def run(model, files):
        ctx = make_ctx(tmp_path, model, tokenizer, files)
        stm = build_strategy("stm", {"threshold": 100.0})
        ctx.task = ctx.tasks[0]
        stm.before_task(ctx.tasks[0], ctx)
        return stm, ctx

    first, _ = run(base_llama, [pc_file])
    assert len(calls) == 1
    second, ctx = run(base_llama, [pc_file])
    assert len(calls) == 1 and ctx.metrics["stm/cache_hits"] == 1
    assert torch.equal(first._drop[0], second._drop[0])

    lora_ctx = make_ctx(tmp_path, tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4), tokenizer, [pc_file])
    lora_model = with_lora(lora_ctx.model, lora_ctx)
    assert base_fingerprint(lora_model) == base_fingerprint(base_llama)  # adapters do not change the base
    build_strategy("stm", {"threshold": 100.0}).before_task(lora_ctx.tasks[0], lora_ctx)
    assert len(calls) == 1

    with torch.no_grad():
        base_llama.lm_head.weight[0, 0] += 1e-3  # any weight change
    run(base_llama, [pc_file])
    assert len(calls) == 2
    changed = tmp_path / "changed.jsonl"
    changed.write_text(pc_file.read_text().replace("add", "sum"))
    run(base_llama, [changed])
    assert len(calls) == 3
    assert len(list((tmp_path / "cache" / "stm").glob("*.safetensors"))) == 3


def test_stm_original_reference_scores_every_task_once_with_the_base(tmp_path, tokenizer, base_llama, pc_file, text_file, monkeypatch):
    calls = count_ce_passes(monkeypatch)
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file, text_file])
    stm = build_strategy("stm", {"threshold": 100.0, "cache": False})
    train(base_llama, stm, ctx, ctx.tasks[0], steps=3)
    assert len(calls) == 2  # both tasks, before any training
    second_task_mask = stm._drop[1].clone()
    train(base_llama, stm, ctx, ctx.tasks[1], steps=1)
    assert len(calls) == 2 and torch.equal(stm._drop[1], second_task_mask)
    current = build_strategy("stm", {"threshold": 100.0, "cache": False, "reference": "current"})
    current.before_task(ctx.tasks[1], ctx)
    assert len(calls) == 3 and not torch.equal(current._drop[1], second_task_mask)


# --------------------------------------------------------------------------------------------
# seeds, loss hooks without side effects, metrics in the window they belong to


def with_train_seed(ctx, seed: int):
    ctx.config = ctx.config.model_copy(update={"train": ctx.config.train.model_copy(update={"seed": seed})})
    return ctx


def test_fip_pool_stm_ablation_and_lwf_anchors_follow_train_seed(tmp_path, tokenizer, base_llama, pc_file, text_file):
    """train.seed (bench --seed) moves each choice; a strategy's own seed overrides it."""
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    ctx.task = ctx.tasks[0]
    student = tiny_model("llama", len(tokenizer), seed=1, hidden=32, layers=2, heads=4)
    probe = batch_of(ctx, ctx.tasks[0], 0)

    def choices(train_seed: int, own: int | None):
        with_train_seed(ctx, train_seed)
        own_seed = {} if own is None else {"seed": own}
        fip = build_strategy("fip", {"pool_size": 6, **own_seed})
        fip.before_task(ctx.tasks[0], ctx)
        stm = build_strategy("stm", {"threshold": 100.0, "mode": "random", "cache": False, **own_seed})
        stm.before_task(ctx.tasks[0], ctx)
        lwf = build_strategy("lwf", {"anchor": "general", "pool_size": 6, "teacher": "copy", **own_seed})
        lwf.before_task(ctx.tasks[0], ctx)  # the teacher: a copy of base_llama
        lwf.transform_batch(probe, ctx)
        ctx.model = student  # general anchors go through the training model
        kl = lwf.extra_losses(None, probe, ctx)["kl"].item()
        ctx.model = base_llama
        return fip.state_dict()["pool_indices"], stm.state_dict()["drop"]["0"], kl

    default, other, overridden = choices(0, None), choices(5, None), choices(0, 5)
    assert default[0] != other[0] and not torch.equal(default[1], other[1]) and default[2] != other[2]
    assert overridden[0] == other[0] and torch.equal(overridden[1], other[1]) and overridden[2] == other[2]


def test_loss_hooks_change_no_state(tmp_path, tokenizer, base_llama, pc_file, text_file):
    """extra_losses evaluated twice gives the same terms and leaves state_dict() as it was."""
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    fip = build_strategy("fip", {"pool_size": 8, "pool_batch": 2})
    lwf = build_strategy("lwf", {"anchor": "general", "anchor_batch_size": 2})
    train(base_llama, fip, ctx, ctx.tasks[0], steps=2)
    train(base_llama, lwf, ctx, ctx.tasks[0], steps=2)
    for strategy in (fip, lwf):
        batch = strategy.transform_batch(batch_of(ctx, ctx.tasks[0], 3), ctx)
        outputs = base_llama(**batch)
        before = strategy.state_dict()
        first = {k: v.item() for k, v in strategy.extra_losses(outputs, batch, ctx).items()}
        second = {k: v.item() for k, v in strategy.extra_losses(outputs, batch, ctx).items()}
        assert first == second and first and all(v > 0 for v in first.values())
        after = strategy.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            if isinstance(value, dict):
                assert all(torch.equal(value[n], after[key][n]) for n in value), key
            else:
                assert value == after[key], key


def test_fip_takes_its_anchor_and_advances_its_cursor_before_the_forward(tmp_path, tokenizer, base_llama, pc_file, text_file):
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    fip = build_strategy("fip", {"pool_size": 8, "pool_batch": 3})
    ctx.task = ctx.tasks[0]
    fip.before_task(ctx.tasks[0], ctx)
    assert fip.state_dict()["has_anchor"] is False
    fip.transform_batch(batch_of(ctx, ctx.tasks[0], 0), ctx)
    state = fip.state_dict()
    assert state["has_anchor"] and state["cursor"] == 3
    assert all(torch.equal(state["anchor"][n], p) for n, p in base_llama.named_parameters())


def test_metrics_are_reported_in_their_own_window(tmp_path, tokenizer, base_llama, pc_file, text_file):
    """The loop clears ctx.metrics after each log row: stm and fip report again after a resume, fip's
    step norm and re-anchor count are reported in every step."""
    ctx = make_ctx(tmp_path, base_llama, tokenizer, [pc_file], general=text_file)
    stm = build_strategy("stm", {"threshold": 100.0, "cache": False})
    fip = build_strategy("fip", {"pool_size": 8, "pool_batch": 2, "anchor": "path", "reanchor_every": 5, "max_step_norm": 1e-3})
    ctx.task = ctx.tasks[0]
    for strategy in (stm, fip):
        strategy.before_task(ctx.tasks[0], ctx)
    assert {"stm/masked_fraction", "stm/masked_tokens", "fip/pool_size"} <= set(ctx.metrics)
    ctx.metrics.clear()  # as the loop does after writing a row
    train(base_llama, fip, ctx, ctx.tasks[0], steps=1, start=False)
    assert {"fip/step_norm_before_bound", "fip/reanchors"} <= set(ctx.metrics)
    states = {"stm": stm.state_dict(), "fip": fip.state_dict()}

    ctx.metrics.clear()
    resumed_stm = build_strategy("stm", {"threshold": 100.0, "cache": False})
    resumed_fip = build_strategy("fip", {"pool_size": 8, "pool_batch": 2, "anchor": "path", "reanchor_every": 5, "max_step_norm": 1e-3})
    resumed_stm.load_state_dict(states["stm"], ctx)
    resumed_fip.load_state_dict(states["fip"], ctx)
    resumed_stm.transform_batch(batch_of(ctx, ctx.tasks[0], 1), ctx)
    assert ctx.metrics["stm/masked_fraction"] == pytest.approx(states["stm"]["counts"]["0"][0] / states["stm"]["counts"]["0"][1])
    assert ctx.metrics["fip/pool_size"] == 8


# --------------------------------------------------------------------------------------------
# the hybrid through the real loop, killed and resumed


def test_lora_lwf_stm_hybrid_resumes_exactly_after_a_kill(tmp_path, tiny_model_dir, text_file):
    strategies = [{"name": "lora", "r": 4, "dropout": 0.1}, {"name": "lwf", "anchor": "general", "anchor_batch_size": 2},
                  {"name": "stm", "threshold": 100.0}]
    assert_kill_resume_matches(tmp_path, tiny_model_dir, text_file, strategies, steps=12,
                               general_data={"path": str(text_file), "max_length": 16})
    assert (tmp_path / "ref" / "final" / "adapter_model.safetensors").exists()
