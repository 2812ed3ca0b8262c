"""Built-in task sequences: an offline synthetic one (the demo) and stories -> contracts on real data."""

from retain.scenarios.base import Scenario, get_scenario, scenario_names

__all__ = ["Scenario", "get_scenario", "scenario_names"]
