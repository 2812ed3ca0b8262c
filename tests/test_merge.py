"""WiSE-FT interpolation (full models and LoRA), TIES/DARE merging of adapters, the alpha sweep, and the
``retain merge`` command."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from retain.cli.merge import merge_command
from retain.eval.sweep import alpha_sweep, parse_alphas, sweep_results
from retain.models.merging import (
    AdapterScaler,
    FullInterpolator,
    interpolate,
    interpolate_state_dicts,
    merge_adapters,
    wise_ft,
)
from retain.models.tiny import tiny_model
from retain.results.schema import Results, Score

IDS = torch.randint(4, 60, (3, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def max_diff(a, b) -> float:
    return (logits(a) - logits(b)).abs().max().item()


def test_interpolation_by_hand_and_exact_ends():
    base, tuned = torch.tensor([1.0, 2.0, 0.1]), torch.tensor([3.0, 6.0, 0.7])
    assert torch.allclose(interpolate(base, tuned, 0.25), torch.tensor([1.5, 3.0, 0.25]))
    assert torch.equal(interpolate(base, tuned, 0.0), base) and torch.equal(interpolate(base, tuned, 1.0), tuned)
    steps = torch.tensor([5, 6])
    assert torch.equal(interpolate(steps, steps.clone(), 0.3), steps)
    with pytest.raises(ValueError, match="differ"):
        interpolate(steps, steps + 1, 0.3)
    with pytest.raises(ValueError, match="w2: cannot interpolate"):
        interpolate_state_dicts({"w": base, "w2": base}, {"w": tuned, "w2": tuned[:2]}, 0.5)
    with pytest.raises(ValueError, match="only the tuned model has"):
        interpolate_state_dicts({"w": base}, {"w": tuned, "extra": tuned}, 0.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from retain.models.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    base = tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    tuned = tiny_model("llama", len(tokenizer), seed=1, hidden=32, layers=2, heads=4)
    folder = tmp_path_factory.mktemp("merge")
    for name, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return base, tuned, folder, tokenizer


def test_wise_ft_ends_reproduce_base_and_tuned_outputs(pair):
    base, tuned, _, _ = pair
    assert max_diff(wise_ft(base, tuned, 0.0), base) <= 1e-5
    assert max_diff(wise_ft(base, tuned, 1.0), tuned) <= 1e-5
    half = wise_ft(base, tuned, 0.5)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = 0.5 * base.state_dict()[name] + 0.5 * tuned.state_dict()[name]
    assert torch.allclose(half.state_dict()[name], expected, atol=1e-7)
    assert max_diff(half, base) > 1e-3 and max_diff(half, tuned) > 1e-3
    interpolator = FullInterpolator(base, wise_ft(base, tuned, 1.0))
    assert max_diff(interpolator.at(0.0), base) <= 1e-5 and max_diff(interpolator.at(1.0), tuned) <= 1e-5


def lora_on(base, seed: int, r: int = 4, name: str = "default"):
    """A peft LoRA model with random (non-zero) B, as if trained."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def merged_plain(peft_model):
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def test_lora_scaling_is_wise_ft_of_the_update(pair):
    base, _, _, _ = pair
    tuned = lora_on(base, seed=3)
    tuned_out = logits(tuned)
    scaler = AdapterScaler(tuned)
    assert max_diff(scaler.at(0.0), base) <= 1e-5
    assert (logits(scaler.at(1.0)) - tuned_out).abs().max() <= 1e-5
    half_adapter = merged_plain(scaler.at(0.5))
    full_half = wise_ft(base, merged_plain(scaler.at(1.0)), 0.5)  # (1 - a) W + a (W + dW) = W + a dW
    assert max_diff(half_adapter, full_half) <= 1e-5


