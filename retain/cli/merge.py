"""``retain merge``: WiSE-FT interpolation of a fine-tuned model (or LoRA adapter) with its base, an alpha
sweep against an eval suite, and TIES/DARE merging of several adapters. Library code: ``retain.models.merging``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.table import Table

from retain.cli.app import command, console, err_console
from retain.cli.app import fail as _fail
from retain.errors import ConfigError, ModelError
from retain.io import empty_folder, prepare_output
from retain.io_lock import writing_to


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_dir_of(tuned: str) -> Path | None:
    """The run folder a model directory came from (``runs/x/final`` or ``runs/x/tasks/00-t`` -> ``runs/x``)."""
    here = Path(tuned).resolve()
    for folder in (here.parent, here.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def run_suite_of(tuned: str) -> Path | None:
    """The eval suite named by the tuned run's config (``eval.suite``), if any."""
    from retain.config import read_yaml

    run_dir = run_dir_of(tuned)
    if run_dir is None:
        return None
    config_path = run_dir / "config.yaml"
    try:
        config = read_yaml(config_path, "tuned run's config") or {}
        suite = ((config.get("eval") or {}) if isinstance(config, dict) else {}).get("suite")
    except (ConfigError, AttributeError) as err:
        raise ConfigError(
            f"{config_path}: cannot read the tuned run's config to find its eval suite ({err})",
            hint="pass --suite suite.yaml",
        ) from None
    return Path(suite) if suite else None


