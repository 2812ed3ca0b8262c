"""Several processes around the loop (issue 22): a forgetting budget, importance's training path integral,
and data built once per run.

One launch of two CPU processes (gloo) runs every case in turn (start-up is the expensive part) while
this process runs the one-process references at the double batch:

- budget, real measurements (l2 under a KL ceiling): the same checks, strengths and task decisions as one
  process, and the same weights; measured by the main process alone;
- budget, scripted measurements over budget at the end: both processes roll back to the same kept point
  (full fine-tuning keeps it on disk, lora in memory; the main process alone holds it);
- importance ``source: training``: Omega after the second task is one process's Omega (uniform
  coefficients) and the same on both processes (penalty_share, where each process's micro-batches give
  it its own coefficients);
- synthetic replay generates its sets and lwf builds its general pool once, on the main process; the
  other process gets exactly the main's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from launch_utils import START_METHOD, beside_workers, free_port, join_as_worker

STEPS, BATCH, WORLD = 4, 2, 2
BUDGET = {"check_every": 2, "early_checks": 0}
CASES: dict[str, tuple[list[Any], int, dict[str, Any] | None]] = {  # name -> (strategies, tasks, budget)
    "budget-l2": (["full", {"name": "l2", "lambda_": 1e-3}], 1, {"max_kl": 1e-5, "on_exhausted": "warn", **BUDGET}),
    "rollback-full": (["full"], 1, {"min_general_retention": 0.95, **BUDGET}),
    "rollback-lora": ([{"name": "lora", "r": 2, "dropout": 0.0}], 1, {"min_general_retention": 0.95, **BUDGET}),
    "importance-uniform": (["full", {"name": "importance", "source": "training", "layer_balance": "uniform",
                                     "lambda_": 10.0}], 2, None),
    "importance-share": (["full", {"name": "importance", "source": "training", "lambda_": 10.0}], 2, None),
    "synthetic": ([{"name": "lora", "r": 2, "dropout": 0.0},
                   {"name": "synthetic-replay", "prompts": ["the cat", "a dog"], "per_source": 3, "max_new_tokens": 8,
                    "completion_max_new_tokens": 3, "select": "first", "demonstrations_from_data": 0, "ratio": 0.5}],
                  1, None),
    "lwf-pool": ([{"name": "lora", "r": 2, "dropout": 0.0}, {"name": "lwf", "anchor": "general", "pool_size": 5,
                                                            "anchor_batch_size": 2}], 1, None),
}
# scripted (general retention, new-task score) at steps 0, 2, 4: over budget at the end, step 2 the best kept
SCRIPT = ([1.0, 0.97, 0.90], [0.1, 0.4, 0.5])


def write_inputs(root: Path) -> None:
    from retain.models.tiny import char_tokenizer, tiny_model

    tokenizer = char_tokenizer()
    tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    def write(name: str, rows: list[str]) -> None:
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))

    write("t1", [f"contracts shall be governed by the laws of delaware #{i}" + " ok" * (i % 3) for i in range(24)])
    write("t2", [f"the licensee may assign this agreement {i} times" + " now" * (i % 4) for i in range(24)])
    write("general", [f"the cat sat on the mat number {i}." for i in range(16)])
    write("general_eval", [f"a dog ran in the park {i} times." for i in range(48)])


def _suite(root: Path) -> Any:
    from retain.config import DataConfig
    from retain.eval.suite import SuiteConfig
    from retain.eval.tasks import NextTokenAccuracyEval

    return SuiteConfig(tasks=[NextTokenAccuracyEval(name="general_acc", data=DataConfig(path=str(root / "general_eval.jsonl"), max_length=32))],
                       probe_prompts=["the cat sat on", "a dog ran in the park"])


def _config(root: Path, name: str, out: Path, batch: int) -> Any:
    from retain.config import load_config_dict

    strategies, tasks, budget = CASES[name]
    return load_config_dict({
        "model": {"name_or_path": str(root / "model")},
        "tasks": [{"name": n, "data": {"path": str(root / f"{n}.jsonl"), "max_length": 32}} for n in ["t1", "t2"][:tasks]],
        "strategies": strategies,
        "general_data": {"path": str(root / "general.jsonl"), "max_length": 32},
        "train": {"steps_per_task": STEPS, "batch_size": batch, "lr": 1e-2, "progress": False, "log_every": 1},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out), "save_per_task": False},
        **({"budget": budget} if budget is not None else {}),
    })


@contextlib.contextmanager
def _watched(seen: dict[str, Any], scripted: bool) -> Iterator[None]:
    """Records what each process did: its budget participant, measure calls, Omega, generation calls and
    the sets/pool it ended with; ``scripted`` replaces the budget's measurement by SCRIPT."""
    import retain.strategies.synthetic_replay as synthetic_module
    import retain.train.run as run_module
    from retain.eval.budget import BudgetMeter, Measurement
    from retain.strategies.importance import Importance
    from retain.strategies.lwf import LearningWithoutForgetting
    from retain.strategies.synthetic_replay import SyntheticReplay

    seen.update(measures=0, generations=0, pools=0)
    make_participant, synthesize = run_module.budget_participant, synthetic_module.synthesize
    measure, after_task = BudgetMeter.measure, Importance.after_task
    general_pool, generate_all = LearningWithoutForgetting._general_pool, SyntheticReplay._generate_all

    def participant(*args: Any, **kwargs: Any) -> Any:
        seen["budget"] = make_participant(*args, **kwargs)
        return seen["budget"]

    def measured(meter: Any, *args: Any) -> Any:
        i, seen["measures"] = seen["measures"], seen["measures"] + 1
        if not scripted:
            return measure(meter, *args)
        return Measurement(general_retention=SCRIPT[0][i], task_score=SCRIPT[1][i])

    def omega_after(self: Any, task: Any, ctx: Any) -> None:
        after_task(self, task, ctx)
        seen["omega"] = {k: v.detach().float().clone() for k, v in self.omega_raw.items()}

    def generated(*args: Any, **kwargs: Any) -> Any:
        seen["generations"] += 1
        return synthesize(*args, **kwargs)

    def pooled(self: Any, ctx: Any) -> Any:
        seen["pools"] += 1
        return general_pool(self, ctx)

    def all_sets(self: Any, ctx: Any) -> None:
        generate_all(self, ctx)
        seen["sets"] = self.sets

    def prepared(self: Any, ctx: Any) -> None:
        prepare(self, ctx)
        seen["pool"] = [e.input_ids for e in self._pool]

    prepare = LearningWithoutForgetting._prepare
    with mock.patch.object(run_module, "budget_participant", participant), \
            mock.patch.object(synthetic_module, "synthesize", generated), \
            mock.patch.object(BudgetMeter, "measure", measured), mock.patch.object(Importance, "after_task", omega_after), \
            mock.patch.object(LearningWithoutForgetting, "_general_pool", pooled), \
            mock.patch.object(LearningWithoutForgetting, "_prepare", prepared), \
            mock.patch.object(SyntheticReplay, "_generate_all", all_sets):
        yield


