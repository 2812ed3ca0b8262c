"""Several processes give the model of one process (issue 14, part 2).

Two CPU processes (gloo, through accelerate) with ``batch_size: b`` must end with the weights of one
process with ``batch_size: 2b``, for one hybrid of each family, on prompt/completion data whose
examples hold different numbers of label tokens (where a per-process mean of the loss differs from the
mean over the step's tokens). One launch of two processes runs every hybrid in turn (start-up is the
expensive part) while this process runs the one-process references.

Also: with one process, gradient accumulation equals the larger batch on such data (the task loss is
the mean over every label token of the optimizer step, and lwf's task-anchor distillation follows).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from launch_utils import START_METHOD, beside_workers, free_port, join_as_worker  # noqa: F401 (START_METHOD: test_fsdp)
from safetensors.torch import load_file, save_file

from retain.models.tiny import write_arithmetic_run

LORA = {"name": "lora", "r": 4, "dropout": 0.0}
# name -> (strategies, number of tasks): one hybrid per family; two tasks where the method needs them
HYBRIDS: dict[str, tuple[list[Any], int]] = {
    "full+ewc": (["full", {"name": "ewc", "lambda_": 1.0e3, "max_examples": 6}], 1),
    "lora+lwf": ([LORA, {"name": "lwf", "alpha": 2.0}], 1),
    "full+replay": (["full", {"name": "replay", "ratio": 0.25, "source": "general"}], 1),
    "lora+ewc-lora": ([LORA, {"name": "ewc-lora", "lambda_": 1.0e3, "max_examples": 6}], 2),
    "full+fip": (["full", {"name": "fip", "pool_size": 6, "pool_batch": 2}], 1),
    "lora+stm": ([LORA, {"name": "stm", "threshold": 105.0}], 1),
    "o-lora": ([{"name": "o-lora", "r": 2, "dropout": 0.0}], 2),
    "progressive-prompts": ([{"name": "progressive-prompts", "num_virtual_tokens": 3}], 2),
}
STEPS, BATCH, ACCUM, WORLD = 3, 2, 2, 2
RESUMED = ("o-lora", "full+ewc")
_free_port = free_port  # the names test_fsdp imports


def write_inputs(root: Path) -> None:
    """A tiny Llama, two prompt/completion tasks of uneven completion lengths, and general text."""
    write_arithmetic_run(root)


def config_for(root: Path, strategies: list[Any], tasks: int, out: Path, batch_size: int, grad_accum: int = ACCUM,
               lr: float = 3e-3) -> Any:
    from retain.config import load_config_dict

    names = ["add", "mul"][:tasks]
    return load_config_dict({
        "model": {"name_or_path": str(root / "model")},
        "tasks": [{"name": n, "data": {"path": str(root / f"{n}.jsonl"), "max_length": 32}} for n in names],
        "strategies": strategies,
        "general_data": {"path": str(root / "general.jsonl"), "max_length": 64, "pack": False},
        "train": {"steps_per_task": STEPS, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                  "progress": False, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 2},
        "output": {"dir": str(out), "save_per_task": False},
    })


def train(root: Path, name: str, out: Path, batch_size: int, grad_accum: int = ACCUM,
          resume: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of the trained model (adapters included), on the CPU."""
    from retain.train import finetune

    strategies, tasks = HYBRIDS[name]
    outcome = finetune(config_for(root, strategies, tasks, out, batch_size, grad_accum), resume=resume)
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in outcome.model.state_dict().items()}


def _worker(rank: int, world: int, port: int, root: str) -> None:
    join_as_worker(rank, world, port)
    base = Path(root)
    for name in HYBRIDS:
        weights = train(base, name, base / "two" / name, BATCH)
        save_file(weights, str(base / f"two-{name}-rank{rank}.safetensors"))
    # resume mid-task from the last step checkpoint (o-lora rebuilds its adapters there)
    for name in RESUMED:
        run = base / "two" / name
        if rank == 0:
            newest = sorted((run / "checkpoints").iterdir())[-1]  # the end of the last task: as if killed before it
            shutil.rmtree(newest)
            shutil.rmtree(run / "final")
        torch.distributed.barrier()
        weights = train(base, name, run, BATCH, resume=True)
        save_file(weights, str(base / f"resumed-{name}-rank{rank}.safetensors"))
    # a refusal on the main process (a finished run, no --resume) reaches every process
    try:
        train(base, "full+ewc", base / "two" / "full+ewc", BATCH)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        (base / f"refused-rank{rank}.txt").write_text(type(err).__name__)


