"""The run YAML that ``retain recommend --out`` writes: the strategies filled in, placeholders marked.

Every value the user must supply is a ``<REPLACE key: what to put here>`` string, listed in a comment
at the top, so nothing that looks ready is a guess. Once each placeholder is replaced the file is a
complete run config (``retain train run.yaml``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from retain.guide.catalogue import Hybrid, uses_adapters

PLACEHOLDER = re.compile(r"<REPLACE ([a-z0-9_]+): [^>]*>")

#: placeholder key -> what to put there
PLACEHOLDERS: dict[str, str] = {
    "model": "hub id or local folder of the base model",
    "general_data": "public general text the model must keep (jsonl with a text field); never your eval text",
    "suite": "eval suite YAML scoring your task and general ability (see README 'Eval suites')",
    "prompts": "a general prompt the base model continues to write its own rehearsal text",
}


def placeholder(key: str) -> str:
    return f"<REPLACE {key}: {PLACEHOLDERS[key]}>"


def task_placeholder(index: int) -> str:
    return f"<REPLACE task{index}_data: training data of task {index} (jsonl: prompt/completion or text)>"


def placeholders_in(text: str) -> list[str]:
    """The placeholder keys still present in a written YAML, in order of first appearance."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def fill_placeholders(text: str, values: dict[str, str]) -> str:
    """Replace each ``<REPLACE key: ...>`` by ``values[key]`` (keys not given stay)."""
    return PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), text)


def _strategies(h: Hybrid) -> list[Any]:
    entries: list[Any] = []
    for spec in h.strategy_list():
        if spec["name"] == "synthetic-replay" and not spec.get("prompts"):
            spec["prompts"] = [placeholder("prompts")]
        entries.append(spec["name"] if len(spec) == 1 else spec)
    return entries


def run_yaml(h: Hybrid, tasks: int, header: str, constraints: dict[str, str] | None = None) -> str:
    """A run YAML training ``h`` over ``tasks`` placeholder tasks; ``header`` becomes leading comments;
    ``constraints`` (compute, privacy, stakes, weights) are recorded under ``constraints:`` so that
    ``retain tune`` of this file never searches outside them."""
    adapters = uses_adapters(h)
    config: dict[str, Any] = {
        "model": {"name_or_path": placeholder("model"), "dtype": "bfloat16"},
        "tasks": [{"name": f"task{i}", "data": {"path": task_placeholder(i), "max_length": 1024}}
                  for i in range(1, max(1, tasks) + 1)],
        "strategies": _strategies(h),
        "general_data": {"path": placeholder("general_data")},
        "train": {"steps_per_task": 500, "batch_size": 8, "grad_accum": 4,
                  "lr": 2.0e-4 if adapters else 2.0e-5, "mixed_precision": "bf16"},
        "eval": {"suite": placeholder("suite")},
        "output": {"dir": f"runs/{h.label}", "merge": adapters},
    }
    if constraints is not None:
        config["constraints"] = dict(constraints)
    body = yaml.safe_dump(config, sort_keys=False, width=200, allow_unicode=True)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += ["# Replace every <REPLACE ...> value before `retain train`:"]
    keys = placeholders_in(body)
    lines += [f"#   {key}" for key in keys]
    lines.append("# lr: 2e-4 suits adapters, 2e-5 full fine-tuning of a real LLM; check it on your model.")
    if constraints is not None:
        lines.append("# constraints: what you asked retain recommend for; `retain tune` of this file never searches "
                     "outside them (flags may only narrow them); `retain train` ignores them.")
    return "\n".join(lines) + "\n" + body