def run_case(root: Path, name: str, out: Path, batch: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(every weight of the trained model, what the process recorded) for one case."""
    from retain.eval.runner import SuiteObserver
    from retain.train import finetune

    config = _config(root, name, out, batch)
    observer = SuiteObserver(_suite(root), name=name, run_dir=out, config=config.model_dump(mode="json"), batch_size=8)
    seen: dict[str, Any] = {}
    with _watched(seen, scripted=name.startswith("rollback")):
        outcome = finetune(config, observer=observer if CASES[name][2] is not None else None)
    record = {"measures": seen["measures"], "generations": seen["generations"], "pools": seen["pools"],
              "sets": seen.get("sets"), "pool": seen.get("pool")}
    if seen.get("budget") is not None:
        record["budget"] = seen["budget"].result().model_dump(mode="json")
    weights = {k: v.detach().float().cpu().contiguous().clone() for k, v in outcome.model.state_dict().items()}
    weights.update({f"omega/{k}": v.contiguous() for k, v in seen.get("omega", {}).items()})
    return weights, record


def _worker(rank: int, world: int, port: int, root: str) -> None:
    join_as_worker(rank, world, port)
    base = Path(root)
    for name in CASES:
        weights, record = run_case(base, name, base / "two" / name, BATCH)
        save_file(weights, str(base / f"two-{name}-rank{rank}.safetensors"))
        (base / f"two-{name}-rank{rank}.json").write_text(json.dumps(record))




def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and all(k in b for k in keys)
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1.0)).item() for k in keys)


def _decisions(budget: dict[str, Any]) -> list[Any]:
    checks = [(c["step"], c["within_budget"]) for c in budget["checks"]]
    tasks = [(t["kept_step"], t["end_step"], t["rolled_back"], t["within_budget"]) for t in budget["tasks"]]
    return [checks, tasks, budget["stopped"], sorted(budget["final"])]


def test_two_processes_budget_importance_and_once_built_data_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_inputs(tmp_path)
    one = beside_workers(_worker, WORLD, str(tmp_path),
                         lambda: {name: run_case(tmp_path, name, tmp_path / "one" / name, BATCH * WORLD) for name in CASES})
    two_weights = {n: [load_file(str(tmp_path / f"two-{n}-rank{r}.safetensors")) for r in range(WORLD)] for n in CASES}
    two_records = {n: [json.loads((tmp_path / f"two-{n}-rank{r}.json").read_text()) for r in range(WORLD)] for n in CASES}
    for name in CASES:
        ranks, (reference, _) = two_weights[name], one[name]
        weights = [k for k in reference if not k.startswith("omega/")]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in weights), f"{name}: the processes' weights disagree"
        gap = max((reference[k] - ranks[0][k]).abs().max().item() for k in weights)
        print(f"{name}: max |one process - two processes| = {gap:.2e}")
        # penalty_share weighs each layer by the micro-batch's own loss: one batch of 4 is not two of 2
        assert gap <= 1e-5 or name == "importance-share", f"{name}: two processes end {gap:.2e} from one"

    # the budget: the main process measures alone; both processes take one process's decisions
    for name in ("budget-l2", "rollback-full", "rollback-lora"):
        main, other = two_records[name]
        assert main["measures"] == one[name][1]["measures"] > 0 and other["measures"] == 0, name
        assert _decisions(main["budget"]) == _decisions(other["budget"]) == _decisions(one[name][1]["budget"]), name
    strengths = [[c["strengths"]["l2.lambda_"] for c in r["budget"]["checks"]] for r in two_records["budget-l2"]]
    single = [c["strengths"]["l2.lambda_"] for c in one["budget-l2"][1]["budget"]["checks"]]
    assert strengths[0] == strengths[1] and single[-1] > single[0]  # the strength moved, the same on both processes
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(strengths[0], single))
    for name in ("rollback-full", "rollback-lora"):
        task = two_records[name][1]["budget"]["tasks"][0]
        assert (task["kept_step"], task["rolled_back"]) == (2, True), name  # so the equal weights are step 2's
    assert not (tmp_path / "two" / "rollback-full" / "budget").exists() or not any((tmp_path / "two" / "rollback-full" / "budget").iterdir())

    # importance: the path integral of the global gradient on every process
    assert _gap(one["importance-uniform"][0], two_weights["importance-uniform"][0], "omega/") <= 1e-4
    share = two_weights["importance-share"]
    assert _gap(share[0], share[1], "omega/") == 0.0, "each process kept its own path integral"

    # data built once, on the main process, and given to the other
    main, other = two_records["synthetic"]
    assert main["generations"] == one["synthetic"][1]["generations"] == 1 and other["generations"] == 0
    assert main["sets"] == other["sets"] == one["synthetic"][1]["sets"] and main["sets"]["@general"]
    main, other = two_records["lwf-pool"]
    assert (main["pools"], other["pools"]) == (1, 0)
    assert main["pool"] == other["pool"] == one["lwf-pool"][1]["pool"] and len(main["pool"]) == 5


def _sharded_worker(rank: int, world: int, port: int, root: str) -> None:
    """FSDP2 (fully_shard, gloo) on a tiny Llama: the budget keeps and restores each process's shards, and
    importance's path integral, Omega and its normalization work on DTensors, equal to the unsharded ones."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import copy
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from retain.config import BudgetConfig
    from retain.models.sharding import is_dtensor, is_sharded, local
    from retain.models.tiny import char_tokenizer, tiny_model
    from retain.strategies.importance import Importance, ImportanceConfig
    from retain.strategies._shared.calibration import detached_copy
    from retain.train.budgeted import BudgetParticipant, KeptPoint

    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    tokenizer = char_tokenizer()
    plain = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    model = copy.deepcopy(plain)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert is_sharded(model) and not is_sharded(plain)
    accelerator = SimpleNamespace(num_processes=world, process_index=rank, is_main_process=rank == 0,
                                  wait_for_everyone=dist.barrier, scaler=None)
    ids = torch.tensor([[(7 * i + j) % len(tokenizer) for j in range(12)] for i in range(2)])
    results: dict[str, torch.Tensor] = {}

    # importance, source: training: one SGD step on each model, the same batch on every process
    omegas = []
    for net in (plain, model):
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        strategy = Importance(ImportanceConfig(source="training"))
        strategy._source, strategy._params = "training", params
        strategy.anchor = detached_copy(params)
        strategy.path = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        ctx = SimpleNamespace(accelerator=accelerator if net is model else None, unwrapped_model=net)
        optimizer = torch.optim.SGD(list(params.values()), lr=0.5)
        for _ in range(2):
            net(input_ids=ids, labels=ids).loss.backward()
            strategy.after_backward(net, ctx)
            optimizer.step()
            optimizer.zero_grad()
            strategy.after_step(net, ctx)
        strategy.after_task(None, ctx)
        omegas.append(strategy._weights)  # normalized Omega, as the penalty uses it
    assert all(is_dtensor(t) for t in omegas[1].values())  # Omega sharded like its parameter
    for name, value in omegas[1].items():
        results[f"omega/{name}"] = value.full_tensor()
        results[f"omega_plain/{name}"] = omegas[0][name]

    # the budget's kept point: each process its own rows, as sharded clones in memory (even where the
    # state said disk), restored after the weights moved; and a point kept whole (by one process) is cut
    budget = BudgetParticipant(BudgetConfig(min_general_retention=0.9), [], None, run_dir=Path(root) / "run")
    budget.ctx = SimpleNamespace(accelerator=accelerator)
    budget.in_memory = False
    kept = {n: local(p.detach()).clone() for n, p in model.named_parameters()}
    budget._keep(model, SimpleNamespace(index=0), KeptPoint(2, 2, 0.5, True, -1.0))
    sharded_clones = all(is_dtensor(t) for t in budget.kept.tensors.values())
    with torch.no_grad():
        for p in model.parameters():
            local(p).add_(1.0)
    budget._restore(model, budget.kept)
    restored = all(torch.equal(local(p.detach()), kept[n]) for n, p in model.named_parameters())
    whole = KeptPoint(2, 2, 0.5, True, -1.0, tensors={n: p.detach().full_tensor() for n, p in model.named_parameters()})
    with torch.no_grad():
        for p in model.parameters():
            local(p).add_(1.0)
    budget._restore(model, whole)
    restored = restored and all(torch.equal(local(p.detach()), kept[n]) for n, p in model.named_parameters())
    results["restored"] = torch.tensor([float(restored and sharded_clones)])
    results["files"] = torch.tensor([float((Path(root) / "run" / "budget").is_dir())])
    dist.barrier()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, str(Path(root) / "sharded.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_parameters_keep_budget_points_and_importance_per_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(_sharded_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method=START_METHOD)
    out = load_file(str(tmp_path / "sharded.safetensors"))
    assert out["restored"].item() == 1.0 and out["files"].item() == 0.0  # sharded clones, no file
    names = [k.split("/", 1)[1] for k in out if k.startswith("omega/")]
    assert names
    worst = max(((out[f"omega/{n}"] - out[f"omega_plain/{n}"]).abs().max() / out[f"omega_plain/{n}"].abs().max().clamp_min(1.0)).item()
                for n in names)
    print(f"sharded Omega vs unsharded: max relative difference {worst:.2e}")
    assert worst <= 1e-4, worst
    assert any(out[f"omega_plain/{n}"].abs().max() > 0 for n in names)
