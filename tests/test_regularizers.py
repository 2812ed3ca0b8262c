"""Weight-importance regularizers: l2, ewc (separate / online), ewc-lora, importance.

Math is checked against hand-computed values, statistics against brute-force per-example loops, and
each strategy end to end: it reduces forgetting on a tiny pre-trained model, composes with full and
lora, and resumes exactly after SIGKILL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from resume_utils import assert_kill_resume_matches, kill_after_first_checkpoint, write_config
from torch import nn

from retain.config import DataConfig, load_config_dict
from retain.data import build_task_data, collate
from retain.errors import ConfigError
from retain.losses.quadratic import (
    layer_coefficients,
    layer_of,
    penalty_per_layer,
    quadratic_penalty,
    restoring_force,
    top_elements,
    weighted_square,
)
from retain.models.adapters import lora_layers
from retain.models.tiny import char_tokenizer, tiny_model
from retain.stats.fisher import diagonal_fisher, lora_delta_fisher, online_update
from retain.stats.path_integral import (
    build_path_optimizer,
    path_integral_importance,
    record_path,
    si_importance,
    si_path_step_,
)
from retain.stats.per_example import (
    add_squared_,
    example_generator,
    linear_per_example_grad_sq,
    per_example_nll,
    sampled_labels,
)
from retain.strategies.ewc import Ewc, EwcConfig
from retain.strategies.ewc_lora import EwcLora, layer_delta, merge_and_reset
from retain.strategies.importance import Importance, ImportanceConfig
from retain.strategies.registry import available_strategies, build_strategy
from retain.train import finetune


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Two shared cores: several intra-op threads per process make tiny models 100x slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for training subprocesses
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


GENERAL = ["the cat sat on the mat.", "a dog ran in the park!", "she sells sea shells.", "the sun is warm today."]
TASK = [f"q{i}: add {i} {i + 1} = {2 * i + 1}" for i in range(12)]


def _write(path: Path, lines: list[str], repeat: int) -> Path:
    path.write_text("".join(json.dumps({"text": lines[i % len(lines)] + f" {i}"}) + "\n" for i in range(repeat)))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("regularizers")
    return {"general": _write(root / "general.jsonl", GENERAL, 48), "task": _write(root / "task.jsonl", TASK, 48)}


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, files):
    """A tiny Llama trained on the general text first, so fine-tuning on the task can make it forget."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pretrained")
    tok = char_tokenizer()
    tiny_model("llama", len(tok), seed=0, hidden=32, layers=2, heads=4).save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    outcome = finetune(_config(root / "init", files["general"], root / "run", ["full"], steps=80, lr=1e-2))
    return outcome.final_dir


def _config(model_dir, task_file, out, strategies, steps=30, lr=1e-2, general=None, tasks=None):
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": tasks or [{"name": "t", "data": {"path": str(task_file), "max_length": 32}}],
        "strategies": strategies,
        "train": {"steps_per_task": steps, "batch_size": 4, "lr": lr, "progress": False, "log_every": 5, "warmup_steps": 0},
        "output": {"dir": str(out)},
    }
    if general is not None:
        config["general_data"] = {"path": str(general), "max_length": 32}
    return load_config_dict(config)


def _examples(path: Path, tok=None):
    tok = tok or char_tokenizer()
    return build_task_data(DataConfig(path=str(path), max_length=32), tok, seed=0).train


def _mean_loss(model, examples) -> float:
    model.eval()
    with torch.no_grad():
        batch = collate(examples, 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_nll(logits, batch["labels"]).mean().item()


# ---------------------------------------------------------------------------------------------
# Pure math, against hand computation


def test_quadratic_penalty_value_and_gradient_by_hand():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    anchors = {"a": torch.zeros(2), "b": torch.tensor([[1.0]])}
    weights = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    value = quadratic_penalty({"a": a, "b": b}, anchors, weights)
    assert value.item() == pytest.approx(1 * 1 + 2 * 4 + 0.5 * 4)
    value.backward()
    assert a.grad.tolist() == pytest.approx([2.0, 8.0])  # 2 w (theta - anchor)
    assert b.grad.tolist() == [[2.0]]
    assert quadratic_penalty({"a": a}, anchors).item() == pytest.approx(5.0)  # unweighted: 1 + 4
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    anchor, weight = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: weighted_square(v, anchor, weight), (x,))
    assert torch.autograd.gradcheck(lambda v: weighted_square(v), (x,))


def test_layers_group_parameters_by_transformer_block():
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "block.3"
    assert layer_of("base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight") == "block.12"
    assert layer_of("transformer.h.0.attn.c_attn.weight") == "block.0"
    assert layer_of("model.embed_tokens.weight") == "embeddings"
    assert layer_of("lm_head.weight") == "head"
    assert layer_of("model.norm.weight") == "final"
    params = {"model.layers.0.w": torch.tensor([1.0]), "model.layers.1.w": torch.tensor([2.0]), "model.layers.1.v": torch.tensor([1.0])}
    per_layer = penalty_per_layer(params, {k: torch.zeros(1) for k in params})
    assert {k: v.item() for k, v in per_layer.items()} == {"block.0": 1.0, "block.1": 5.0}


