"""retain: fine-tune causal language models on new skills without catastrophic forgetting, and
measure what the model still knows after every step.

Public API (imports are lazy so ``import retain`` stays cheap)::

    finetune(config)            train a task sequence with a list of strategies (retain.train.run)
    evaluate(model, tok, suite) score a model on an eval suite (retain.eval.suite)
    load_model(config)          model + tokenizer from a directory or hub id (retain.models.loading)
    load(model_dir, task=None)  a trained folder, or one task's prompt/adapter from final/ (retain.models.tasks)
    load_config(path)           a validated RunConfig from YAML (retain.config)
    register_strategy(name)     add a strategy: one class, one decorator (retain.strategies)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "finetune": ("retain.train.run", "finetune"),
    "evaluate": ("retain.eval.suite", "evaluate_suite"),
    "load_suite": ("retain.eval.suite", "load_suite"),
    "load_model": ("retain.models.loading", "load_model"),
    "load_any": ("retain.models.loading", "load_any"),
    "load": ("retain.models.tasks", "load_task_model"),
    "load_config": ("retain.train.run", "load_run_config"),
    "RunConfig": ("retain.config", "RunConfig"),
    "register_strategy": ("retain.strategies.registry", "register_strategy"),
    "available_strategies": ("retain.strategies.registry", "available_strategies"),
    "Strategy": ("retain.strategies.base", "Strategy"),
    "StrategyConfig": ("retain.strategies.base", "StrategyConfig"),
    "Results": ("retain.results.schema", "Results"),
    "RetainError": ("retain.errors", "RetainError"),
    "run_bench": ("retain.scenarios.bench", "run_bench"),
    "import_llama2c": ("retain.models.llama2c", "import_llama2c"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'retain' has no attribute {name!r}")
