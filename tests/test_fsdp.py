"""Sharded training (``train.parallel: fsdp``, FSDP2) gives the model of one process (issue 22).

Two CPU processes (gloo) sharding the model with ``fully_shard`` at ``batch_size: b`` must end with the
weights of one unsharded process at ``2b``, for full fine-tuning and the hybrids whose state is sharded
like the weights (EWC's anchors and Fisher over two tasks, l2's anchor), with gradient accumulation.
Checkpoints are sharded (DCP): a run cut mid-task resumes on two processes, on one (batch doubled), and a
one-process run resumes on two. The evaluation of a sharded run (weights gathered, the main process
scoring alone) gives the one-process scores; the statistics passes of a sharded model (Fisher, SI path
integral) give the whole model's values, each process its rows. One launch of two processes runs every
case; this process runs the one-process references meanwhile.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from launch_utils import join_as_worker
from test_multiprocess import START_METHOD, _free_port, config_for, write_inputs

EWC = {"name": "ewc", "lambda_": 1.0e3, "max_examples": 6}
CASES: dict[str, tuple[list[Any], int]] = {
    "full": (["full"], 1),
    "full+ewc": (["full", EWC], 2),  # the general Fisher before task 1, the task Fisher after it
    "full+l2": (["full", {"name": "l2", "lambda_": 10.0}], 1),
    # Omega from a general pass, sharded like the weights; uniform c_l (penalty_share weighs each layer by
    # the micro-batch's own loss, so a batch of 4 is not two of 2, under DDP alike)
    "full+importance": (["full", {"name": "importance", "max_examples": 6, "layer_balance": "uniform"}], 2),
    "full+lwf": (["full", {"name": "lwf", "alpha": 2.0, "teacher": "copy"}], 1),  # a sharded frozen teacher
    "full+l2+budget": (["full", {"name": "l2", "lambda_": 1.0}], 2),
}
# a KL ceiling the tasks cross: l2's strength moves, and a task ends over budget and rolls back
BUDGETS = {"full+l2+budget": {"max_kl": 1.3e-3, "check_every": 1, "on_exhausted": "rollback"}}
BATCH, WORLD = 2, 2


def _config(root: Path, name: str, out: Path, batch_size: int, parallel: str) -> Any:
    strategies, tasks = CASES[name]
    config = config_for(root, strategies, tasks, out, batch_size)
    if name in BUDGETS:
        from retain.config import BudgetConfig

        config = config.model_copy(update={"budget": BudgetConfig(**BUDGETS[name]), "eval": config.eval.model_copy(
            update={"suite": str(root / "budget_suite.yaml")})})
    return config.model_copy(update={"train": config.train.model_copy(update={"parallel": parallel})})


def _train(root: Path, name: str, out: Path, batch_size: int, parallel: str = "fsdp", resume: bool = False,
           evaluate: bool = False) -> None:
    from retain.eval.runner import SuiteObserver
    from retain.train import finetune

    config = _config(root, name, out, batch_size, parallel)
    if evaluate:  # the suite after every task and every 2 steps: forwards of the main process alone
        config = config.model_copy(update={"eval": config.eval.model_copy(
            update={"suite": str(root / "suite.yaml"), "every_n_steps": 2})})
    observed = evaluate or name in BUDGETS
    finetune(config, resume=resume, observer=SuiteObserver.from_config(config) if observed else None)


def _write_suite(root: Path) -> None:
    rows = [{"text": f"a small owl flew over hill {i} and saw {i * 3} stars."} for i in range(8)]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "suite.yaml").write_text(
        "tasks:\n"
        f"  - {{name: general, type: loss, data: {{path: {root / 'eval.jsonl'}, max_length: 32}}, max_examples: 4}}\n"
        f"  - {{name: add_acc, type: next_token_accuracy, role: task, train_task: add, "
        f"data: {{path: {root / 'add.jsonl'}, max_length: 32}}, max_examples: 4}}\n"
    )
    (root / "budget_suite.yaml").write_text(
        "tasks:\n"
        f"  - {{name: general_acc, type: next_token_accuracy, data: {{path: {root / 'eval.jsonl'}, max_length: 32}}, "
        "max_examples: 4}\n"
        "probe_prompts: ['a small owl flew', 'the cat sat on', '3 + 4 =']\n"
    )


def _final(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(next((run / "final").glob("*.safetensors")))).items()}


def _losses(run: Path) -> list[dict[str, Any]]:
    """The training log's loss rows (a budget writes rows of its own)."""
    rows = [json.loads(r) for r in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _budget(run: Path) -> dict[str, Any]:
    return json.loads((run / "results.json").read_text())["runs"][0]["budget"]


def _decisions(budget: dict[str, Any]) -> list[Any]:
    checks = [(c["task"], c["step"], c["within_budget"], round(c["strengths"]["l2.lambda_"], 6)) for c in budget["checks"]]
    return [checks, [(t["kept_step"], t["rolled_back"]) for t in budget["tasks"]]]


def _cut_to_mid_task(run: Path) -> None:
    """As if killed before the last checkpoint: the newest (a task's end) and the final folder gone."""
    newest = sorted((run / "checkpoints").iterdir())[-1]
    shutil.rmtree(newest)
    shutil.rmtree(run / "final")


def _statistics(root: Path, shard: bool) -> dict[str, torch.Tensor]:
    """The Fisher (sampled with 2 draws, and per batch) and the SI path integral of a tiny Llama, whole
    tensors; with ``shard`` computed on the FSDP2-sharded model (each process its rows) and gathered."""
    from retain.config import DataConfig
    from retain.data import build_task_data, collate
    from retain.models.sharding import shard_model, sharded_parameters
    from retain.models.tiny import char_tokenizer, tiny_model
    from retain.stats.fisher import diagonal_fisher
    from retain.stats.path_integral import path_integral_importance

    tok = char_tokenizer()
    examples = build_task_data(DataConfig(path=str(root / "general.jsonl"), max_length=24, pack=False), tok, seed=0).train
    model = tiny_model("llama", len(tok), seed=0, hidden=32, layers=2, heads=4)
    if shard:
        shard_model(model)
    params = sharded_parameters(model)
    batch = lambda items: collate(items, tok.pad_token_id)  # noqa: E731
    out = {}
    for label, (value, _) in {
        "sampled": diagonal_fisher(model, params, examples[:5], batch, estimator="sampled", samples=2, seed=3),
        "batch": diagonal_fisher(model, params, examples[:6], batch, estimator="empirical_batch", batch_size=3),
        "si": path_integral_importance(model, params, examples[:6], batch, lr=1e-3, batch_size=3),
    }.items():
        out.update({f"{label}/{k}": v.full_tensor() if shard else v for k, v in value.items()})
    out["weights-restored"] = torch.stack([(p.full_tensor() if shard else p).detach().sum() for p in params.values()])
    return {k: v.detach().contiguous() for k, v in out.items()}


def _worker(rank: int, world: int, port: int, root: str) -> None:
    join_as_worker(rank, world, port)
    base = Path(root)
    torch.distributed.init_process_group("gloo")  # accelerate joins this group
    stats = _statistics(base, shard=True)
    if rank == 0:
        save_file(stats, str(base / "sharded-statistics.safetensors"))
    for name in CASES:
        _train(base, name, base / "two" / name, BATCH)
    _train(base, "full", base / "two-eval", BATCH, evaluate=True)
    # a copy cut mid-task, for this process to resume alone (batch doubled)
    if rank == 0:
        shutil.copytree(base / "two" / "full+ewc", base / "to-one")
        _cut_to_mid_task(base / "to-one")
        shutil.copytree(base / "two" / "full+l2+budget", base / "budget-to-one")  # a kept point in its checkpoint
        _cut_to_mid_task(base / "budget-to-one")
        _cut_to_mid_task(base / "two" / "full+ewc")
    torch.distributed.barrier()
    _train(base, "full+ewc", base / "two" / "full+ewc", BATCH, resume=True)  # two processes again
    _train(base, "full+ewc", base / "from-one", BATCH, resume=True)  # written by one process
    try:  # a refusal reaches every process, before any model loads
        from retain.config import load_config_dict

        bad = _config(base, "full", base / "refused", BATCH, "fsdp").model_dump(mode="json")
        bad["strategies"] = [{"name": "lora", "r": 2}]
        bad["model"]["name_or_path"] = str(base / "no-such-model")
        from retain.train import finetune

        finetune(load_config_dict(bad))
    except Exception as err:  # noqa: BLE001 - recorded for the test
        (base / f"refused-rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")


def test_two_sharded_processes_train_the_model_of_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RETAIN_CACHE_DIR", str(tmp_path / "cache"))
    write_inputs(tmp_path)
    _write_suite(tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    # one process with parallel: fsdp (unsharded, sharded checkpoints), cut for the two processes to resume
    _train(tmp_path, "full+ewc", tmp_path / "one-fsdp", BATCH * WORLD)
    shutil.copytree(tmp_path / "one-fsdp", tmp_path / "from-one")
    _cut_to_mid_task(tmp_path / "from-one")
    two = mp.start_processes(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method=START_METHOD)
    try:
        for name in CASES:
            _train(tmp_path, name, tmp_path / "one" / name, BATCH * WORLD, parallel="ddp")
        _train(tmp_path, "full", tmp_path / "one-eval", BATCH * WORLD, parallel="ddp", evaluate=True)
    finally:
        while not two.join():
            pass
        torch.set_num_threads(previous)
    gaps = {}
    for name in CASES:
        one, sharded = _final(tmp_path / "one" / name), _final(tmp_path / "two" / name)
        assert one.keys() == sharded.keys(), name  # the consolidated folder is the unsharded one
        gaps[name] = max((one[k] - sharded[k]).abs().max().item() for k in one)
        one_log, two_log = (_losses(tmp_path / run / name) for run in ("one", "two"))
        for a, b in zip(one_log, two_log):  # every term's value is the whole one (summed over the shards)
            assert {k: pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in a.items() if k.startswith("loss")} == \
                {k: v for k, v in b.items() if k.startswith("loss")}, name
        assert abs(one_log[-1]["loss"] - one_log[0]["loss"]) > 1e-3, f"{name}: nothing trained"
        assert (tmp_path / "two" / name / "checkpoints").is_dir()
    print("max |one process - two FSDP2 processes|:", {k: f"{v:.1e}" for k, v in gaps.items()})
    assert all(gap <= 1e-5 for gap in gaps.values()), gaps
    reference = _final(tmp_path / "one" / "full+ewc")
    checkpoint = next((tmp_path / "two" / "full+ewc" / "checkpoints").iterdir())
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "weights.safetensors").exists()
    # resumed mid-task: on two processes, on one (batch doubled), and a one-process run on two
    _train(tmp_path, "full+ewc", tmp_path / "to-one", BATCH * WORLD, resume=True)
    for run in ("two/full+ewc", "to-one", "from-one", "one-fsdp"):
        resumed = _final(tmp_path / run)
        gap = max((reference[k] - resumed[k]).abs().max().item() for k in reference)
        assert gap <= 1e-5, (run, gap)
    # a budget on sharded weights: the main process measures the gathered model; both processes take one
    # process's checks, strengths and rollback (kept as sharded clones); a resume on one process reads the
    # kept point from the sharded checkpoint and ends the same
    decisions = _decisions(_budget(tmp_path / "one" / "full+l2+budget"))
    assert decisions == _decisions(_budget(tmp_path / "two" / "full+l2+budget"))
    assert decisions[1][0] == (1, True) and len({c[3] for c in decisions[0]}) > 1, decisions  # rolled back; moved
    assert not (tmp_path / "two" / "full+l2+budget" / "budget").exists()  # sharded: in memory, no file
    _train(tmp_path, "full+l2+budget", tmp_path / "budget-to-one", BATCH * WORLD, resume=True)
    assert _decisions(_budget(tmp_path / "budget-to-one")) == decisions
    budget_reference, resumed = _final(tmp_path / "one" / "full+l2+budget"), _final(tmp_path / "budget-to-one")
    assert max((budget_reference[k] - resumed[k]).abs().max().item() for k in resumed) <= 1e-5
    # evaluation of the sharded model (gathered on every process, scored by the main one): the same scores
    records = [json.loads((tmp_path / run / "eval_records.json").read_text()) for run in ("one-eval", "two-eval")]
    assert [r["index"] for r in records[1]] == [0, 1]
    for one_row, two_row in zip(*records):
        for key, score in one_row["scores"].items():
            assert two_row["scores"][key]["value"] == pytest.approx(score["value"], rel=1e-5), key
    steps = [(tmp_path / run / "step_evals.jsonl").read_text().splitlines() for run in ("one-eval", "two-eval")]
    assert len(steps[0]) == len(steps[1]) == 1
    assert json.loads(steps[1][0])["general"] == pytest.approx(json.loads(steps[0][0])["general"], rel=1e-5)
    # statistics passes of the sharded model: every process ran every example; its rows are the whole ones
    sharded_stats = load_file(str(tmp_path / "sharded-statistics.safetensors"))
    whole_stats = _statistics(tmp_path, shard=False)
    assert sharded_stats.keys() == whole_stats.keys()
    for key, value in whole_stats.items():
        assert torch.allclose(sharded_stats[key], value, rtol=1e-5, atol=1e-9), key
    refused = [(tmp_path / f"refused-rank{r}.txt").read_text() for r in range(WORLD)]
    assert all(r.startswith("ConfigError") and "lora" in r and "train.parallel: fsdp" in r for r in refused), refused
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "full" / "final")  # plain from_pretrained
    assert type(loaded).__name__ == "LlamaForCausalLM"


