"""Run configuration: pydantic models, YAML loading, ``--set key=value`` overrides.

Every config error names the offending key path (``train.lr``, ``strategies[1].lamda``) and, for an
unknown key, the closest valid name, because a silently ignored typo in a fine-tuning config costs a
whole training run.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retain.errors import ConfigError
from retain.io import check_safe_name

#: A name that becomes a file or folder name (``retain.io.unsafe_name_problem`` says what is allowed).
SafeName = Annotated[str, AfterValidator(check_safe_name)]

__all__ = ["ConfigError", "RunConfig", "load_config", "load_config_dict", "read_yaml"]  # ConfigError re-exported for old imports


# --------------------------------------------------------------------------------------------
# Reading YAML: one loader for every file a user writes


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names a key twice (YAML would silently keep the second value)."""

    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(problem=f"key {key!r} appears twice (lines {first} and {second})")
        self.key, self.first, self.second = key, first, second


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key: two ``train:`` blocks silently became the second
    one (batch 2 -> 8). Keys brought in by a ``<<`` merge may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
            except TypeError:  # an unhashable key: the base class says so
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML document in ``path`` (``what``: "run YAML", "bench config", ...); every problem is a
    ``ConfigError`` naming the file, and the line where YAML can tell."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise ConfigError(
            f"{path}: key {err.key!r} appears twice (lines {err.first} and {err.second}); YAML would silently keep "
            "only the second", hint="keep one of them (merge their contents into one block)",
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 ({err}); save the {what} as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read as a {what}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(StrictModel):
    """bitsandbytes quantization at load time (QLoRA): the base weights stay quantized and frozen, adapters train.

    Needs a CUDA device and ``pip install bitsandbytes``; refused with a message where either is missing.
    """

    load_in_4bit: bool = Field(False, description="Load the weights in 4 bit (QLoRA).")
    load_in_8bit: bool = Field(False, description="Load the weights in 8 bit (LLM.int8).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype of the matmuls on dequantized weights."
    )
    bnb_4bit_use_double_quant: bool = Field(False, description="Quantize the quantization constants too.")
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Storage dtype of packed 4-bit weights (bfloat16 for FSDP-QLoRA)."
    )

    @model_validator(mode="after")
    def _one_width(self) -> "QuantizationConfig":
        if self.load_in_4bit == self.load_in_8bit:
            raise ValueError("set exactly one of load_in_4bit or load_in_8bit to true")
        return self