def _log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_train_the_model_of_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_inputs(tmp_path)
    one = beside_workers(_worker, WORLD, str(tmp_path),
                         lambda: {name: train(tmp_path, name, tmp_path / "one" / name, BATCH * WORLD) for name in HYBRIDS})
    for name in HYBRIDS:
        ranks = [load_file(str(tmp_path / f"two-{name}-rank{r}.safetensors")) for r in range(WORLD)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), f"{name}: the processes disagree"
        assert one[name].keys() == ranks[0].keys(), name
        gap = max((one[name][k] - ranks[0][k]).abs().max().item() for k in one[name])
        print(f"{name}: max |one process - two processes| = {gap:.2e}")
        assert gap <= 1e-5, f"{name}: two processes end {gap:.2e} from one"
        # the logged losses of the two layouts are the same numbers (every process's tokens, every term)
        one_log = _log(tmp_path / "one" / name)
        two_log = _log(tmp_path / "two" / name)[: len(one_log)]  # a resumed run (below) appends its rows
        assert [r["global_step"] for r in one_log] == [r["global_step"] for r in two_log], name
        for a, b in zip(one_log, two_log):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), name
            assert {k for k in a if k.startswith("loss/")} == {k for k in b if k.startswith("loss/")}, name
        assert abs(one_log[-1]["loss"] - one_log[0]["loss"]) > 1e-3, f"{name}: nothing trained"
        # outputs are the main process's: each checkpoint once, the final model, no stray temporaries
        checkpoints = sorted(p.name for p in (tmp_path / "two" / name / "checkpoints").iterdir())
        assert checkpoints == sorted(p.name for p in (tmp_path / "one" / name / "checkpoints").iterdir()), name
        assert (tmp_path / "two" / name / "final").is_dir()
    for name in RESUMED:  # killed mid-task and resumed on two processes: the uninterrupted model
        resumed = [load_file(str(tmp_path / f"resumed-{name}-rank{r}.safetensors")) for r in range(WORLD)]
        gap = max((one[name][k] - resumed[0][k]).abs().max().item() for k in one[name])
        assert gap <= 1e-5 and all(torch.equal(resumed[0][k], resumed[1][k]) for k in resumed[0]), (name, gap)
    assert [(tmp_path / f"refused-rank{r}.txt").read_text() for r in range(WORLD)] == ["StateError"] * WORLD


@pytest.mark.parametrize("strategies", [["full"], ["full", {"name": "lwf", "alpha": 8.0, "anchor": "task"}]],
                         ids=["full", "full+lwf"])  # task anchors: general ones are drawn per micro-batch
def test_gradient_accumulation_equals_the_larger_batch_on_uneven_examples(tmp_path, strategies):
    """Prompt/completion rows hold different numbers of label tokens: the step's token mean (not the mean
    of micro-batch means) makes 2 micro-batches of 2 the same step as one batch of 4."""
    from retain.train import finetune

    write_inputs(tmp_path)
    weights = []
    for out, batch_size, accum in ((tmp_path / "big", 4, 1), (tmp_path / "accumulated", 2, 2)):
        config = config_for(tmp_path, strategies, 1, out, batch_size, accum, lr=1e-3)
        weights.append(finetune(config).model.state_dict())
    big, accumulated = weights
    assert max((big[k] - accumulated[k]).abs().max().item() for k in big) < 1e-5


