"""Eval suites: a YAML list of evaluations run on every model state, and how each becomes Scores.

Result keys: every eval task yields one ``Score`` under its ``name``, with two exceptions:

* ``type: loss`` yields the mean token loss under ``name`` and the perplexity under
  ``f"{name}.perplexity"``;
* ``type: lm_eval`` with several ``lm_eval_tasks`` yields one score per lm-eval task under
  ``f"{name}.{lm_eval_task}"`` (a single task stays under ``name``).

Example suite file (relative ``data.path`` values resolve against the suite file's folder)::

    tasks:
      - name: tinystories
        type: loss
        data: {path: tinystories_val.txt}
        max_examples: 64          # windows, for loss / next_token_accuracy
      - name: cuad_anti_assignment
        type: multiple_choice
        role: task
        train_task: anti_assignment
        data: {path: cuad/test.tsv}
        prompt_template: "Clause: {text}\\nAnswer:"
        choices: ["No", "Yes"]
        max_examples: 200         # records
    sample_prompts: ["Once upon a time"]
    probe_prompts: ["The cat sat on the"]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator
from torch import nn

from retain.config import DataConfig, StrictModel, apply_overrides, format_validation_error
from retain.data.sampling import seeded_subset
from retain.errors import ConfigError
from retain.eval import tasks as T
from retain.io import content_hash
from retain.results.schema import Score

#: Bump when a scoring rule changes, so cached scores of the old rule are not reused.
EVAL_VERSION = 1
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")

TaskType = Literal["loss", "next_token_accuracy", "multiple_choice", "generation", "lm_eval"]


class EvalTaskConfig(StrictModel):
    name: str = Field(description="Key of this eval's score(s) in results; unique within the suite.")
    type: TaskType
    data: DataConfig | None = Field(None, description="Eval data; required except for type lm_eval.")
    role: Literal["general", "task"] = Field(
        "general", description="general: ability to preserve; task: measures the training task train_task."
    )
    train_task: str | None = Field(None, description="Training task this eval measures (role: task).")
    max_examples: int | None = Field(
        None, gt=0, description="Seeded subsample: windows for loss/next_token_accuracy, records otherwise."
    )
    seed: int = Field(0, description="Seed of the max_examples subsample.")
    max_length: int | None = Field(
        None, gt=1, description="Window length (loss; default data.max_length) or context limit (default: model's)."
    )
    prompt_field: str = "prompt"
    choices_field: str = "choices"
    label_field: str = "label"
    target_field: str = "target"
    choices: list[str] | None = Field(
        None, description='Choices shared by all records, e.g. ["No", "Yes"]; the label is then one of them.'
    )
    prompt_template: str | None = Field(
        None, description='Prompt built from record fields, e.g. "Clause: {text}\\nAnswer:"; else prompt_field.'
    )
    target_delimiter: str = Field(" ", description="Put between prompt and each choice, as lm-eval does.")
    length_normalize: bool | Literal["token", "char"] = Field(
        False, description="Compare choices by log-prob per token or per character (true: char, = lm-eval acc_norm)."
    )
    match: Literal["exact", "contains"] = "exact"
    max_new_tokens: int = Field(32, gt=0)
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Generation is cut at the first of these.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval task names (type lm_eval).")
    include_path: str | None = Field(None, description="Folder of extra lm-eval task YAMLs.")
    lm_eval_metric: str = Field("acc", description='lm-eval metric to report, e.g. "acc", "acc_norm", "exact_match".')
    limit: int | None = Field(None, gt=0, description="lm-eval: at most this many documents per task.")

    @model_validator(mode="after")
    def _consistent(self) -> "EvalTaskConfig":
        if self.type == "lm_eval":
            if not self.lm_eval_tasks:
                raise ValueError(f"eval '{self.name}': type lm_eval needs lm_eval_tasks: [task, ...]")
        elif self.data is None:
            raise ValueError(f"eval '{self.name}': type {self.type} needs data: {{path: ...}}")
        if self.role == "task" and not self.train_task:
            raise ValueError(f"eval '{self.name}': role task needs train_task (the training task it measures)")
        if self.role == "general" and self.train_task:
            raise ValueError(f"eval '{self.name}': train_task is set, so set role: task too")
        return self

    @property
    def normalize(self) -> T.Normalize:
        if self.length_normalize is True:
            return "char"
        return self.length_normalize or "none"


class SuiteConfig(StrictModel):
    tasks: list[EvalTaskConfig] = Field(default_factory=list)
    sample_prompts: list[str] = Field(default_factory=list, description="Prompts for before/after generations.")
    probe_prompts: list[str] = Field(default_factory=list, description="Prompts for the KL drift measurement.")
    sample_max_new_tokens: int = Field(48, gt=0)
    probe_max_length: int = Field(64, gt=1, description="Tokens per probe prompt for the KL reference.")
    probe_top_k: int | None = Field(None, gt=0, description="Keep only the base model's top-k log-probs per probe position.")

    @model_validator(mode="after")
    def _unique_names(self) -> "SuiteConfig":
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval task names must be unique; repeated: {', '.join(dupes)}")
        return self


# --------------------------------------------------------------------------------------------
# Loading


def _looks_local(path: str) -> bool:
    return Path(path).suffix.lower() in _DATA_SUFFIXES or path.startswith(("./", "../"))


def _resolve(path: str, base: Path, always: bool = False) -> str:
    """A relative path against ``base`` if it names something there (or looks like a file path);
    hub dataset names ("org/name") are left alone."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if always or candidate.exists() or _looks_local(path):
        return str(candidate.resolve())
    return path


