"""Type ``lm_eval``: EleutherAI lm-evaluation-harness tasks, run on the in-memory model.

lm-eval is imported only when such an eval runs, so retain works without it. The model is handed to
``HFLM`` as an object (no save/reload), so a ``PeftModel`` mid-run is evaluated as is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from torch import nn

from retain.config import closest_name
from retain.errors import ConfigError
from retain.eval.tasks.base import EvalTaskConfig, SharedWork, TaskResult, register_eval_type
from retain.eval.tasks.inputs import resolve_path
from retain.io import content_hash
from retain.models.runtime import eval_mode

_INSTALL_HINT = "pip install 'retain[lm-eval]'"
#: lm-eval metrics that are proportions in [0, 1] (only those enter the accuracy matrix).
_BOUNDED = {"acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "em", "f1", "contains"}
#: Metrics where lower is better, for when lm-eval's own higher_is_better table lacks the metric.
_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "loss"}


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm_eval evals need the lm-eval package, which is not installed", hint=_INSTALL_HINT) from None
    return lm_eval, HFLM, TaskManager


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return None


def _task_manager(task_manager_cls: Any, tasks: Sequence[str], include_path: str | None) -> Any:
    """Index only ``include_path`` when it defines every requested task (scanning lm-eval's thousands
    of built-in task files takes seconds); refuse task names lm-eval does not know."""
    if include_path is not None:
        local = task_manager_cls(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = task_manager_cls(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = [h for h in (closest_name(t, manager.all_tasks) for t in unknown) if h]
        extra = f"; did you mean {', '.join(map(repr, hints))}?" if hints else ""
        where = f" (nor in include_path {include_path})" if include_path else ""
        raise ConfigError(f"lm-eval knows no task {', '.join(map(repr, unknown))}{where}{extra}")
    return manager


def _evaluate_raw(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | None,
    limit: int | float | None,
    batch_size: int,
) -> dict[str, Any]:
    lm_eval, hflm_cls, task_manager_cls = _import_lm_eval()
    manager = _task_manager(task_manager_cls, tasks, include_path)
    with eval_mode(model):  # HFLM calls model.eval(); give the caller its module flags back
        lm = hflm_cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)  # copy: HFLM may add a pad token
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=False
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


@register_eval_type("lm_eval")
class LmEval(EvalTaskConfig):
    """The chosen metric of each lm-eval task: under ``name`` for one task, ``name.<task>`` for several."""

    type: Literal["lm_eval"] = "lm_eval"
    lm_eval_tasks: list[str] = Field(min_length=1, description="lm-eval task names.")
    include_path: str | None = Field(None, description="Folder of extra lm-eval task YAMLs (relative: to the suite).")
    lm_eval_metric: str = Field("acc", description='lm-eval metric to report, e.g. "acc", "acc_norm", "exact_match".')
    limit: int | None = Field(None, gt=0, description="At most this many documents per lm-eval task.")

    def resolved(self, base: Path) -> "LmEval":
        copy = self.model_copy(deep=True)
        if self.include_path is not None:
            copy.include_path = resolve_path(self.include_path, base, always=True)
        return copy

    def input_files(self) -> dict[str, str]:
        return {"include_path": self.include_path} if self.include_path is not None else {}

    def hash_payload(self) -> dict[str, Any]:
        payload = self.model_dump(mode="json")
        if self.include_path is not None:
            payload["include_path"] = f"sha256:{content_hash(self.include_path)}"
        payload["lm_eval_version"] = lm_eval_version()  # another harness version may score differently
        return payload

    def evaluate(
        self, model: nn.Module, tokenizer: Any, batch_size: int = 16, shared: SharedWork | None = None
    ) -> dict[str, TaskResult]:
        try:
            raw = _evaluate_raw(model, tokenizer, self.lm_eval_tasks, self.include_path, self.limit, batch_size)
        except ConfigError as err:
            raise ConfigError(f"eval '{self.name}': {err}", hint=err.hint) from None
        flat = _flatten(raw)
        out: dict[str, TaskResult] = {}
        for lm_task in self.lm_eval_tasks:
            metrics = flat.get(lm_task, {})
            metric = self.lm_eval_metric if self.lm_eval_metric in metrics else _metric_name(self.lm_eval_metric)
            if metric not in metrics:
                available = ", ".join(k for k in metrics if k != "n_samples") or "(none)"
                raise ConfigError(
                    f"eval '{self.name}': lm-eval task '{lm_task}' has no metric '{self.lm_eval_metric}'; it reports: "
                    f"{available}. Set lm_eval_metric to one of them."
                )
            key = self.name if len(self.lm_eval_tasks) == 1 else f"{self.name}.{lm_task}"
            out[key] = TaskResult(
                value=metrics[metric],
                metric=metric,
                higher_is_better=_higher_is_better(raw, lm_task, metric),
                bounded=metric.split(",")[0] in _BOUNDED,
                n=int(metrics.get("n_samples", 0)),
            )
        return out