def test_sharded_launches_other_than_fsdp2_are_refused_with_the_reason():
    from accelerate.utils import DistributedType

    from retain.errors import ConfigError
    from retain.train.sharding import resolve_parallel

    def launch(kind: Any, version: int | None = None) -> Any:
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))

    assert resolve_parallel("ddp", launch(DistributedType.MULTI_CPU), {}) == "ddp"
    # accelerate launch --use_fsdp --fsdp_version 2 on CPUs: accelerate's state says MULTI_CPU, its launcher's env FSDP
    fsdp2_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert resolve_parallel("ddp", launch(DistributedType.MULTI_CPU), fsdp2_env) == "fsdp"
    with pytest.raises(ConfigError, match="FSDP version 1"):
        resolve_parallel("ddp", launch(DistributedType.MULTI_CPU), {**fsdp2_env, "FSDP_VERSION": "1"})
    with pytest.raises(ConfigError, match="DeepSpeed"):
        resolve_parallel("ddp", launch(DistributedType.MULTI_CPU), {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert resolve_parallel("fsdp", launch(DistributedType.MULTI_GPU), {}) == "fsdp"
    assert resolve_parallel("ddp", launch(DistributedType.FSDP, 2), {}) == "fsdp"  # accelerate's FSDP2 flags
    with pytest.raises(ConfigError, match="FSDP version 1"):
        resolve_parallel("ddp", launch(DistributedType.FSDP, 1), {})
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO is not supported.*train.parallel: fsdp"):
        resolve_parallel("fsdp", launch(DistributedType.DEEPSPEED), {})
    with pytest.raises(ConfigError, match="Megatron"):
        resolve_parallel("ddp", launch(DistributedType.MEGATRON_LM), {})


def test_strategies_that_cannot_train_sharded_are_named_with_the_reason():
    from retain.strategies.registry import STRATEGIES
    from retain.train.sharding import sharding_problems

    problems = sharding_problems([STRATEGIES.get(n)() for n in ("full", "ewc", "l2", "fip", "replay", "stm", "lora", "ewc-lora")])
    assert [p.split(":")[0] for p in problems] == ["lora", "ewc-lora"]
    assert "PEFT adapters" in problems[0] and "LoRA adapters" in problems[1]
    importance = STRATEGIES.get("importance")
    assert sharding_problems([importance(), STRATEGIES.get("lwf")()]) == []  # dense state; a sharded teacher
    topk = sharding_problems([importance(importance.Config(state="topk"))])
    assert len(topk) == 1 and "state: topk" in topk[0] and "state: dense" in topk[0]


def test_batch_size_may_change_on_resume_when_the_global_batch_stays():
    from retain.train.resume import Change, same_global_batch

    assert same_global_batch(Change("train.batch_size", 2, 4), (2, 1))
    assert same_global_batch(Change("train.batch_size", 4, 2), (1, 2))
    assert not same_global_batch(Change("train.batch_size", 2, 4), (2, 2))  # a global batch twice as large
    assert not same_global_batch(Change("train.batch_size", 2, 4), (None, 1))  # a checkpoint that did not say
    assert not same_global_batch(Change("train.lr", 2, 4), (2, 1))


def test_the_sharded_gradient_norm_and_clipping_follow_torch_on_whole_tensors():
    from retain.train.sharding import clip_sharded_grads_, sharded_grad_norm

    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    for p, g in zip(params, ([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]], [0.0, 0.0, 12.0, 0.0])):
        p.grad = torch.tensor(g)
    assert sharded_grad_norm(params).item() == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for twin, p in zip(twins, params):
        twin.grad = p.grad.clone()
    clip_sharded_grads_(params, 1.0)
    torch.nn.utils.clip_grad_norm_(twins, 1.0)
    assert all(torch.allclose(p.grad, t.grad, atol=1e-7) for p, t in zip(params, twins))


def test_settings_that_cannot_train_sharded_are_refused_with_the_reason(tmp_path):
    from retain.train.sharding import config_sharding_problems

    write_inputs(tmp_path)
    config = _config(tmp_path, "full", tmp_path / "out", BATCH, "fsdp")
    assert config_sharding_problems(config) == []
    mofo = config.model_copy(update={"train": config.train.model_copy(update={"optimizer": "mofo"})})
    fp16 = config.model_copy(update={"train": config.train.model_copy(update={"mixed_precision": "fp16"})})
    assert "only its rows" in config_sharding_problems(mofo)[0]
    assert "skip steps on some processes" in config_sharding_problems(fp16)[0]


def test_parallel_defaults_to_ddp_and_is_set_from_the_command_line(tmp_path):
    import yaml

    from retain.config import load_config
    from retain.errors import ConfigError

    write_inputs(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, "full", tmp_path / "out", BATCH, "ddp").model_dump(mode="json")))
    assert load_config(path).train.parallel == "ddp"
    assert load_config(path, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="parallel"):
        load_config(path, ["train.parallel=zero3"])


def test_the_shard_helpers_leave_an_unsharded_model_as_it_is():
    """Strategies call the same helpers with and without sharding; unsharded they change nothing."""
    from retain.models.sharding import (
        is_sharded, local, local_dict, shard_like, sharded_parameters, sum_over_processes, summed_over_shards,
    )
    from retain.models.tiny import tiny_model

    model = tiny_model("llama", 40, seed=0, hidden=16, layers=1, heads=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    assert not is_sharded(model)
    assert list(sharded_parameters(model)) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(sharded_parameters(model, trainable_only=False)) == len(list(model.parameters()))
    weight = model.model.norm.weight
    assert local(weight) is weight and local_dict({"w": weight})["w"] is weight
    whole = torch.ones_like(weight)
    assert torch.equal(shard_like(whole, weight), whole)
    term = (weight ** 2).sum()
    assert summed_over_shards(term, sharded=False) is term and sum_over_processes(term, sharded=False) is term