def test_ties_and_dare_merge_adapters_through_peft(pair):
    base, _, _, _ = pair
    single = lora_on(base, seed=3)
    expected = logits(single)

    twice = lora_on(base, seed=3, name="a")
    twice.add_adapter("b", twice.peft_config["a"])
    with torch.no_grad():
        for layer in [m for m in twice.modules() if hasattr(m, "lora_A") and "b" in m.lora_A]:
            layer.lora_A["b"].weight.copy_(layer.lora_A["a"].weight)
            layer.lora_B["b"].weight.copy_(layer.lora_B["a"].weight)
    # TIES of two identical task vectors with weight 1: the sign-agreeing mean is the vector itself
    merge_adapters(twice, ["a", "b"], "ties_svd", density=1.0)
    assert list(twice.peft_config) == ["merged"]
    assert (logits(twice) - expected).abs().max() <= 1e-4

    def two(seed_a, seed_b):
        model = lora_on(base, seed=seed_a, name="a")
        other = lora_on(base, seed=seed_b, name="b")
        model.add_adapter("b", other.peft_config["b"])
        model.load_state_dict({k: v for k, v in other.state_dict().items() if ".b." in k}, strict=False)
        return model, other

    model, other = two(3, 4)
    merge_adapters(model, ["a", "b"], "cat")  # cat is the exact sum of the updates
    plain_a, plain_b = merged_plain(lora_on(base, seed=3)), merged_plain(other)
    summed = merged_plain(lora_on(base, seed=3))
    reference = base.state_dict()
    summed.load_state_dict({k: v + plain_b.state_dict()[k] - reference[k] for k, v in plain_a.state_dict().items()})
    assert max_diff(model, summed) <= 1e-4 and max_diff(summed, plain_a) > 1e-3

    dare_1, _ = two(3, 4)
    dare_2, _ = two(3, 4)
    merge_adapters(dare_1, ["a", "b"], "dare_linear_svd", density=0.5, seed=7)
    merge_adapters(dare_2, ["a", "b"], "dare_linear_svd", density=0.5, seed=7)
    assert max_diff(dare_1, dare_2) == 0.0  # DARE's random drops are seeded
    linear, _ = two(3, 4)
    merge_adapters(linear, ["a", "b"], "dare_linear_svd", density=1.0, seed=7)
    assert max_diff(dare_1, linear) > 1e-4  # and they do drop entries
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_adapters(linear, ["merged", "merged"], "average")


def _score(value: float, role: str = "general", task: str | None = None) -> Score:
    return Score(value=value, metric="accuracy", higher_is_better=True, bounded=True, role=role, train_task=task)


def fake_eval(alpha: float) -> dict[str, Score]:
    """General score falls by 0.3 per unit alpha from 1.0; the new task rises with alpha."""
    return {"general": _score(1.0 - 0.3 * alpha), "task": _score(0.2 + 0.6 * alpha, "task", "contracts")}


def test_sweep_picks_the_largest_alpha_within_the_budget():
    assert parse_alphas("0.5") is None and parse_alphas("sweep")[:3] == [0.0, 0.1, 0.2] and len(parse_alphas("sweep")) == 11
    assert parse_alphas("1,0.5") == [0.5, 1.0]
    seen: list[float] = []
    result = alpha_sweep([0.2, 0.3, 0.4, 1.0], lambda a: (seen.append(a), fake_eval(a))[1], max_forgetting=0.1)
    assert seen == [0.0, 0.2, 0.3, 0.4, 1.0]  # alpha 0 (the base) is always the reference
    assert result.best_alpha == 0.3  # forgetting 0.09 <= 0.1 < 0.12 at 0.4
    assert [round(p.forgetting, 6) for p in result.points] == [0.0, 0.06, 0.09, 0.12, 0.3]
    assert result.points[-1].new_task == pytest.approx(0.8) and result.task_names == ["contracts"]
    assert alpha_sweep([1.0], fake_eval, max_forgetting=0.01).best_alpha == 0.0
    assert alpha_sweep([1.0], fake_eval).best_alpha is None


def test_sweep_results_feed_the_report(tmp_path):
    from retain.report import write_report
    from retain.results.summary import sweep_series

    results = sweep_results(alpha_sweep([0.5, 1.0], fake_eval, 0.2), "base-model", "runs/x/final")
    assert [r.name for r in results.runs] == ["wise-ft@alpha=0", "wise-ft@alpha=0.5", "wise-ft@alpha=1"]
    last = results.runs[-1].summary
    assert last.general_retention == pytest.approx(0.7) and last.new_task_score == pytest.approx(0.8)
    assert {label for label, _, _ in sweep_series(results)["alpha"]} == {"wise-ft: new task", "wise-ft: retention"}
    results.save(tmp_path / "results.json")
    assert Results.load(tmp_path / "results.json").runs[1].summary.general_retention == pytest.approx(0.85)
    assert "alpha" in write_report(results, tmp_path / "report.html").read_text()