def _load(base: str, tuned: list[str], method: str, weights: list[float] | None, density: float, seed: int):
    """(working model, tokenizer, set_alpha(alpha) -> model, save(model, dir), adapters?) for full models or adapters."""
    from retain.config import ModelConfig
    from retain.models.loading import apply_adapter, is_adapter_dir, load_model, load_tokenizer
    from retain.models.merging import AdapterScaler, FullInterpolator, merge_adapters

    adapters = [is_adapter_dir(t) for t in tuned]
    if any(adapters) and not all(adapters):
        _fail("give either LoRA adapter directories or one full model directory, not a mix")
    if not any(adapters):
        if len(tuned) > 1:
            _fail("several tuned models can be merged only as LoRA adapters; interpolate full models one at a time")
        if method not in ("auto", "wise-ft"):
            _fail(f"--method {method} merges LoRA adapters; '{tuned[0]}' is a full model (use --method wise-ft)")
    elif len(tuned) == 1 and method not in ("auto", "wise-ft"):
        _fail(f"--method {method} merges several adapters; with one adapter use --method wise-ft")
    base_model, tokenizer = load_model(ModelConfig(name_or_path=base))
    source = tuned[0] if (Path(tuned[0]) / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(source)
    if all(adapters):
        model = apply_adapter(base_model, tuned[0], base, adapter_name="default" if len(tuned) == 1 else "tuned0")
        if len(tuned) > 1:
            for i, path in enumerate(tuned[1:], start=1):
                apply_adapter(model, path, base, adapter_name=f"tuned{i}")
            names = [f"tuned{i}" for i in range(len(tuned))]
            merge_adapters(model, names, "ties_svd" if method == "auto" else method, weights, density, seed, name="default")
        scaler = AdapterScaler(model, "default")

        def save(m: Any, out: Path) -> None:
            m.peft_config["default"].base_model_name_or_path = base
            m.save_pretrained(out, safe_serialization=True)

        return scaler.model.to(_device()), tokenizer, scaler.at, save, True
    tuned_model, _ = load_model(ModelConfig(name_or_path=tuned[0]))
    try:
        interpolator = FullInterpolator(base_model, tuned_model)
    except ModelError as err:
        raise ModelError(f"cannot interpolate {tuned[0]} with the base model {base}: {err}", hint="pass the base model it was fine-tuned from") from None
    interpolator.model.to(_device())

    def save_full(m: Any, out: Path) -> None:
        m.save_pretrained(out, safe_serialization=True)

    return interpolator.model, tokenizer, interpolator.at, save_full, False


def suite_input_files(suite: Any) -> list[str]:
    """The suite's own data files and folders (inputs an output must never replace)."""
    return [path for task in suite.tasks for path in task.input_files().values()]


def check_alphas(values: list[float], allow_extrapolation: bool) -> None:
    """Alpha is the share of the fine-tuning update kept: [0, 1] unless extrapolation is asked for."""
    outside = [a for a in values if not 0.0 <= a <= 1.0]
    if outside and not allow_extrapolation:
        shown = ", ".join(f"{a:g}" for a in outside)
        _fail(
            f"--alpha must be in [0, 1] (0 = the base model, 1 = the fine-tuned one), got {shown}",
            hint="pass --allow-extrapolation to go beyond the fine-tuned model (alpha > 1) or away from it (alpha < 0)",
        )


def describe_written(alpha: float, method: str, tuned: list[str], adapters: bool, density: float, weights: list[float] | None) -> str:
    """What ``retain merge`` wrote, in words (the method, the inputs, how alpha was applied)."""
    if len(tuned) > 1:
        merged = "ties_svd" if method == "auto" else method
        weighting = f", weights {','.join(f'{w:g}' for w in weights)}" if weights else ""
        return (
            f"a LoRA adapter: {merged} merge of {len(tuned)} adapters (density {density:g}{weighting}), "
            f"its update scaled by alpha {alpha:g}"
        )
    if adapters:
        return f"a LoRA adapter: {tuned[0]}'s update scaled by alpha {alpha:g} (WiSE-FT)"
    return f"a full model: WiSE-FT interpolation {1 - alpha:g} x base + {alpha:g} x {tuned[0]}"


def _write(model: Any, tokenizer: Any, save: Callable[[Any, Path], None], out: Path) -> None:
    from retain.io import atomic_dir

    with atomic_dir(out) as tmp:
        save(model, tmp)
        tokenizer.save_pretrained(tmp)


def _with_run_results(results: Any, tuned: str) -> Any:
    """Put the tuned run's own results (``<run>/results.json``) in front of the sweep, so one report shows
    the training run and its learning-vs-forgetting curve over alpha."""
    from retain.results.schema import Results

    run_dir = run_dir_of(tuned)
    if run_dir is None or not (run_dir / "results.json").is_file():
        return results
    try:
        earlier = Results.load(run_dir / "results.json")
    except ValueError as err:
        err_console.print(f"[yellow]warning:[/] {err}; the report shows the sweep only")
        return results
    return results.model_copy(update={"runs": [*earlier.runs, *results.runs]})


def _print_sweep(result: Any) -> None:
    from retain.results.summary import fmt_num

    table = Table(title="WiSE-FT sweep: alpha chosen on the select part (◀), figures on the report part")
    for header in ("alpha", "new task", "general", "forgetting (1 - retention)", "forgetting on select"):
        table.add_column(header, justify="right")
    for p in result.points:
        mark = " ◀" if result.best_alpha is not None and p.alpha == result.best_alpha else ""
        table.add_row(f"{p.alpha:g}{mark}", fmt_num(p.new_task), fmt_num(p.general), fmt_num(p.forgetting),
                      fmt_num(p.select_forgetting))
    console.print(table)


@command
def merge_command(
    base: str = typer.Argument(..., help="Base model: local directory or hub id."),
    tuned: List[str] = typer.Argument(..., help="Fine-tuned model directory, or LoRA adapter directories (several are merged)."),
    alpha: str = typer.Option(
        "0.5", "--alpha", help='Share of the fine-tuning update to keep: a number in [0, 1], "sweep" (0, 0.1, ..., 1) or a list "0,0.3,0.6,1".'
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output: the model directory; for a sweep, a folder with results.json and report.html (the tuned run's results plus one run per alpha) and model/ (the chosen alpha)."
    ),
    max_forgetting: Optional[float] = typer.Option(
        None, "--max-forgetting", help="Sweep: keep the largest alpha whose general drop (1 - retention) is at most this, e.g. 0.05."
    ),
    suite: Optional[Path] = typer.Option(None, "--suite", help="Eval suite YAML for a sweep; default: the tuned run's eval.suite."),
    method: str = typer.Option(
        "auto", "--method", help="wise-ft (one model or adapter); for several adapters ties_svd (default), ties, dare_ties(_svd), dare_linear(_svd), magnitude_prune(_svd), linear, cat."
    ),
    density: float = typer.Option(0.5, "--density", help="TIES/DARE: share of update entries kept."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Several adapters: comma-separated weights (default 1 each)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Eval batch size for a sweep."),
    seed: int = typer.Option(0, "--seed", help="Seed of DARE's random drops."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a non-empty --out (never allowed when --out is, holds or is inside an input)."
    ),
    allow_extrapolation: bool = typer.Option(
        False, "--allow-extrapolation", help="Accept alpha outside [0, 1] (beyond the fine-tuned model, or away from it)."
    ),
) -> None:
    """Interpolate a fine-tuned model with its base (WiSE-FT), sweep alpha against forgetting, or merge adapters."""
    from retain.eval.sweep import alpha_sweep, parse_alphas, sweep_results
    from retain.models.merging import MERGE_METHODS

    if method not in ("auto", "wise-ft", *MERGE_METHODS):
        _fail(f"unknown --method '{method}'; choose wise-ft or one of {', '.join(MERGE_METHODS)}")
    try:
        alphas = parse_alphas(alpha)
        single = None if alphas is not None else float(alpha)
        parsed_weights = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        _fail(f"--alpha '{alpha}' (or --weights) is not a number, 'sweep' or a comma-separated list")
    check_alphas([single] if single is not None else list(alphas or []), allow_extrapolation)
    if alphas is None and max_forgetting is not None:
        _fail("--max-forgetting picks an alpha from a sweep: pass --alpha sweep")
    suite_config = None
    if alphas is not None:  # the suite and --out are checked before any model loads
        from retain.eval.suite import load_suite

        suite_path = suite or run_suite_of(tuned[0])
        if suite_path is None:
            _fail("--alpha sweep needs an eval suite: pass --suite suite.yaml (the tuned run has no eval.suite)")
        suite_config = load_suite(suite_path)
    inputs = [base, *tuned, *([str(suite_path), *suite_input_files(suite_config)] if suite_config is not None else [])]
    with writing_to(out, "retain merge", inputs=inputs, remove_if_created=True):  # a failed merge leaves no empty --out
        prepare_output(out, overwrite=overwrite, inputs=inputs)  # before any model loads
        model, tokenizer, at, save, adapters = _load(base, list(tuned), method, parsed_weights, density, seed)

        if alphas is None:
            _write(at(single), tokenizer, save, out)
            console.print(f"[green]written[/] {out}: {describe_written(single, method, list(tuned), adapters, density, parsed_weights)}")
            return

        from retain.eval.suite import evaluate_suite

        result = alpha_sweep(alphas, lambda a: evaluate_suite(at(a), tokenizer, suite_config, batch_size, part="both"),
                             max_forgetting)
        from retain.report import write_report

        results = sweep_results(result, base, tuned[0] if len(tuned) == 1 else "+".join(tuned))
        results = _with_run_results(results, tuned[0])
        if overwrite:  # the sweep ran: now the old contents go (a stale model/ must not outlive a failed budget)
            empty_folder(out)
        results.save(out / "results.json")
        write_report(results, out / "report.html")
        _print_sweep(result)
        console.print(f"results: {out / 'results.json'}  report: {out / 'report.html'}")
        if max_forgetting is None:
            return
        if result.best_alpha is None:
            _fail(f"no alpha keeps forgetting within {max_forgetting:g} (or the suite has no bounded general score)", code=1)
        _write(at(result.best_alpha), tokenizer, save, out / "model")
        console.print(f"[green]largest alpha within forgetting {max_forgetting:g}[/]: {result.best_alpha:g}; model in {out / 'model'}")
        console.print(f"written {out / 'model'}: {describe_written(result.best_alpha, method, list(tuned), adapters, density, parsed_weights)}")