def test_layer_coefficients_by_hand():
    terms = {"block.0": torch.tensor(1.0, requires_grad=True), "block.1": torch.tensor(3.0, requires_grad=True)}
    loss = torch.tensor(1.0)
    share = layer_coefficients(terms, loss, "penalty_share")
    assert share["block.0"].item() == pytest.approx(0.5) and share["block.1"].item() == pytest.approx(0.75)
    assert not share["block.1"].requires_grad  # coefficients steer, they are not optimized
    capped = layer_coefficients(terms, loss, "task_share")
    assert capped["block.0"].item() == pytest.approx(0.5) and capped["block.1"].item() == pytest.approx(0.25)
    assert all(v.item() == 1.0 for v in layer_coefficients(terms, loss, "uniform").values())


def test_online_update_and_squared_accumulation_by_hand():
    merged = online_update({"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([1.0, 1.0])}, gamma=0.5)
    assert merged["w"].tolist() == [2.0, 3.0]
    assert online_update(None, {"w": torch.tensor([1.0])}, 0.5)["w"].tolist() == [1.0]
    acc = {"w": torch.zeros(2)}
    add_squared_(acc, {"w": torch.tensor([1.0, -2.0])})
    add_squared_(acc, {"w": torch.tensor([3.0, 0.0])}, scale=0.5)
    assert acc["w"].tolist() == [1.0 + 4.5, 4.0]


def test_synaptic_intelligence_by_hand():
    omega = {"w": torch.zeros(3)}
    si_path_step_(omega, {"w": torch.tensor([1.0, -2.0, 1.0])}, {"w": torch.tensor([-0.1, 0.1, 0.1])})
    assert omega["w"].tolist() == pytest.approx([0.1, 0.2, -0.1])  # -g * delta
    importance = si_importance(omega, {"w": torch.tensor([-0.1, 0.1, 0.1])}, xi=1e-3)
    assert importance["w"].tolist() == pytest.approx([0.1 / 0.011, 0.2 / 0.011, 0.0])  # negative clamped
    raw = si_importance(omega, {"w": torch.tensor([-0.1, 0.1, 0.1])}, xi=1e-3, clamp=False)
    assert raw["w"][2].item() == pytest.approx(-0.1 / 0.011)


def test_linear_per_example_gradients_match_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 5, 3)
    target = torch.randn(4, 5, 2)
    expected = torch.zeros(2, 3)
    for n in range(4):
        layer.zero_grad()
        ((layer(x[n]) - target[n]) ** 2).sum().backward()
        expected += layer.weight.grad ** 2
    out = layer(x)
    delta = torch.autograd.grad(((out - target) ** 2).sum(), out)[0]
    assert torch.allclose(linear_per_example_grad_sq(x, delta), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Statistics against brute force


def _tokens(example) -> int:
    return sum(1 for label in example.labels[1:] if label != -100)


def test_empirical_fisher_matches_brute_force_per_example(llama, files):
    examples = _examples(files["task"])[:5]
    params = dict(llama.named_parameters())
    fisher, count = diagonal_fisher(llama, params, examples, lambda e: collate(e, 0), estimator="empirical")
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    tokens = sum(_tokens(e) for e in examples)
    llama.eval()
    for example in examples:  # independent path: HF's own (mean) loss times the example's tokens, and .grad
        llama.zero_grad()
        batch = collate([example], 0)
        (llama(input_ids=batch["input_ids"], labels=batch["labels"]).loss * _tokens(example)).backward()
        for n, p in params.items():
            expected[n] += p.grad ** 2 / tokens  # per scored token
    assert count == 5
    worst = max(((fisher[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-12)).item() for n in params)
    assert worst < 1e-5
    # the previous convention: squared gradients of each example's mean loss, averaged over examples
    per_example, _ = diagonal_fisher(
        llama, params, examples, lambda e: collate(e, 0), estimator="empirical", normalize="example"
    )
    name = "model.layers.0.mlp.up_proj.weight"
    by_hand = torch.zeros_like(params[name])
    for example in examples:
        llama.zero_grad()
        batch = collate([example], 0)
        llama(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        by_hand += params[name].grad ** 2 / len(examples)
    assert torch.allclose(per_example[name], by_hand, rtol=1e-4, atol=1e-12)
    # per-example squares are not the square of the batch gradient
    batch_fisher, batches = diagonal_fisher(
        llama, params, examples, lambda e: collate(e, 0), estimator="empirical_batch", batch_size=5
    )
    llama.zero_grad()
    batch = collate(examples, 0)
    logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example_nll(logits, batch["labels"], "sum").sum().backward()
    assert batches == 1
    assert torch.allclose(batch_fisher[name], params[name].grad ** 2 / tokens, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(batch_fisher[name], fisher[name], rtol=0.1)  # the cross terms count


def test_sampled_fisher_is_per_example_deterministic_and_differs_from_empirical(llama, files):
    examples = _examples(files["task"])[:4]
    params = {n: p for n, p in llama.named_parameters() if "layers.1" in n}
    run = lambda seed, samples=1: diagonal_fisher(  # noqa: E731
        llama, params, examples, lambda e: collate(e, 0), estimator="sampled", samples=samples, seed=seed
    )[0]
    first, again, other = run(0), run(0), run(1)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(first[name], again[name])
    assert not torch.allclose(first[name], other[name])
    # brute force with the same draws: HF loss on the sampled labels, per example
    expected = torch.zeros_like(params[name])
    llama.eval()
    for index, example in enumerate(examples):
        batch = collate([example], 0)
        logits = llama(input_ids=batch["input_ids"]).logits
        labels = sampled_labels(logits, batch["labels"], [example_generator(0, index, logits.device)])
        llama.zero_grad()
        (llama(input_ids=batch["input_ids"], labels=labels).loss * _tokens(example)).backward()
        expected += params[name].grad ** 2 / sum(_tokens(e) for e in examples)
    assert torch.allclose(first[name], expected, rtol=1e-4, atol=1e-12)
    empirical = diagonal_fisher(llama, params, examples, lambda e: collate(e, 0), estimator="empirical")[0]
    assert not torch.allclose(first[name], empirical[name], rtol=0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_delta_fisher_matches_base_weight_fisher(arch, tokenizer, files):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch, len(tokenizer), seed=0, hidden=32, layers=1, heads=4)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.1))
    layers = lora_layers(model)
    examples = _examples(files["task"], tokenizer)[:5]
    fisher, count = lora_delta_fisher(model, layers, examples, lambda e: collate(e, 0), estimator="empirical", batch_size=3)
    assert count == 5
    model.eval()
    bases = {name: module.get_base_layer().weight for name, module in layers.items()}
    for weight in bases.values():
        weight.requires_grad_(True)
    expected = {name: torch.zeros_like(w) for name, w in bases.items()}
    tokens = sum(_tokens(e) for e in examples)
    for example in examples:
        batch = collate([example], 0)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss * _tokens(example)
        grads = torch.autograd.grad(loss, list(bases.values()))
        for name, g in zip(bases, grads):
            expected[name] += g ** 2 / tokens
    for name, module in layers.items():
        want = expected[name].T if module.fan_in_fan_out else expected[name]  # Delta W is (out, in)
        assert fisher[name].shape == layer_delta(module).shape
        assert torch.allclose(fisher[name], want, rtol=1e-4, atol=1e-10), name


def test_general_pass_importance_is_sgd_path_integral_and_restores_weights(llama, files):
    examples = _examples(files["general"])[:8]
    params = {n: p for n, p in llama.named_parameters() if "layers.0.mlp" in n}
    before = {n: p.detach().clone() for n, p in params.items()}
    importance, steps = path_integral_importance(
        llama, params, examples, lambda e: collate(e, 0), lr=0.05, batch_size=4, xi=1e-3, optimizer="sgd"
    )
    assert steps == 2
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    # by hand: two SGD steps on the batch's token-mean loss, omega = lr * sum g^2, Omega = omega / (Delta^2 + xi)
    llama.eval()
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    with torch.no_grad():
        moved = {n: p.clone() for n, p in params.items()}
    for chunk in (examples[:4], examples[4:]):
        batch = collate(chunk, 0)
        logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_example_nll(logits, batch["labels"], "sum").sum() / sum(_tokens(e) for e in chunk)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads):
                omega[n] += 0.05 * g ** 2
                p -= 0.05 * g
    with torch.no_grad():
        for n, p in params.items():
            expected = omega[n] / ((p - moved[n]) ** 2 + 1e-3)
            assert torch.allclose(importance[n], expected, rtol=1e-3, atol=1e-9), n
            p.copy_(moved[n])


def _two_parameter_path(optimizer: str, lr: float, xi: float, steps: int = 2) -> dict[str, float]:
    """SI of L = 0.5 (3 a^2 + b^2) from (a, b) = (1, -2), recorded by ``record_path``."""
    a, b = nn.Parameter(torch.tensor(1.0, dtype=torch.float64)), nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    params = {"a": a, "b": b}

    def gradient() -> dict[str, torch.Tensor]:
        loss = 0.5 * (3 * a**2 + b**2)
        ga, gb = torch.autograd.grad(loss, [a, b])
        return {"a": ga, "b": gb}

    walker = build_path_optimizer([a, b], optimizer, lr)
    omega, change, taken = record_path(params, [gradient] * steps, walker)
    assert taken == steps
    return {n: v.item() for n, v in si_importance(omega, change, xi).items()}


def test_si_along_an_adam_path_equals_the_hand_computation():
    """Two-parameter problem, two steps. SGD: omega = lr * sum g^2. Adam: the steps are not -lr g, and
    the recorded omega / (Delta^2 + xi) must follow Adam's actual moves."""
    # SGD, lr 0.1: g1 = (3, -2), step (-0.3, 0.2); g2 = (2.1, -1.8), step (-0.21, 0.18)
    sgd = _two_parameter_path("sgd", 0.1, xi=0.1)
    assert sgd["a"] == pytest.approx((0.9 + 0.441) / (0.51**2 + 0.1))
    assert sgd["b"] == pytest.approx((0.4 + 0.324) / (0.38**2 + 0.1))
    # Adam, lr 0.1, betas (0.9, 0.999), eps 1e-8, by hand
    beta1, beta2, lr, eps = 0.9, 0.999, 0.1, 1e-8
    expected = {}
    for name, (theta, curvature) in {"a": (1.0, 3.0), "b": (-2.0, 1.0)}.items():
        m = v = omega = 0.0
        start = theta
        for t in (1, 2):
            g = curvature * theta
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            step = -lr * (m / (1 - beta1**t)) / (math.sqrt(v / (1 - beta2**t)) + eps)
            omega -= g * step
            theta += step
        expected[name] = omega / ((theta - start) ** 2 + 0.1)
    adam = _two_parameter_path("adamw", 0.1, xi=0.1)
    assert adam["a"] == pytest.approx(expected["a"], rel=1e-6)  # float32 accumulation
    assert adam["b"] == pytest.approx(expected["b"], rel=1e-6)
    assert adam["a"] / adam["b"] != pytest.approx(sgd["a"] / sgd["b"], rel=0.05)  # the trajectory matters
    assert _two_parameter_path("adamw", 0.1, xi=1.0)["a"] != pytest.approx(adam["a"], rel=0.05)  # and xi


def test_default_general_pass_depends_on_xi_and_the_optimizer(llama, files):
    """The old pass (plain SGD at a fine-tuning lr) gave Omega = lr * sum g^2 / xi: after normalization
    xi changed nothing. Along the default AdamW path the displacement is comparable to sqrt(xi)."""
    examples = _examples(files["general"])[:16]
    params = {n: p for n, p in llama.named_parameters() if "layers.0" in n}

    def omega(optimizer: str, xi: float) -> torch.Tensor:
        out, _ = path_integral_importance(
            llama, params, examples, lambda e: collate(e, 0), lr=3e-3, batch_size=4, xi=xi, optimizer=optimizer
        )
        flat = torch.cat([t.reshape(-1) for t in out.values()])
        return flat / flat.mean()

    adam_default, adam_large = omega("adamw", 1e-3), omega("adamw", 1e-1)
    assert ((adam_default - adam_large).abs() / adam_large.clamp_min(1e-3)).max() > 0.05
    sgd_default, sgd_large = omega("sgd", 1e-3), omega("sgd", 1e-1)
    assert torch.allclose(sgd_default, sgd_large, rtol=2e-3, atol=1e-6)  # the old behaviour: xi has no effect


def test_default_layer_balance_holds_a_layer_harder_the_further_it_drifts():
    """The restoring force c_l(T_l) * dT_l/d drift must not fall as the drift grows."""
    default = ImportanceConfig().layer_balance
    drifts = [0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    for balance in (default, "uniform"):
        forces = [restoring_force(balance, d) for d in drifts]
        assert all(b >= a for a, b in zip(forces, forces[1:])), (balance, forces)
    old = [restoring_force("task_share", d) for d in (1.0, 4.0, 16.0)]
    assert old == pytest.approx([1.0, 8 / 17, 32 / 257], rel=1e-6)  # c = 1/(1 + d^2), force = 2 d c
    assert old[2] < old[1] < old[0]  # task_share lets a far-drifted layer go (kept only for comparison)


# ---------------------------------------------------------------------------------------------
# Strategy state: penalty value, online accumulation, the ewc-lora merge


def _fake_ctx(model):
    return SimpleNamespace(unwrapped_model=model)


def test_ewc_penalty_and_gradient_equal_hand_computation(llama):
    strategy = Ewc(EwcConfig(lambda_=3.0))
    params = {n: p for n, p in llama.named_parameters()}
    torch.manual_seed(1)
    anchors = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in params.items()}
    fishers = {n: torch.rand_like(p) for n, p in params.items()}
    strategy.penalties = [{"label": "general", "anchor": anchors, "fisher": fishers}]
    term = strategy.extra_losses(None, {}, _fake_ctx(llama))["penalty"]
    expected = sum(1.5 * (fishers[n] * (p.detach() - anchors[n]) ** 2).sum() for n, p in params.items())
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    term.backward()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(params[name].grad, 3.0 * fishers[name] * (params[name].detach() - anchors[name]), atol=1e-7)


def test_online_ewc_accumulates_one_pair_and_separate_keeps_each():
    online = Ewc(EwcConfig(mode="online", gamma=0.5))
    separate = Ewc(EwcConfig(mode="separate"))
    for strategy in (online, separate):
        strategy._add("general", {"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])})
        strategy._add("task:a", {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])})
    assert len(online.penalties) == 1
    assert online.penalties[0]["fisher"]["w"].item() == 3.0  # 0.5 * 4 + 1
    assert online.penalties[0]["anchor"]["w"].item() == 1.0  # the latest weights
    assert [p["label"] for p in separate.penalties] == ["general", "task:a"]


def _peft_llama(tokenizer, r=4, arch="llama"):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch, len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights stored transposed (fan_in_fan_out)
def test_ewc_lora_merge_keeps_outputs_and_restarts_a_fresh_adapter(tokenizer, arch):
    model = _peft_llama(tokenizer, arch=arch)
    layers = lora_layers(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for module in layers.values():  # a trained adapter: B no longer zero
            module.lora_B["default"].weight.normal_(0, 0.2)
    ids = torch.randint(4, len(tokenizer), (2, 12))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merge_and_reset(layers, torch.Generator().manual_seed(7))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max().item() <= 1e-5
    assert all(m.lora_B["default"].weight.abs().sum() == 0 for m in layers.values())
    first_a = {n: m.lora_A["default"].weight.clone() for n, m in layers.items()}
    again = _peft_llama(tokenizer, arch=arch)
    merge_and_reset(lora_layers(again), torch.Generator().manual_seed(7))
    assert all(torch.equal(first_a[n], m.lora_A["default"].weight) for n, m in lora_layers(again).items())
    # kaiming-uniform(a=sqrt(5)) as peft initializes A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for module in layers.values():
        weight = module.lora_A["default"].weight
        assert weight.abs().max() <= 1 / math.sqrt(weight.shape[1])


def test_ewc_lora_merge_is_exact_with_a_bfloat16_base(tokenizer):
    """A 1e-4 update merged into bfloat16 weights mostly rounds away; the merge keeps the merged
    weights in float32 so it survives exactly, and the model still runs on bfloat16 activations."""
    model = _peft_llama(tokenizer, r=2).to(torch.bfloat16)
    layers = lora_layers(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for module in layers.values():  # Delta W = s B A with entries of about 1e-4
            module.lora_A["default"].weight.fill_(1.0)
            module.lora_B["default"].weight.uniform_(0.5e-4, 1.5e-4)
            module.lora_B["default"].weight.div_(module.scaling["default"] * module.lora_A["default"].weight.shape[0])
    deltas = {n: layer_delta(m).detach().float() for n, m in layers.items()}
    before = {n: m.get_base_layer().weight.detach().float().clone() for n, m in layers.items()}
    # the old merge, into bfloat16: a share of the update is lost
    name = sorted(layers)[0]
    rounded = (before[name] + deltas[name]).to(torch.bfloat16).float() - before[name]
    lost = ((rounded - deltas[name]).abs().sum() / deltas[name].abs().sum()).item()
    assert lost > 0.2
    merge_and_reset(layers, torch.Generator().manual_seed(0))
    for n, module in layers.items():
        weight = module.get_base_layer().weight
        assert weight.dtype == torch.float32
        assert torch.allclose(weight - before[n], deltas[n], rtol=1e-3, atol=1e-9), n
    ids = torch.randint(4, len(tokenizer), (2, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_ewc_lora_penalty_is_on_delta_w(tokenizer):
    model = _peft_llama(tokenizer, r=2)
    layers = lora_layers(model)
    with torch.no_grad():
        for module in layers.values():
            module.lora_B["default"].weight.fill_(0.1)
    strategy = EwcLora(EwcLora.Config(lambda_=2.0))
    strategy._layers = layers
    strategy.omega = {n: torch.full(layer_delta(m).shape, 0.5) for n, m in layers.items()}
    term = strategy.extra_losses(None, {}, _fake_ctx(model))["penalty"]
    expected = 0.0
    for module in layers.values():
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        expected += (0.5 * (module.scaling["default"] * b @ a) ** 2).sum().item()  # Omega * (s B A)^2
    assert term.item() == pytest.approx(1.0 * expected, rel=1e-5)  # lambda/2 = 1


# ---------------------------------------------------------------------------------------------
# End to end: less forgetting, hybrids, config errors, exact resume


def _general_loss_after(pretrained_dir, files, out, strategies, **kwargs) -> tuple[float, float]:
    outcome = finetune(_config(pretrained_dir, files["task"], out, strategies, general=files["general"], **kwargs))
    model = outcome.model.merge_and_unload() if hasattr(outcome.model, "merge_and_unload") else outcome.model
    return _mean_loss(model, _examples(files["general"])[:24]), _mean_loss(model, _examples(files["task"])[:24])


def test_regularizers_reduce_forgetting_and_still_learn(pretrained_dir, files, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    base_general, base_task = _mean_loss(base, _examples(files["general"])[:24]), _mean_loss(base, _examples(files["task"])[:24])
    full_general, full_task = _general_loss_after(pretrained_dir, files, tmp_path / "full", ["full"])
    assert full_general > base_general + 0.3, "the setup must forget without a regularizer"
    runs = {
        "ewc": ["full", {"name": "ewc", "lambda_": 2000.0}],
        "ewc-online": ["full", {"name": "ewc", "lambda_": 2000.0, "mode": "online", "estimator": "empirical"}],
        "l2": ["full", {"name": "l2", "lambda_": 5.0}],
        "importance": ["full", {"name": "importance", "lambda_": 5.0}],
    }
    for label, strategies in runs.items():
        general, task = _general_loss_after(pretrained_dir, files, tmp_path / label, strategies)
        assert general < full_general - 0.1, f"{label} forgot as much as full ({general:.3f} vs {full_general:.3f})"
        assert task < base_task - 0.3, f"{label} did not learn the task ({task:.3f} vs base {base_task:.3f})"


def test_lora_hybrids_run_and_ewc_lora_merges_into_the_base(pretrained_dir, files, tmp_path):
    lora = {"name": "lora", "r": 4, "dropout": 0.0}
    lora_general, _ = _general_loss_after(pretrained_dir, files, tmp_path / "lora", [lora], lr=3e-2)
    ewc_lora_general, ewc_lora_task = _general_loss_after(
        pretrained_dir, files, tmp_path / "ewc-lora", [lora, {"name": "ewc-lora", "lambda_": 1e4}], lr=3e-2,
        tasks=[{"name": "t1", "data": {"path": str(files["task"]), "max_length": 32}},
               {"name": "t2", "data": {"path": str(files["task"]), "max_length": 24}}],
    )
    assert ewc_lora_general < lora_general
    ewc_general, _ = _general_loss_after(pretrained_dir, files, tmp_path / "lora-ewc", [lora, {"name": "ewc", "lambda_": 1e5}], lr=3e-2)
    assert ewc_general < lora_general
    from safetensors.torch import load_file

    # two merges moved the base weights; the adapter left at the end is fresh (B = 0)
    final = load_file(str(tmp_path / "ewc-lora" / "checkpoints" / sorted(p.name for p in (tmp_path / "ewc-lora" / "checkpoints").iterdir())[-1] / "weights.safetensors"))
    base = load_file(str(Path(pretrained_dir) / "model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert (final[q] - base["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-4
    assert final["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].abs().max() == 0


def test_full_ewc_replay_hybrid(pretrained_dir, files, tmp_path):
    if "replay" not in available_strategies():
        pytest.skip("the replay strategy is not in this tree yet")
    full_general, _ = _general_loss_after(pretrained_dir, files, tmp_path / "full", ["full"])
    general, task = _general_loss_after(pretrained_dir, files, tmp_path / "run", ["full", {"name": "ewc", "lambda_": 2000.0}, "replay"])
    assert general < full_general - 0.1 and math.isfinite(task)


def test_config_errors_are_clear(tiny_model_dir, files, tmp_path):
    with pytest.raises(ConfigError, match="list it with lora"):
        finetune(_config(tiny_model_dir, files["task"], tmp_path / "a", ["full", "ewc-lora"], steps=1, general=files["general"]))
    with pytest.raises(ConfigError, match="needs general text"):
        finetune(_config(tiny_model_dir, files["task"], tmp_path / "b", ["full", {"name": "ewc", "source": "general"}], steps=1))
    with pytest.raises(ConfigError, match="lamda"):
        build_strategy("ewc", {"lamda": 1.0})
    assert build_strategy("ewc", {"lambda": 7.0}).config.lambda_ == 7.0


def _context(model, tokenizer, config):
    from accelerate import Accelerator

    from retain.strategies import StrategyContext, TaskInfo

    tasks = [
        TaskInfo(index=i, name=t.name, steps=config.steps_for(t), data=build_task_data(t.data, tokenizer, seed=0))
        for i, t in enumerate(config.tasks)
    ]
    return StrategyContext(
        config=config, accelerator=Accelerator(cpu=True), tokenizer=tokenizer, model=model, tasks=tasks,
        run_dir=Path("unused"), cache_dir=Path("unused"), collate=lambda e: collate(e, tokenizer.pad_token_id),
    )


@pytest.mark.parametrize("balance", ["task_share", "penalty_share"])
def test_importance_credits_only_the_task_gradient_and_its_loss_hook_is_pure(llama, tokenizer, files, balance):
    """With gradient accumulation, the path integral uses the task loss's gradient alone: this strategy's
    penalty gradient (weighted by each micro-batch's layer coefficient) is taken out again."""
    config = _config("unused", files["task"], "unused", ["full", "importance"], tasks=[
        {"name": "a", "data": {"path": str(files["task"]), "max_length": 32}},
        {"name": "b", "data": {"path": str(files["task"]), "max_length": 32}},
    ])
    ctx = _context(llama, tokenizer, config)
    strategy = build_strategy("importance", {"source": "training", "lambda_": 4.0, "layer_balance": balance, "normalize": False})
    strategy.setup(llama, ctx)
    params = dict(llama.named_parameters())
    torch.manual_seed(0)
    state = {
        "general_done": False,
        "anchor": {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in params.items()},
        "omega_raw": {n: torch.rand_like(p) for n, p in params.items()},
        "path": {n: torch.zeros_like(p) for n, p in params.items()},
    }
    strategy.load_state_dict(state, ctx)
    ctx.task = ctx.tasks[1]
    examples = ctx.tasks[1].train_examples
    micro = [collate(examples[i * 4 : (i + 1) * 4], 0) for i in range(2)]

    llama.eval()  # no dropout: the independent task gradient below sees the same function
    task_grad = torch.autograd.grad(sum(llama(**m).loss for m in micro) / 2, list(params.values()))
    for m in micro:
        batch = strategy.transform_batch(m, ctx)
        outputs = llama(**batch)
        terms = strategy.extra_losses(outputs, batch, ctx)
        again = strategy.extra_losses(outputs, batch, ctx)
        assert terms["penalty"].item() == again["penalty"].item() > 0
        ((outputs.loss + terms["penalty"]) / 2).backward()
    strategy.after_backward(llama, ctx)
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p -= 0.01 * p.grad
    strategy.after_step(llama, ctx)
    path = strategy.state_dict()["path"]
    for (name, p), g in zip(params.items(), task_grad):
        delta = p.detach() - before[name]
        expected = -g * delta
        # the error allowed is float32 cancellation, relative to what was subtracted (the total gradient)
        scale = max(expected.abs().max().item(), (p.grad * delta).abs().max().item())
        assert (path[name] - expected).abs().max().item() <= 1e-5 * scale, name


def test_ewc_general_subset_follows_train_seed(tiny_model_dir, files, tmp_path):
    def fisher(tag: str, train_seed: int, own: int | None):
        from retain.train.checkpoint import latest_checkpoint, load_nested

        ewc = {"name": "ewc", "max_examples": 3, "estimator": "empirical", **({} if own is None else {"seed": own})}
        config = _config(tiny_model_dir, files["task"], tmp_path / tag, ["full", ewc], steps=1, general=files["general"])
        config = config.model_copy(update={"train": config.train.model_copy(update={"seed": train_seed})})
        finetune(config)
        return load_nested(latest_checkpoint(tmp_path / tag), "strategies")["ewc"]["penalties"][0]["fisher"]

    default, other, overridden = fisher("a", 0, None), fisher("b", 4, None), fisher("c", 0, 4)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(default[name], other[name])
    assert torch.equal(overridden[name], other[name])


def test_bfloat16_state_is_stored_in_bfloat16(tiny_model_dir, files, tmp_path):
    outcome = finetune(
        _config(tiny_model_dir, files["task"], tmp_path / "r", ["full", {"name": "ewc", "state_dtype": "bfloat16", "max_examples": 4}],
                steps=2, general=files["general"])
    )
    from retain.train.checkpoint import latest_checkpoint, load_nested

    state = load_nested(latest_checkpoint(outcome.run_dir), "strategies")
    fisher = state["ewc"]["penalties"][0]["fisher"]
    assert all(t.dtype == torch.bfloat16 for t in fisher.values())
    assert len(state["ewc"]["penalties"]) == 1  # no Fisher computed after the last task: nothing would use it


def test_sigkill_then_resume_matches_for_full_hybrid(tiny_model_dir, files, tmp_path):
    """ewc (Fisher from before_task), importance (path integral in progress, sparse top-k state) and l2
    state, in one hybrid."""
    strategies = [
        "full",
        {"name": "ewc", "max_examples": 8, "lambda_": 50.0},
        {"name": "importance", "source": "general+training", "max_examples": 8, "state": "topk", "keep_fraction": 0.2},
        {"name": "l2", "lambda_": 0.1},
    ]
    assert_kill_resume_matches(
        tmp_path, tiny_model_dir, files["task"], strategies, steps=60, general_data={"path": str(files["general"]), "max_length": 32}
    )


def test_sigkill_then_resume_matches_for_ewc_lora(tiny_model_dir, files, tmp_path):
    """ewc-lora changes the base weights, so compare the full weights of the last checkpoints."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from retain.config import load_config
    from retain.train.checkpoint import latest_checkpoint

    strategies = [{"name": "lora", "r": 4, "dropout": 0.1}, {"name": "ewc-lora", "lambda_": 1e3, "max_examples": 8, "source": "both"}]
    extra = {"general_data": {"path": str(files["general"]), "max_length": 32}}
    reference = write_config(tmp_path / "ref.yaml", tiny_model_dir, files["task"], tmp_path / "ref", strategies, 60, **extra)
    finetune(load_config(reference))
    killed = write_config(tmp_path / "killed.yaml", tiny_model_dir, files["task"], tmp_path / "killed", strategies, 60, **extra)
    kill_after_first_checkpoint(killed, tmp_path / "killed")
    resumed = subprocess.run([sys.executable, "-m", "retain", "train", str(killed), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(str(latest_checkpoint(tmp_path / "ref") / "weights.safetensors"))
    got = load_file(str(latest_checkpoint(tmp_path / "killed") / "weights.safetensors"))
    assert expected.keys() == got.keys() and any(".base_layer." in k for k in expected)
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst


def test_fisher_scale_does_not_depend_on_how_long_the_examples_are(llama, tokenizer):
    """The same text cut into examples scoring 8, 32 or 128 tokens: per scored token the sampled
    Fisher's trace stays put; per example (the old convention) it falls as 1/length."""
    from retain.data.tokenize import Example

    text = ("the cat sat on the mat and the dog ran in the park. " * 30)[: 128 * 6]
    ids = tokenizer(text)["input_ids"]
    params = dict(llama.named_parameters())

    def trace(scored: int, normalize: str) -> float:
        examples = [Example(input_ids=ids[i : i + scored + 1], labels=ids[i : i + scored + 1]) for i in range(0, len(ids) - scored, scored)]
        fisher, _ = diagonal_fisher(llama, params, examples, lambda e: collate(e, 0), estimator="sampled", normalize=normalize)
        return sum(float(f.sum()) for f in fisher.values())

    token = [trace(n, "token") for n in (8, 32, 128)]
    example = [trace(n, "example") for n in (8, 32, 128)]
    assert max(token) / min(token) < 1.5, token
    assert example[0] / example[2] > 8, example  # ~16x between 8 and 128 scored tokens


def _state_bytes(node) -> int:
    if isinstance(node, torch.Tensor):
        return node.numel() * node.element_size()
    if isinstance(node, dict):
        return sum(_state_bytes(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(_state_bytes(v) for v in node)
    return 0


def test_top_elements_keep_the_requested_share_of_all_elements():
    values = {"a": torch.arange(10.0), "b": torch.arange(10.0, 30.0).view(4, 5)}
    kept = top_elements(values, 0.25)  # 30 elements: the 8 largest are 22..29, all in b
    assert kept["a"].tolist() == [] and kept["b"].tolist() == list(range(12, 20))
    assert sum(len(v) for v in top_elements(values, 1.0).values()) == 30


def test_importance_topk_state_is_the_dense_penalty_on_the_kept_elements(llama):
    """state: topk keeps the most important 10% (index, anchor, Omega normalized with the dense mean):
    its penalty equals the dense one with Omega zeroed elsewhere, at about 12.5% of the bytes."""
    params = dict(llama.named_parameters())
    torch.manual_seed(0)
    omega = {n: torch.rand_like(p) ** 4 for n, p in params.items()}  # heavy-tailed, like SI importance
    anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in params.items()}
    dense = Importance(ImportanceConfig(lambda_=2.0, layer_balance="uniform"))
    dense.anchor = anchor
    dense._set_omega(omega, anchor)
    sparse = Importance(ImportanceConfig(lambda_=2.0, layer_balance="uniform", state="topk", keep_fraction=0.1, state_dtype="bfloat16"))
    sparse._set_omega(omega, anchor)
    ctx = _fake_ctx(llama)
    outputs = SimpleNamespace(loss=torch.tensor(1.0))
    term = sparse.extra_losses(outputs, {}, ctx)["penalty"]
    kept = top_elements(omega, 0.1)
    mean = sum(float(t.sum()) for t in omega.values()) / sum(t.numel() for t in omega.values())
    expected = 0.0
    for n, p in params.items():
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[kept[n]] = True
        weight = (omega[n].reshape(-1) / mean).to(torch.bfloat16).float()
        expected += (weight * mask * (p.detach().reshape(-1) - anchor[n].reshape(-1)) ** 2).sum().item()
    assert term.item() == pytest.approx(expected, rel=1e-4)
    assert sum(len(k) for k in kept.values()) == pytest.approx(0.1 * sum(p.numel() for p in params.values()), rel=0.01)
    dense_bytes, sparse_bytes = _state_bytes(dense.state_dict()), _state_bytes(sparse.state_dict())
    assert sparse_bytes < 0.13 * dense_bytes, (sparse_bytes, dense_bytes)
    term.backward()  # the gradient reaches the kept elements only
    name = next(iter(params))
    grad = params[name].grad.reshape(-1)
    outside = torch.ones(grad.numel(), dtype=torch.bool)
    outside[kept[name]] = False
    assert torch.all(grad[outside] == 0) and grad[kept[name]].abs().sum() > 0