def resolve_paths(suite: SuiteConfig, base: Path) -> SuiteConfig:
    """Copy of ``suite`` with data paths and include_path made absolute relative to ``base``."""
    suite = suite.model_copy(deep=True)
    for task in suite.tasks:
        if task.data is not None:
            task.data.path = _resolve(task.data.path, base)
        if task.include_path is not None:
            task.include_path = _resolve(task.include_path, base, always=True)
    return suite


def load_suite_dict(data: Mapping[str, Any], source: str = "<dict>", base: Path | None = None) -> SuiteConfig:
    try:
        suite = SuiteConfig.model_validate(dict(data))
    except ValidationError as err:
        raise format_validation_error(err, SuiteConfig, source) from None
    return resolve_paths(suite, base) if base is not None else suite


def load_suite(path: str | Path, overrides: list[str] | None = None) -> SuiteConfig:
    """Read a suite YAML; errors name the file and the key. Relative data paths resolve against
    the YAML file's folder, so a suite and its data can move together."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval suite file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys tasks, sample_prompts, probe_prompts")
    if overrides:
        data = apply_overrides(data, overrides)
    return load_suite_dict(data, str(path), base=path.resolve().parent)


# --------------------------------------------------------------------------------------------
# Hashing


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return None


def suite_hash(suite: SuiteConfig) -> str:
    """Stable sha256 of the suite config, with local data (and lm-eval include folders) replaced by
    the sha256 of their contents: same data under another path hashes the same, edited data not."""
    dumped = suite.model_dump(mode="json")
    for task in dumped["tasks"]:
        if task.get("data"):
            content = content_hash(task["data"]["path"])
            if content is not None:
                task["data"]["path"] = f"sha256:{content}"
        if task.get("include_path"):
            task["include_path"] = f"sha256:{content_hash(task['include_path'])}"
        if task["type"] == "lm_eval":
            task["lm_eval_version"] = _lm_eval_version()
    payload = json.dumps({"eval_version": EVAL_VERSION, "suite": dumped}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Records -> task inputs


def _field(record: Mapping[str, Any], key: str, task: EvalTaskConfig) -> Any:
    if key not in record:
        from retain.data.records import record_where

        where = record_where(record, 0, task.data.path if task.data else task.name)
        raise ConfigError(
            f"eval '{task.name}': {where} has no field '{key}' (fields: {', '.join(map(str, record))}). "
            "Set the *_field option or prompt_template of this eval."
        )
    return record[key]


def _prompt(record: Mapping[str, Any], task: EvalTaskConfig) -> str:
    if task.prompt_template is None:
        return str(_field(record, task.prompt_field, task))
    try:
        return task.prompt_template.format_map(record)
    except KeyError as err:
        _field(record, str(err.args[0]), task)
        raise
    except (IndexError, ValueError) as err:
        raise ConfigError(f"eval '{task.name}': bad prompt_template {task.prompt_template!r}: {err}") from None


def _choices(record: Mapping[str, Any], task: EvalTaskConfig) -> list[str]:
    if task.choices is not None:
        return list(task.choices)
    value = _field(record, task.choices_field, task)
    if isinstance(value, str):  # a CSV/TSV cell holding a JSON list
        value = json.loads(value)
    return [str(v) for v in value]


def _texts(records: list[dict[str, Any]], task: EvalTaskConfig) -> list[str]:
    """Plain text per record; prompt + completion for prompt/completion data."""
    data = task.data
    assert data is not None
    if data.text_field in records[0] or data.prompt_field not in records[0]:
        return [str(_field(r, data.text_field, task)) for r in records]
    return [str(_field(r, data.prompt_field, task)) + str(_field(r, data.completion_field, task)) for r in records]


def _choice_examples(records: list[dict[str, Any]], task: EvalTaskConfig) -> list[T.ChoiceExample]:
    examples = []
    for record in records:
        choices = _choices(record, task)
        try:
            label = T.resolve_label(_field(record, task.label_field, task), choices)
        except ValueError as err:
            raise ConfigError(f"eval '{task.name}': {err}") from None
        examples.append(T.ChoiceExample(_prompt(record, task), choices, label))
    return examples


# --------------------------------------------------------------------------------------------
# Evaluation


def _load(task: EvalTaskConfig) -> list[dict[str, Any]]:
    from retain.data.records import load_records

    assert task.data is not None
    return load_records(task.data)


def _run_task(model: nn.Module, tokenizer: Any, task: EvalTaskConfig, batch_size: int) -> dict[str, T.TaskResult]:
    """Raw results of one eval task, keyed as described in the module docstring."""
    if task.type == "lm_eval":
        from retain.eval.lm_eval_bridge import lm_eval_results

        return lm_eval_results(model, tokenizer, task, batch_size)
    records = _load(task)
    if task.type in ("loss", "next_token_accuracy"):
        assert task.data is not None
        window = task.max_length or task.data.max_length
        args = (model, tokenizer, _texts(records, task), window, batch_size, task.max_examples, task.seed)
        if task.type == "next_token_accuracy":
            return {task.name: T.next_token_accuracy(*args)}
        nll, ppl = T.loss(*args)
        return {task.name: nll, f"{task.name}.perplexity": ppl}
    records = seeded_subset(records, task.max_examples, task.seed)
    if task.type == "multiple_choice":
        examples = _choice_examples(records, task)
        return {task.name: T.multiple_choice(model, tokenizer, examples, task.normalize, task.target_delimiter, batch_size, task.max_length)}
    prompts = [_prompt(r, task) for r in records]
    targets = [str(_field(r, task.target_field, task)) for r in records]
    result = T.generation(model, tokenizer, prompts, targets, task.match, task.max_new_tokens, batch_size, task.stop)
    return {task.name: result}


def evaluate_task(model: nn.Module, tokenizer: Any, task: EvalTaskConfig, batch_size: int = 16) -> dict[str, Score]:
    """Scores of one eval task, tagged with its role and train_task."""
    results = _run_task(model, tokenizer, task, batch_size)
    return {key: Score(**r.as_dict(), role=task.role, train_task=task.train_task) for key, r in results.items()}


def evaluate_suite(model: nn.Module, tokenizer: Any, suite: SuiteConfig, batch_size: int = 16) -> dict[str, Score]:
    """Every eval task of the suite, in suite order (see the module docstring for the keys)."""
    scores: dict[str, Score] = {}
    for task in suite.tasks:
        scores.update(evaluate_task(model, tokenizer, task, batch_size))
    return scores