class ModelConfig(StrictModel):
    name_or_path: str = Field(description="Local model directory or Hugging Face hub id.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; defaults to the model's.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weight dtype at load time."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub; off unless you trust it.")
    quantization: QuantizationConfig | None = Field(
        None, description="bitsandbytes quantization (QLoRA with lora); needs a CUDA device."
    )


class DataConfig(StrictModel):
    path: str = Field(description="File (.jsonl/.json/.csv/.tsv/.txt/.parquet), directory, or hub dataset name.")
    format: Literal["auto", "text", "prompt_completion", "chat"] = Field(
        "auto", description="auto picks chat/prompt_completion/text from the fields present."
    )
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    split: str = Field("train", description="Split name for hub datasets.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    max_length: int = Field(256, gt=1, description="Tokens per example (window length for packed text).")
    pack: bool = Field(True, description="Pack plain text into full windows (text format only).")
    add_eos: bool = Field(True, description="Append EOS to each document/completion.")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Held-out share, split by seed.")
    limit: int | None = Field(None, gt=0, description="Use at most this many records (after shuffling by seed).")
    allow_longer_than_model: bool = Field(
        False, description="Keep a max_length above the model's context (max_position_embeddings); otherwise it is "
        "capped there with a warning.",
    )
    truncation: Literal["keep_completion", "right", "left"] = Field(
        "keep_completion",
        description="How an example longer than max_length is cut: keep_completion removes the start of the prompt "
        "(chats: the oldest turns first) so the part that is trained survives; right keeps the start; left keeps the end.",
    )


class TaskConfig(StrictModel):
    name: SafeName = Field(description="Task name, used in logs, outputs (a folder name) and the accuracy matrix.")
    data: DataConfig
    steps: int | None = Field(None, gt=0, description="Optimizer steps for this task; default train.steps_per_task.")


class TrainConfig(StrictModel):
    steps_per_task: int = Field(100, gt=0, description="Optimizer steps per task unless the task sets its own.")
    batch_size: int = Field(8, gt=0, description="Micro-batch size per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "mofo"] = Field(
        "adamw", description="adamw (torch's), or mofo: Adam that moves only the mofo_fraction of each weight tensor "
        "with the largest momentum each step (Chen et al. 2024; retain.train.optim)."
    )
    mofo_fraction: float = Field(
        0.15, gt=0, le=1, description="optimizer: mofo: share of each tensor's entries updated per step (the authors' 0.15)."
    )
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, description="Clip the gradient norm; null disables clipping.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "aim", "comet_ml"]] = Field(
        default_factory=list, description="accelerate trackers, e.g. [tensorboard]."
    )
    progress: bool = Field(True, description="Show a rich progress bar.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about a third more compute."
    )
    max_nonfinite_steps: int = Field(
        3, gt=0, description="A step with a non-finite loss or gradient is skipped; stop after this many in a row."
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Several processes: ddp (each holds the whole model) or fsdp (FSDP2: weights, gradients, "
        "optimizer and strategy state sharded per transformer block; retain.train.sharding)."
    )


class CheckpointConfig(StrictModel):
    every: int = Field(0, ge=0, description="Save every N optimizer steps (0: only at the end of each task).")
    keep: int = Field(1, gt=0, description="How many step checkpoints to keep.")


class EvalConfig(StrictModel):
    suite: str | None = Field(None, description="Suite YAML file evaluated after every task.")
    every_n_steps: int = Field(0, ge=0, description="Also evaluate every N steps (0: only after each task).")
    batch_size: int = Field(16, gt=0)
    allow_overlap: bool = Field(
        False, description="Train even though training text overlaps the suite's texts (--allow-overlap); "
        "the overlap is recorded in results.json."
    )


class OutputConfig(StrictModel):
    dir: str = Field("runs/retain", description="Run directory: checkpoints, per-task outputs, final model.")
    merge: bool = Field(False, description="With adapters, also save the merged full model.")
    save_per_task: bool = Field(True, description="Save a model/adapter directory after every task.")


class BudgetConfig(StrictModel):
    """A forgetting budget the run enforces (``retain.train.budget``): bounds on what the model may lose,
    measured every ``check_every`` steps on a fixed subset of the eval suite. Every declared strength of
    the hybrid adapts to hold the bounds (its configured value is only the starting point), and the best
    in-budget point of each task is kept."""

    min_general_retention: float | None = Field(
        None, gt=0, lt=1, description="Floor on general score after / before (mean bounded general evals)."
    )
    max_kl: float | None = Field(None, gt=0, description="Ceiling on KL(base || model), nats/token, on the probe prompts.")
    max_task_kl: float | None = Field(
        None, gt=0, description="Ceiling on KL(base || model), nats/token, on the current task's own inputs "
        "(Shenfeld et al. 2025, RL's Razor: a forgetting signal that needs no held-out text)."
    )
    max_task_forgetting: float | None = Field(
        None, gt=0, le=1, description="Ceiling on the mean Chaudhry forgetting of earlier tasks (needs 2+ tasks)."
    )
    check_every: int = Field(25, gt=0, description="Optimizer steps between measurements.")
    early_checks: int = Field(
        2, ge=0, le=6, description="Extra checks in each task's first interval, at check_every/2, /4, ... (most "
        "forgetting happens early)."
    )
    on_exhausted: Literal["rollback", "stop", "warn"] = Field(
        "rollback",
        description="A task that ends over budget: rollback restores its best in-budget point; stop also ends the "
        "run (exit 1), as does a check over budget with every strength at its limit; warn prints and goes on.",
    )
    adapt: bool = Field(True, description="Move the strategies' strengths; false: keep them, only roll back.")
    probe_examples: int = Field(
        32, gt=0, description="Per eval, at most this many windows/records (a fixed seeded subset) between task ends."
    )
    margin: float = Field(
        0.2, gt=0, lt=1,
        description="Share of each bound's allowance (e.g. the drop 1 - min_general_retention) left unspent without "
        "moving the strengths; more slack than that lowers them.",
    )
    max_step: float = Field(1.0, gt=0, le=3, description="Largest change of a strength per check, in decades.")

    @model_validator(mode="after")
    def _some_bound(self) -> "BudgetConfig":
        if (self.min_general_retention is None and self.max_kl is None and self.max_task_forgetting is None
                and self.max_task_kl is None):
            raise ValueError("a budget needs at least one bound: min_general_retention, max_kl, max_task_kl or "
                             "max_task_forgetting")
        return self


class StrategySpec(BaseModel):
    """One entry of ``strategies``: a registered name and that strategy's own parameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GuideConstraints(StrictModel):
    """What ``retain recommend`` was asked for (its ``--compute``/``--privacy``/``--stakes``/``--adapters``).
    A key left out is the widest value (compute high, privacy normal, stakes normal, weights any)."""

    compute: Literal["low", "medium", "high"] = "high"
    privacy: Literal["strict", "normal"] = "normal"
    stakes: Literal["high", "normal"] = "normal"
    weights: Literal["adapters", "full", "any"] = "any"


class RunConfig(StrictModel):
    model: ModelConfig
    tasks: list[TaskConfig] = Field(min_length=1)
    strategies: list[StrategySpec] = Field(default_factory=lambda: [StrategySpec(name="full")])
    general_data: DataConfig | None = Field(
        None,
        description="Text representative of what the model must keep (replay pool, distillation anchors, "
        "Fisher calibration). Keep it disjoint from the text you evaluate on.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    budget: BudgetConfig | None = Field(
        None, description="A forgetting budget the run enforces: strengths adapt, the best in-budget model is kept."
    )
    constraints: GuideConstraints | None = Field(
        None, description="Recorded by retain recommend; retain tune never searches outside them; retain train ignores it."
    )

    @field_validator("strategies", mode="before")
    @classmethod
    def _names_as_specs(cls, value: Any) -> Any:
        """Accept ``[lora, ewc]`` and ``lora+ewc`` shorthands besides full mappings."""
        if isinstance(value, str):
            value = value.split("+")
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _unique_task_names(self) -> "RunConfig":
        names = [t.name for t in self.tasks]
        for name in dict.fromkeys(n for n in names if names.count(n) > 1):
            where = " and ".join(f"tasks[{i}].name" for i, n in enumerate(names) if n == name)
            raise ValueError(f"task names must be unique: {where} are both '{name}'")
        return self

    def steps_for(self, task: TaskConfig) -> int:
        return task.steps or self.train.steps_per_task

    def input_paths(self) -> list[str]:
        """Every file or folder name the run reads (model, tokenizer, data, eval suite, strategy files);
        an output must never replace one of them. Hub ids are listed too: they name no local path."""
        paths = [self.model.name_or_path, self.model.tokenizer, *(t.data.path for t in self.tasks), self.eval.suite]
        if self.general_data is not None:
            paths.append(self.general_data.path)
        for spec in self.strategies:
            params = spec.params
            data = params.get("data")
            paths.append(data.get("path") if isinstance(data, dict) else None)
            paths += [params.get(key) for key in _strategy_path_keys(spec.name)[0]]
        return [p for p in paths if isinstance(p, str) and p]


# --------------------------------------------------------------------------------------------
# Loading, overrides and readable errors


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the config classes along an error location to find the section that holds the key."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return current
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current


def closest_name(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The valid name a typo most likely meant (close spelling, or one is a prefix of the other)."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if match:
        return match[0]
    prefixed = [c for c in choices if name.startswith(c) or c.startswith(name)]
    return max(prefixed, key=len) if prefixed else None


def _set_by(path: str, overrides: dict[str, str]) -> str | None:
    """The ``--set`` item that wrote the value at ``path`` (or a section above it), if any."""
    for key, item in overrides.items():
        if path == key or path.startswith((key + ".", key + "[")):
            return item
    return None


def format_validation_error(
    err: ValidationError, root: type[BaseModel], source: str, overrides: list[str] | None = None
) -> ConfigError:
    """One line per problem, naming the key path; a value that came from ``--set`` is blamed on the
    ``--set``, not on the YAML file that never held it."""
    set_at = {_loc_to_path(tuple(parse_override(item)[0])): item for item in overrides or []}
    lines, from_set = [], []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = _loc_to_path(loc)
        if e["type"] == "extra_forbidden":
            section = _model_at(root, loc[:-1])
            valid = list(getattr(section, "model_fields", {}))
            hint = closest_name(str(loc[-1]), valid)
            extra = f"; did you mean '{hint}'?" if hint else ""
            lines.append(f"unknown key '{path}'{extra}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{path}'")
        elif not path:  # a check across keys: its message names the keys itself
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"'{path}': {str(e['msg']).removeprefix('Value error, ')} (got {e.get('input')!r})")
        item = _set_by(path, set_at) if path else None
        from_set.append(item is not None)
        if item is not None:
            lines[-1] = f"--set {item}: {lines[-1]}"
    where = "invalid --set value" if all(from_set) else f"invalid config in {source}"
    return ConfigError(f"{where}:\n  " + "\n  ".join(lines))


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """``train.lr=3e-4`` -> (['train', 'lr'], 0.0003); ``strategies[0].r=16`` and ``strategies.0.r`` both work."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    parts: list[str | int] = []
    for token in key.replace("[", ".").replace("]", "").split("."):
        if token == "":
            continue
        parts.append(int(token) if token.isascii() and token.isdigit() else token)
    if not parts:
        raise ConfigError(f"--set '{item}': empty key")
    return parts, parse_value(raw)


def parse_value(raw: str) -> Any:
    """YAML scalars, plus ``1e-4``-style floats that YAML 1.1 would leave as strings; text that is not
    YAML is kept as written."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):
        return raw  # not YAML: the text as written (e.g. a path with ': ' in it)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        _set_at(data, parts, value, item)
    return data


def _set_at(data: dict[str, Any], parts: list[str | int], value: Any, item: str) -> None:
    """Set ``value`` at the key path ``parts``, creating sections on the way; a ConfigError naming the
    ``--set`` item when the path runs through a value or past the end of a list."""
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = _loc_to_path(tuple(parts[:i])) or "the top level"
        if isinstance(node, list):
            if not isinstance(part, int):
                raise ConfigError(f"--set '{item}': '{here}' is a list; address an entry as {here}[0]")
            if part > len(node) or (part == len(node) and not last):
                raise ConfigError(f"--set '{item}': index {part} out of range ('{here}' has {len(node)} entries)")
            if last:
                node.append(value) if part == len(node) else node.__setitem__(part, value)
                return
            node = node[part]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = [] if isinstance(parts[i + 1], int) else {}
            node = node[part]
        else:
            raise ConfigError(f"--set '{item}': '{here}' is a value ({node!r}), not a section")


def _normalize_strategy_list(data: dict[str, Any]) -> None:
    """Turn shorthand strategy entries into mappings so overrides can address their params."""
    strategies = data.get("strategies")
    if isinstance(strategies, str):
        strategies = strategies.split("+")
    if isinstance(strategies, list):
        data["strategies"] = [{"name": s} if isinstance(s, str) else s for s in strategies]


def placeholder_keys(node: Any, prefix: str = "") -> list[str]:
    """Key paths whose value is still a ``<REPLACE ...>`` placeholder (``retain recommend --out`` writes them)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in placeholder_keys(value, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in placeholder_keys(value, f"{prefix}[{i}]")]
    return [prefix] if isinstance(node, str) and "<REPLACE " in node else []  # also under a resolved folder


def load_config_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> RunConfig:
    data = dict(data)
    _normalize_strategy_list(data)
    if overrides:
        data = apply_overrides(data, overrides)
    unfilled = placeholder_keys(data)
    if unfilled:
        raise ConfigError(
            f"{source}: still holds placeholders at {', '.join(unfilled)}",
            hint="replace each <REPLACE ...> value with your model, data or suite (or pass --set KEY=VALUE)",
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise format_validation_error(err, RunConfig, source, overrides) from None


# --------------------------------------------------------------------------------------------
# Relative paths in a run YAML start from the YAML's folder

#: File suffixes of local data files (``retain.data.records`` reads these).
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
#: (input, output) config keys of a strategy that name a file or folder it reads / writes. Strategies
#: declare them (``Strategy.input_path_keys``); the strategy registry, a layer above, installs the
#: look-up when it is imported (``use_strategy_path_keys``), so this module never names a strategy.
StrategyPathKeys = Callable[[str], tuple[tuple[str, ...], tuple[str, ...]]]
_strategy_path_keys: StrategyPathKeys = lambda name: ((), ())


def use_strategy_path_keys(look_up: StrategyPathKeys) -> None:
    """Install the look-up of the path keys each strategy declares (``retain.strategies.registry``)."""
    global _strategy_path_keys
    _strategy_path_keys = look_up


def resolve_path(value: str, base: Path, kind: Literal["path", "data", "model"]) -> str:
    """``value`` as an absolute path against ``base`` (the YAML's folder) when it names a local path.

    ``path`` keys (``eval.suite``, ``output.dir``, strategy ``file``/``reuse_dir``/``output_dir``) are always
    local. ``data`` and ``model`` values may be hub names (``imdb``, ``Qwen/Qwen2.5-0.5B``): they are
    resolved when they start with ``./``/``../``, exist beside the YAML, or (data) end in a data-file suffix;
    otherwise they are kept as written.
    """
    if not value or Path(value).expanduser().is_absolute() or value.startswith("~"):
        return value
    candidate = Path(os.path.normpath(base / value))
    local = (
        kind == "path"
        or value.startswith(("./", "../"))
        or candidate.exists()
        or (kind == "data" and Path(value).suffix.lower() in DATA_FILE_SUFFIXES)
    )
    return str(candidate) if local else value


def _resolve_at(node: Any, key: str, base: Path, kind: Literal["path", "data", "model"]) -> None:
    if isinstance(node, dict) and isinstance(node.get(key), str):
        node[key] = resolve_path(node[key], base, kind)


def resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve the path keys of a raw run mapping against ``base`` (in place; also returned).

    Keys: ``model.name_or_path``, ``model.tokenizer``, ``tasks[i].data.path``, ``general_data.path``,
    ``eval.suite``, ``output.dir``, and per strategy ``data.path`` and the path keys it declares
    (``file``, ``reuse_dir``, ``output_dir``).
    """
    _resolve_at(data.get("model"), "name_or_path", base, "model")
    _resolve_at(data.get("model"), "tokenizer", base, "model")
    for task in data.get("tasks") if isinstance(data.get("tasks"), list) else []:
        if isinstance(task, dict):
            _resolve_at(task.get("data"), "path", base, "data")
    _resolve_at(data.get("general_data"), "path", base, "data")
    _resolve_at(data.get("eval"), "suite", base, "path")
    _resolve_at(data.get("output"), "dir", base, "path")
    for spec in data.get("strategies") if isinstance(data.get("strategies"), list) else []:
        if isinstance(spec, dict):
            _resolve_at(spec.get("data"), "path", base, "data")
            inputs, outputs = _strategy_path_keys(str(spec.get("name", "")))
            for key in (*inputs, *outputs):
                _resolve_at(spec, key, base, "path")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass the path to a run YAML (see README 'Config').")
    data = read_yaml(path, "run YAML") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys model, tasks, strategies, train, ...")
    data = dict(data)
    _normalize_strategy_list(data)
    resolve_relative_paths(data, Path(os.path.abspath(path)).parent)  # --set values below stay relative to the cwd
    return load_config_dict(data, overrides, source=str(path))