@pytest.fixture
def cli():
    app = typer.Typer()
    app.command()(merge_command)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_merge_command_writes_interpolated_full_models(pair, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tuned, folder, _ = pair
    for alpha, reference in (("0", base), ("1", tuned)):
        result = cli(folder / "base", folder / "tuned", "--alpha", alpha, "--out", tmp_path / alpha)
        assert result.exit_code == 0, result.output
        assert max_diff(AutoModelForCausalLM.from_pretrained(tmp_path / alpha), reference) <= 1e-5
    result = cli(folder / "base", folder / "tuned", "--alpha", "0.5", "--out", tmp_path / "half")
    assert result.exit_code == 0 and max_diff(AutoModelForCausalLM.from_pretrained(tmp_path / "half"), wise_ft(base, tuned, 0.5)) <= 1e-5
    assert cli(folder / "base", folder / "tuned", "--alpha", "x", "--out", tmp_path / "x").exit_code == 2
    assert cli(folder / "base", folder / "tuned", "--method", "ties", "--out", tmp_path / "y").exit_code == 2


def test_merge_command_scales_an_adapter_and_sweeps_with_a_suite(pair, cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _, folder, tokenizer = pair
    adapter = lora_on(base, seed=5)
    adapter.save_pretrained(tmp_path / "adapter")
    result = cli(folder / "base", tmp_path / "adapter", "--alpha", "0.5", "--out", tmp_path / "half")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "half" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder / "base")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"), tmp_path / "half")
    assert max_diff(reloaded, merged_plain(AdapterScaler(lora_on(base, seed=5)).at(0.5))) <= 1e-5

    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}."}) + "\n" for i in range(8)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "tasks:\n"
        "  - {name: general_text, type: next_token_accuracy, data: {path: general.jsonl, max_length: 16}}\n"
        "  - {name: new_skill, type: next_token_accuracy, role: task, train_task: skill, data: {path: general.jsonl, max_length: 16}}\n"
    )
    # the adapter as a run's final model: the run's suite and results are found from its folder
    run_dir = tmp_path / "run"
    adapter.save_pretrained(run_dir / "final")
    (run_dir / "config.yaml").write_text(f"eval: {{suite: {suite}}}\n")
    earlier = sweep_results(alpha_sweep([1.0], fake_eval), "base", "x")
    earlier.model_copy(update={"runs": [earlier.runs[-1].model_copy(update={"name": "lora"})]}).save(run_dir / "results.json")
    result = cli(folder / "base", run_dir / "final", "--alpha", "0,0.5,1", "--max-forgetting", "1.0", "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    results = Results.load(tmp_path / "sweep" / "results.json")
    assert [r.name for r in results.runs] == ["lora", "wise-ft@alpha=0", "wise-ft@alpha=0.5", "wise-ft@alpha=1"]
    first = results.runs[1].summary
    assert first.general_before == first.general_after  # alpha 0 is the base model
    assert (tmp_path / "sweep" / "report.html").is_file() and (tmp_path / "sweep" / "model" / "adapter_config.json").is_file()
    assert "largest alpha within forgetting 1: 1" in result.output
    impossible = cli(folder / "base", tmp_path / "adapter", "--alpha", "sweep:0.5,1", "--suite", suite, "--max-forgetting", "-1", "--out", tmp_path / "none")
    assert impossible.exit_code == 1 and "no alpha" in impossible.output


def test_the_sweep_chooses_alpha_on_the_select_part_and_reports_the_report_part():
    """Report forgetting of alpha 0.5 is within the budget, but the select part says it forgets too much:
    the choice follows select (the report part is never what chooses)."""
    from retain.eval.sweep import alpha_sweep
    from retain.results.schema import PartScore, Score

    def general(report: float, select: float) -> dict[str, Score]:
        return {"g": Score(value=report, metric="accuracy", higher_is_better=True, bounded=True, role="general",
                           part="report", select=PartScore(value=select, n=10))}

    table = {0.0: general(0.8, 0.8), 0.5: general(0.78, 0.70), 1.0: general(0.6, 0.6)}
    result = alpha_sweep([0.5, 1.0], lambda a: table[a], max_forgetting=0.05)
    by_alpha = {p.alpha: p for p in result.points}
    assert by_alpha[0.5].forgetting == pytest.approx(0.025) and by_alpha[0.5].select_forgetting == pytest.approx(0.125)
    assert result.best_alpha == 0.0
