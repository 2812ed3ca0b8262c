"""Several machines (issue 22, part 6): two "nodes" of one process each, on this machine, meet through
torchrun's c10d rendezvous (two ``torchrun --nnodes 2`` invocations, one endpoint) and train together:
``retain train`` ends with the weights of one process at the double batch.

What cannot be tested here is a second machine's network and file system; the run folder is shared
(as on a cluster's shared storage), and the rendezvous is the one real nodes use.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from resume_utils import final_weights

STEPS, BATCH, NODES = 3, 2, 2


def _free_port() -> int | None:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    except OSError:
        return None


def _run_yaml(root: Path, out: Path, batch: int) -> Path:
    from retain.models.tiny import char_tokenizer, tiny_model

    if not (root / "model").exists():
        tokenizer = char_tokenizer()
        tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4).save_pretrained(root / "model")
        tokenizer.save_pretrained(root / "model")
        rows = [{"prompt": f"{i} + {i % 7} =", "completion": f" {i + i % 7}" + " ok" * (i % 4)} for i in range(24)]
        (root / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "general.jsonl").write_text("".join(json.dumps({"text": f"the cat sat on mat {i}."}) + "\n" for i in range(12)))
    path = root / f"run-{batch}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(root / "model")},
        "tasks": [{"name": "add", "data": {"path": str(root / "add.jsonl"), "max_length": 32}}],
        "strategies": ["full", {"name": "ewc", "lambda_": 1.0e3, "max_examples": 6}],
        "general_data": {"path": str(root / "general.jsonl"), "max_length": 32},
        "train": {"steps_per_task": STEPS, "batch_size": batch, "lr": 3e-3, "progress": False},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out), "save_per_task": False},
    }))
    return path


def test_two_nodes_through_the_c10d_rendezvous_train_like_one_process(tmp_path):
    port = _free_port()
    if port is None:
        pytest.skip("no local port can be opened for the rendezvous")
    two = _run_yaml(tmp_path, tmp_path / "two", BATCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    nodes = []
    for rank in range(NODES):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", "1",
                   "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", "retain-test", "--rdzv-conf", f"is_host={'true' if rank == 0 else 'false'}",
                   "-m", "retain", "train", str(two)]
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    try:
        from retain.config import load_config
        from retain.train import finetune

        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = finetune(load_config(_run_yaml(tmp_path, tmp_path / "one", BATCH * NODES)))
        finally:
            torch.set_num_threads(previous)
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:  # on a failure or a timeout: no node outlives the test
            if node.poll() is None:
                node.kill()
                node.wait()
    if any(n.returncode for n in nodes) and any("Address already in use" in o or "EADDRINUSE" in o for o in outputs):
        pytest.skip("the rendezvous port was taken")
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outputs)
    reference = {k: v.detach().float() for k, v in one.model.state_dict().items()}
    trained = {k: v.float() for k, v in final_weights(tmp_path / "two").items()}
    shared = [k for k in reference if k in trained]
    assert len(shared) == len(trained) > 0
    gap = max((reference[k] - trained[k]).abs().max().item() for k in shared)
    print(f"2 nodes x 1 process vs 1 process at the double batch: max |weight difference| = {gap:.2e}")
    assert gap <= 1e-5
