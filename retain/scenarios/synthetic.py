"""An offline continual scenario made from procedurally generated skills.

"General" skills: continue an arithmetic sequence of digits, lower-case or upper-case letters
(``num 2 4 6>8 0 2``, ``let c d e>f g h``, ``cap A C E>G I A``, all modulo 10). The "specialist" skill
counts digits *down* (``dn 7 6 5>4 3 2``), which competes with counting up for the same tokens, so
fine-tuning on it can overwrite a general skill. A tiny character-level Llama is pretrained on the
general skills once (cached), then fine-tuned on the specialist; exact-match accuracy and loss on
held-out sequences of both show forgetting directly. Needs no file and no network.

Held-out sequences are whole (start, step, length) combinations that never appear in any training
file or in the general pool.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from retain.config import DataConfig, TaskConfig, load_config_dict
from retain.eval.suite import SuiteConfig
from retain.eval.tasks import GenerationEval, LossEval
from retain.io import atomic_dir
from retain.models.runtime import torch_threads
from retain.models.tiny import char_tokenizer, tiny_model
from retain.scenarios.base import Scenario, register_scenario

SCENARIO_VERSION = 3  # 3: pretrained and run on one thread (THREADS)
#: The demo computes on one CPU thread, so its numbers (the README's) do not depend on the machine's
#: thread count or OMP_NUM_THREADS; a tiny model gains nothing from more.
THREADS = 1
DIGITS, LOWER, UPPER = "0123456789", "abcdefghij", "ABCDEFGHIJ"
#: skill name -> (alphabet, direction)
GENERAL_SKILLS = {"num": (DIGITS, 1), "let": (LOWER, 1), "cap": (UPPER, 1)}
SPECIALIST_SKILLS = {"dn": (DIGITS, -1)}
COMBOS = [(start, step, length) for start in range(10) for step in (1, 2) for length in (3, 4, 5)]


def _sequence(alphabet: str, start: int, step: int, count: int) -> str:
    return " ".join(alphabet[(start + i * step) % len(alphabet)] for i in range(count))


def is_held_out(skill: str, combo: tuple[int, int, int]) -> bool:
    """One combination in five of every skill is kept for evaluation only."""
    return int(hashlib.sha256(f"{skill}{combo}".encode()).hexdigest(), 16) % 5 == 0


def example(skill: str, combo: tuple[int, int, int], skills: dict[str, tuple[str, int]]) -> dict[str, str]:
    alphabet, direction = skills[skill]
    start, step, length = combo
    step *= direction
    return {
        "prompt": f"{skill} {_sequence(alphabet, start, step, length)}>",
        "target": _sequence(alphabet, start + length * step, step, 3),
    }


def make_examples(skills: dict[str, tuple[str, int]], n: int, seed: int, held_out: bool) -> list[dict[str, str]]:
    """``n`` examples drawn uniformly over (skill, combination), from the held-out or the training side."""
    rng = random.Random(seed)
    pool = [(k, c) for k in sorted(skills) for c in COMBOS if is_held_out(k, c) == held_out]
    if held_out:
        return [example(k, c, skills) for k, c in pool]
    return [example(*rng.choice(pool), skills) for _ in range(n)]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _as_text(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"text": f"{r['prompt']}{r['target']}\n"} for r in rows]


def write_data(root: Path) -> dict[str, Path]:
    """Train, pool and evaluation files; evaluation combinations never appear in training or the pool."""
    root.mkdir(parents=True, exist_ok=True)
    general_eval = make_examples(GENERAL_SKILLS, 0, seed=0, held_out=True)
    special_eval = make_examples(SPECIALIST_SKILLS, 0, seed=0, held_out=True)
    rows = {
        "general_train": _as_text(make_examples(GENERAL_SKILLS, 6000, seed=1, held_out=False)),
        "general_pool": _as_text(make_examples(GENERAL_SKILLS, 400, seed=2, held_out=False)),
        "specialist_train": _as_text(make_examples(SPECIALIST_SKILLS, 3000, seed=3, held_out=False)),
        "general_eval": general_eval,
        "specialist_eval": special_eval,
        "general_eval_text": _as_text(general_eval),
        "specialist_eval_text": _as_text(special_eval),
    }
    paths = {}
    for name, content in rows.items():
        paths[name] = root / f"{name}.jsonl"
        _write_jsonl(paths[name], content)
    return paths


def pretrain_base(root: Path, data: Path, steps: int = 300, seed: int = 0) -> Path:
    """Pretrain the tiny model on the general skills once; reused while the recipe is unchanged."""
    from retain.train import finetune

    recipe = f"{SCENARIO_VERSION}-{steps}-{seed}-".encode() + data.read_bytes()
    key = hashlib.sha256(recipe).hexdigest()[:12]
    out = root / f"base-{key}"
    if (out / "config.json").is_file():
        return out
    tokenizer = char_tokenizer(LOWER + UPPER + DIGITS + " >\n" + "numletcapdn")
    model = tiny_model("llama", len(tokenizer), seed=seed, hidden=64, layers=2, heads=4, context=128)
    config = load_config_dict(
        {
            "model": {"name_or_path": "tiny-llama (in memory)"},
            "tasks": [{"name": "general", "data": {"path": str(data), "max_length": 64}}],
            "strategies": ["full"],
            "train": {"steps_per_task": steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 30, "seed": seed,
                      "progress": False, "weight_decay": 0.01},
            "output": {"dir": str(root / f"pretrain-{key}"), "save_per_task": False},
            "checkpoint": {"every": 0},
        }
    )
    import shutil

    shutil.rmtree(root / f"pretrain-{key}", ignore_errors=True)
    with torch_threads(THREADS):
        outcome = finetune(config, model=model, tokenizer=tokenizer)
    with atomic_dir(out) as tmp:
        outcome.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(root / f"pretrain-{key}", ignore_errors=True)
    return out


@register_scenario("synthetic")
def build_synthetic(cache_dir: Path | None = None, quick: bool = False, pretrain_steps: int = 300, **_: object) -> Scenario:
    from retain.io import default_cache_dir

    root = Path(cache_dir or default_cache_dir()) / "demo" / f"v{SCENARIO_VERSION}"
    paths = write_data(root / "data")
    base = pretrain_base(root, paths["general_train"], steps=pretrain_steps)
    gen_eval = dict(max_new_tokens=6, stop=["\n"], prompt_field="prompt", target_field="target")
    suite = SuiteConfig(
        tasks=[
            GenerationEval(name="general_exact", data=DataConfig(path=str(paths["general_eval"])), **gen_eval),
            LossEval(name="general_loss", data=DataConfig(path=str(paths["general_eval_text"]), max_length=64)),
            GenerationEval(
                name="specialist_exact", role="task", train_task="specialist",
                data=DataConfig(path=str(paths["specialist_eval"])), **gen_eval,
            ),
            LossEval(
                name="specialist_loss", role="task", train_task="specialist",
                data=DataConfig(path=str(paths["specialist_eval_text"]), max_length=64),
            ),
        ],
        sample_prompts=["num 1 2 3>", "let c e g>", "dn 9 8 7>"],
        probe_prompts=["num 3 4 5>6 7 8\nlet a c e>g i a\n", "cap B C D>E F G\nnum 0 2 4>6 8 0\n"],
        sample_max_new_tokens=8,
    )
    return Scenario(
        name="synthetic",
        base_model=str(base),
        tasks=[TaskConfig(name="specialist", data=DataConfig(path=str(paths["specialist_train"]), max_length=64))],
        suite=suite,
        general_data=DataConfig(path=str(paths["general_pool"]), max_length=64),
        train={"batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "steps_per_task": 40 if quick else 150},
        description="tiny char-level Llama pretrained to continue sequences, fine-tuned to count digits down",
        threads=THREADS,
    )
