"""Optional bridge to EleutherAI's lm-evaluation-harness, run on the in-memory model.

lm-eval is imported only when an ``lm_eval`` eval task runs, so retain works without it. The model
is handed to ``HFLM`` as an object (no save/reload), so a ``PeftModel`` mid-run is evaluated as is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from retain.eval.tasks import TaskResult
from retain.models.runtime import eval_mode

if TYPE_CHECKING:
    from retain.eval.suite import EvalTaskConfig

_INSTALL_HINT = "lm-eval tasks need the lm-eval package: pip install 'retain[lm-eval]'"
#: lm-eval metrics that are proportions in [0, 1] (only those enter the accuracy matrix).
_BOUNDED = {"acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "em", "f1", "contains"}
#: Metrics where lower is better, for when lm-eval's own higher_is_better table lacks the metric.
_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "loss"}


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return lm_eval, HFLM, TaskManager


def _task_manager(task_manager_cls: Any, tasks: Sequence[str], include_path: str | None) -> Any:
    """Index only ``include_path`` when it defines every requested task: scanning lm-eval's thousands
    of built-in task files takes seconds."""
    if include_path is not None:
        local = task_manager_cls(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return task_manager_cls(include_path=include_path)


def _evaluate_raw(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | None,
    limit: int | float | None,
    batch_size: int,
) -> dict[str, Any]:
    lm_eval, hflm_cls, task_manager_cls = _import_lm_eval()
    with eval_mode(model):  # HFLM calls model.eval(); give the caller its module flags back
        lm = hflm_cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)  # copy: HFLM may add a pad token
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=_task_manager(task_manager_cls, tasks, include_path),
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    if raw is None:  # non-zero ranks of a distributed run
        return {"results": {}, "higher_is_better": {}, "n-samples": {}}
    return dict(raw)


def _metric_name(key: str) -> str:
    """lm-eval keys are "metric,filter"; the default filter "none" is dropped ("acc,none" -> "acc")."""
    return key[: -len(",none")] if key.endswith(",none") else key


def _flatten(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, metrics in raw.get("results", {}).items():
        values = {_metric_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        n = raw.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            values["n_samples"] = float(n)
        out[task] = values
    return out


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """lm-eval task -> {metric: value} (e.g. {"acc": 0.61, "acc_stderr": ..., "n_samples": 200.0}).

    Uses ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=model, tokenizer=...)``; metric keys
    lose lm-eval's default ",none" filter suffix; ``n_samples`` is the number of documents scored.
    """
    return _flatten(_evaluate_raw(model, tokenizer, tasks, include_path, limit, batch_size))


def _higher_is_better(raw: dict[str, Any], task: str, metric: str) -> bool:
    table = raw.get("higher_is_better", {}).get(task, {})
    base = metric.split(",")[0]
    if base in table and table[base] is not None:
        return bool(table[base])
    return base not in _LOWER_IS_BETTER


def lm_eval_results(model: nn.Module, tokenizer: Any, task: "EvalTaskConfig", batch_size: int = 8) -> dict[str, TaskResult]:
    """An ``lm_eval`` eval task's chosen metric per lm-eval task, as retain results.

    Keys: the eval task's name for a single lm-eval task, ``f"{name}.{lm_eval_task}"`` for several.
    """
    raw = _evaluate_raw(model, tokenizer, task.lm_eval_tasks, task.include_path, task.limit, batch_size)
    flat = _flatten(raw)
    out: dict[str, TaskResult] = {}
    for lm_task in task.lm_eval_tasks:
        metrics = flat.get(lm_task, {})
        metric = task.lm_eval_metric if task.lm_eval_metric in metrics else _metric_name(task.lm_eval_metric)
        if metric not in metrics:
            available = ", ".join(k for k in metrics if k != "n_samples") or "(none)"
            raise ValueError(f"eval '{task.name}': lm-eval task '{lm_task}' has no metric '{task.lm_eval_metric}'; it reports: {available}")
        key = task.name if len(task.lm_eval_tasks) == 1 else f"{task.name}.{lm_task}"
        base = metric.split(",")[0]
        out[key] = TaskResult(
            value=metrics[metric],
            metric=metric,
            higher_is_better=_higher_is_better(raw, lm_task, metric),
            bounded=base in _BOUNDED,
            n=int(metrics.get("n_samples", 0)),
        )
    return out
