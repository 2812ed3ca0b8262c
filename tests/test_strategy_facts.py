"""A strategy's facts live on its class: a new strategy is its own file (and a test-matrix row), and the
config, the guide, tune's search space and the budget read what it declares, with no list to extend."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from retain.config import load_config
from retain.guide.catalogue import extra_passes, holds_frozen_copy, hybrid, preserves_function, stores_real_data
from retain.guide.space import knobs
from retain.strategies.base import Strategy, StrategyConfig, Strength
from retain.strategies.registry import STRATEGIES, register_strategy


class AnchorConfig(StrategyConfig):
    weight: float = Field(3.0, gt=0)
    stats: str | None = Field(None, description="A statistics file it reads.")
    keep_rows: bool = Field(False, description="Keep real rows (to test a setting-dependent fact).")


@pytest.fixture
def throwaway():
    """A strategy registered for one test only, declaring every kind of fact."""

    @register_strategy("throwaway-anchor")
    class ThrowawayAnchor(Strategy):
        Config = AnchorConfig
        strength = Strength("weight", 0.1, 100.0)
        preserves_function = True
        quadratic_state = True
        input_path_keys = ("stats",)

        @classmethod
        def stores_real_data(cls, config: StrategyConfig) -> bool:
            return bool(getattr(config, "keep_rows"))

        @classmethod
        def extra_passes(cls, config: StrategyConfig, *, adapters: bool) -> float:
            return 0.5

        @classmethod
        def holds_model_copy(cls, config: StrategyConfig, *, adapters: bool) -> bool:
            return not adapters

    yield ThrowawayAnchor
    STRATEGIES.pop("throwaway-anchor")


def test_the_config_resolves_and_lists_the_paths_a_new_strategy_declares(throwaway, tmp_path: Path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "run.yaml").write_text(
        "model: {name_or_path: m}\ntasks: [{name: t, data: {path: d.jsonl}}]\n"
        "strategies: [full, {name: throwaway-anchor, stats: stats/fisher.bin}]\n"
    )
    config = load_config(folder / "run.yaml")
    assert config.strategies[1].params["stats"] == str(folder / "stats" / "fisher.bin")
    assert str(folder / "stats" / "fisher.bin") in config.input_paths()


def test_the_guide_tune_and_budget_read_a_new_strategys_facts(throwaway):
    full, lora = hybrid("full+throwaway-anchor", ""), hybrid("lora+throwaway-anchor", "")
    assert preserves_function(full) and not preserves_function(hybrid("full", ""))
    assert extra_passes(full) == 0.5
    assert holds_frozen_copy(full) and not holds_frozen_copy(lora)
    assert not stores_real_data(full)
    assert stores_real_data(hybrid("full+throwaway-anchor@throwaway-anchor.keep_rows=true", ""))
    (searched,) = knobs(full)
    assert (searched.label, searched.low, searched.high, searched.default) == ("throwaway-anchor.weight", 0.1, 100.0, 3.0)
    assert Strength.of(throwaway) == searched  # the budget moves the same object tune searches


def test_a_wrong_declaration_is_refused_when_the_strategy_registers():
    class BadConfig(StrategyConfig):
        weight: float = 500.0

    with pytest.raises(TypeError, match=r"strategy 'bad-facts'.*input path key 'file' is not a field of BadConfig"):

        @register_strategy("bad-facts")
        class BadFacts(Strategy):
            Config = BadConfig
            input_path_keys = ("file",)

    with pytest.raises(TypeError, match=r"strength default 500.0 is outside \[0.1, 100.0\]"):

        @register_strategy("bad-facts")
        class BadStrength(Strategy):
            Config = BadConfig
            strength = Strength("weight", 0.1, 100.0)

    assert "bad-facts" not in STRATEGIES
