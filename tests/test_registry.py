"""``retain.registry.Registry``: the one name -> plugin mechanism behind strategies, eval types and
scenarios. Each test builds a throwaway plugin package, so the real registries stay untouched."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pytest

from retain.errors import ConfigError
from retain.registry import Registry

_ids = itertools.count()


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``make(**modules)``: a fresh importable package whose ``_hub`` module holds ``REG`` (a widget
    registry over the package, excluding ``skipped``) and ``LOADED`` (names of the modules run so far)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(**modules: str) -> ModuleType:
        name = f"retain_test_plugins_{next(_ids)}"
        root = tmp_path / name
        root.mkdir()
        (root / "__init__.py").write_text("")
        (root / "_hub.py").write_text(
            "from retain.registry import Registry\n"
            f"REG = Registry('widget', package={name!r}, exclude={{'skipped'}})\n"
            "LOADED = []\n"
        )
        for module, body in modules.items():
            header = f"from {name}._hub import REG, LOADED\nLOADED.append(__name__)\n"
            (root / f"{module}.py").write_text(header + textwrap.dedent(body))
        made.append(name)
        return __import__(f"{name}._hub", fromlist=["REG"])

    yield make
    for module in [m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in made)]:
        del sys.modules[module]


def _widget(module: str, name: str = "Widget") -> type:
    """A class that says it was defined in ``module``, as the collision message reports it."""
    return type(name, (), {"__module__": module})


# -- registering -------------------------------------------------------------------------------


def test_a_second_object_under_a_taken_name_is_refused_naming_both_modules():
    reg: Registry[type] = Registry("widget")
    first, second = _widget("pkg.first"), _widget("pkg.second")
    assert reg.register("gear")(first) is first  # the decorator hands the class back unchanged
    with pytest.raises(ValueError) as err:
        reg.register("gear")(second)
    assert str(err.value) == "widget 'gear' is registered twice (pkg.first, pkg.second)"
    assert reg.get("gear") is first


def test_registering_the_same_object_again_is_a_no_op():
    reg: Registry[type] = Registry("widget")
    cls = _widget("pkg.one")
    reg.register("gear")(cls)
    reg.register("gear")(cls)  # a module imported twice (e.g. a test re-registering) is not a collision
    assert reg.names() == ["gear"]


def test_validation_hook_sees_each_new_registration_and_can_refuse_it():
    seen: list[tuple[str, type]] = []

    def validate(name: str, cls: type) -> None:
        if name.startswith("bad"):
            raise TypeError(f"{cls.__name__} may not be called '{name}'")
        seen.append((name, cls))
        cls.label = name  # a hook may also adapt what it registers (strategies learn their name)

    reg: Registry[type] = Registry("widget", validate=validate)
    good, bad = _widget("pkg.a", "Good"), _widget("pkg.b", "Bad")
    reg.register("good")(good)
    reg.register("good")(good)
    with pytest.raises(TypeError, match="^Bad may not be called 'bad-one'$"):
        reg.register("bad-one")(bad)
    assert seen == [("good", good)]  # once per new registration, not on the no-op repeat
    assert good.label == "good"
    assert "bad-one" not in reg  # a refused object is not stored


def test_pop_removes_an_entry():
    reg: Registry[type] = Registry("widget")
    cls = _widget("pkg.a")
    reg.register("gear")(cls)
    assert reg.pop("gear") is cls
    assert reg.pop("gear") is None and reg.names() == []


# -- reading -----------------------------------------------------------------------------------


def test_unknown_name_suggests_the_closest_and_lists_all():
    reg: Registry[type] = Registry("widget")
    for name in ("sprocket", "gear", "axle"):
        reg.register(name)(_widget(f"pkg.{name}"))
    with pytest.raises(ConfigError) as err:
        reg.get("geer")
    assert str(err.value) == "unknown widget 'geer'. Did you mean 'gear'? Available: axle, gear, sprocket"
    with pytest.raises(ConfigError) as err:
        reg.get("zzz")
    assert str(err.value) == "unknown widget 'zzz'. Available: axle, gear, sprocket"


def test_listing_label_is_per_registry():
    reg: Registry[type] = Registry("eval type", listing="Registered types")
    reg.register("loss")(_widget("pkg.loss"))
    with pytest.raises(ConfigError, match=r"^unknown eval type 'los'\. Did you mean 'loss'\? Registered types: loss$"):
        reg.get("los")


def test_names_iteration_len_and_membership_agree_and_are_sorted():
    reg: Registry[type] = Registry("widget")
    classes = {name: _widget(f"pkg.{name}") for name in ("b", "c", "a")}
    for name, cls in classes.items():
        reg.register(name)(cls)
    assert reg.names() == list(reg) == ["a", "b", "c"] and len(reg) == 3
    assert reg.items() == [(n, classes[n]) for n in ("a", "b", "c")]
    assert "a" in reg and "d" not in reg and 3 not in reg


# -- discovery ---------------------------------------------------------------------------------


def test_discovery_imports_each_plugin_module_once_on_first_read(plugins):
    hub = plugins(
        alpha="REG.register('alpha')(type('A', (), {}))\n",
        beta="REG.register('beta')(type('B', (), {}))\n",
        skipped="REG.register('skipped')(type('S', (), {}))\n",
        _private="REG.register('private')(type('P', (), {}))\n",
    )
    package = hub.REG.package
    assert hub.LOADED == []  # creating the registry imports nothing
    assert hub.REG.names() == ["alpha", "beta"]
    assert "gamma" not in hub.REG and list(hub.REG) == ["alpha", "beta"]
    hub.REG.get("alpha")
    assert hub.LOADED == [f"{package}.alpha", f"{package}.beta"]  # once each, however often it is read
    assert f"{package}.skipped" not in sys.modules and f"{package}._private" not in sys.modules


def test_discovery_lets_a_plugin_read_the_registry_while_it_loads(plugins):
    hub = plugins(
        alpha="REG.register('alpha')(type('A', (), {}))\nSEEN = REG.names()\n",
        beta="REG.register('beta')(type('B', (), {}))\n",
    )
    assert hub.REG.names() == ["alpha", "beta"]
    assert sys.modules[f"{hub.REG.package}.alpha"].SEEN == ["alpha"]  # what was there, no recursion


def test_a_failed_discovery_is_not_mistaken_for_a_finished_one(plugins):
    hub = plugins(
        alpha="REG.register('alpha')(type('A', (), {}))\n",
        broken="raise ImportError('no such dependency')\n",
    )
    for _ in range(2):  # the second read fails the same way instead of working with a partial registry
        with pytest.raises(ImportError, match="no such dependency"):
            hub.REG.names()


# -- the real registries keep their messages and hooks ------------------------------------------


def test_strategy_registry_names_the_class_and_keeps_its_messages():
    from retain.strategies.base import Strategy
    from retain.strategies.registry import STRATEGIES, get_strategy_class, register_strategy

    with pytest.raises(ConfigError, match=r"^unknown strategy 'fulll'\. Did you mean 'full'\? Available: .*\bewc\b"):
        get_strategy_class("fulll")
    cls = type("Probe", (Strategy,), {"__module__": __name__})
    try:
        assert register_strategy("test-registry-probe")(cls) is cls
        assert cls.name == "test-registry-probe" and get_strategy_class("test-registry-probe") is cls
        with pytest.raises(ValueError) as err:
            register_strategy("full")(cls)
        assert str(err.value) == f"strategy 'full' is registered twice (retain.strategies.full, {__name__})"
        assert cls.name == "test-registry-probe"  # a refused registration leaves the class alone
    finally:
        STRATEGIES.pop("test-registry-probe")
    assert get_strategy_class("full").name == "full"


def test_eval_registry_refuses_a_class_whose_type_literal_disagrees():
    from retain.eval.tasks import EvalTaskConfig, eval_types, get_eval_type, register_eval_type

    class Mislabelled(EvalTaskConfig):
        type: Literal["other"] = "other"

    with pytest.raises(TypeError) as err:
        register_eval_type("test-registry-probe")(Mislabelled)
    assert str(err.value) == "Mislabelled registers type 'test-registry-probe' but declares type: Literal['other']"
    assert "test-registry-probe" not in eval_types()
    with pytest.raises(ConfigError) as err:
        get_eval_type("los")
    listed = ", ".join(eval_types())
    assert str(err.value) == f"unknown eval type 'los'. Did you mean 'loss'? Registered types: {listed}"


def test_scenarios_register_themselves_and_a_typo_is_answered():
    from retain.scenarios import get_scenario, scenario_names

    assert scenario_names() == ["stories-contracts", "synthetic"]
    with pytest.raises(ConfigError) as err:
        get_scenario("synthtic")
    assert str(err.value) == (
        "unknown scenario 'synthtic'. Did you mean 'synthetic'? Available: stories-contracts, synthetic"
    )