def test_launches_that_would_not_train_together_are_refused():
    from accelerate.utils import DistributedType

    from retain.errors import ConfigError
    from retain.train.processes import check_data_parallel, check_process_count

    check_process_count(1, {})
    check_process_count(2, {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    check_process_count(2, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="do not train together"):  # torchrun on CPUs without retain's fix
        check_process_count(1, {"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="started one process, not N") as refused:  # accelerate launch --cpu
        check_process_count(1, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "torchrun --nproc_per_node N -m retain train" in refused.value.hint
    check_data_parallel(DistributedType.MULTI_GPU)
    check_data_parallel(DistributedType.MULTI_CPU)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match="data-parallel"):
            check_data_parallel(sharded)


def test_an_error_that_cannot_be_sent_reaches_the_other_processes_as_text():
    from retain.errors import StateError
    from retain.models.sharding import sendable

    refused = StateError("run folder holds checkpoints", hint="pass --resume")
    assert sendable(refused) is refused
    odd = ValueError("bad")
    odd.callback = lambda: None  # lambdas do not pickle
    sent = sendable(odd)
    assert isinstance(sent, RuntimeError) and str(sent) == "ValueError on the main process: bad"


def test_each_process_runs_a_block_of_the_global_micro_batch_without_the_padding_it_does_not_need():
    from retain.train.loop import label_tokens, rows_of

    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    batch = {"input_ids": torch.arange(30).view(5, 6), "attention_mask": mask, "labels": torch.arange(30).view(5, 6)}
    first, second = rows_of(batch, 2, 0), rows_of(batch, 2, 1)  # 5 rows (replay's append): 3 and 2
    assert first["input_ids"].tolist() == batch["input_ids"][:3].tolist()  # row 0 uses every column
    assert second["input_ids"].tolist() == [[18, 19, 20], [24, 25, 26]]  # a left-padded row keeps its first column
    assert rows_of(batch, 1, 0) is batch
    labels = torch.tensor([[-100, 5, -100, 7], [3, -100, -100, -100]])  # position 0 is never predicted
    assert int(label_tokens(labels)) == 2


def test_the_process_count_of_accelerate_launch_on_cpus_is_read_from_its_command_line():
    from retain.train.processes import requested_cpu_processes, torchrun_command

    launched = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    launcher = ["/usr/bin/python3", "/usr/local/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m",
                "retain", "train", "run.yaml"]
    assert requested_cpu_processes(launched, launcher) == 2
    assert requested_cpu_processes(launched, [*launcher[:4], "--num_processes=3", *launcher[6:]]) == 3
    assert requested_cpu_processes(launched, [*launcher[:5], "1", *launcher[6:]]) is None  # one asked, one run
    assert requested_cpu_processes(launched, None) is None  # unreadable: check_process_count refuses instead
    assert requested_cpu_processes(launched, ["bash", "-c", "x --num_processes 2"]) is None  # not accelerate
    assert requested_cpu_processes({**launched, "WORLD_SIZE": "2"}, launcher) is None  # already several
    assert requested_cpu_processes({**launched, "OMPI_COMM_WORLD_SIZE": "2"}, launcher) is None  # MPI starts them
    assert requested_cpu_processes({"MASTER_ADDR": "h"}, launcher) is None  # not on CPUs
    assert torchrun_command(2, ["train", "run.yaml"], "/py") == [
        "/py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "retain", "train",
        "run.yaml"]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not installed")
def test_accelerate_launch_on_cpus_trains_on_the_processes_it_names(tmp_path):
    """The documented command ``accelerate launch --cpu --num_processes 2 -m retain train RUN.yaml`` runs two
    processes that end with the model of one process with twice the batch."""
    import subprocess

    import yaml

    write_inputs(tmp_path)
    runs = {}
    for name, batch_size in (("two", BATCH), ("one", BATCH * WORLD)):
        config = config_for(tmp_path, HYBRIDS["full+ewc"][0], 1, tmp_path / name, batch_size)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        runs[name] = path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    two = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", str(WORLD), "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "retain", "train",
                          str(runs["two"])], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "retain", "train", str(runs["one"])], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    weights = [load_file(str(next((tmp_path / name / "final").glob("*.safetensors")))) for name in ("one", "two")]
    gap = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0])
    assert gap <= 1e-5, gap
    # with one process the step would see half the examples: the losses would differ well beyond this
    assert _log(tmp_path / "two")[-1]["loss"] == pytest.approx(_log(tmp_path / "one")[-1]["loss"], rel=1e-5)
