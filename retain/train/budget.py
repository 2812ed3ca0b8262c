"""A forgetting budget the run enforces: the controller that moves every declared strength.

The problem a budgeted run solves is "learn the task, subject to: general retention >= R, KL from the
base <= K, forgetting of earlier tasks <= F". Its Lagrangian weighs the constraint by a multiplier;
dual ascent raises the multiplier while the constraint is violated and lowers it while there is
slack. Each protective strategy's strength (EWC's lambda, LwF's alpha, replay's ratio, ...) plays
the multiplier's role, so the controller moves every declared strength the same way:

    g       = max_i g_i                    the worst normalized violation (> 0: over budget)
    log s  += clip(eta * g / margin, -max_step, +max_step)              while over budget (g > 0)
    log s  += clip(eta * (g + margin) / margin, -max_step, +max_step)   while comfortably inside (g < -margin)
    log s   unchanged                       while -margin <= g <= 0 (in budget, no slack to spend)

in log space (strengths span decades), clipped to the strategy's declared range, and in the opposite
direction for a strength that protects less when it grows (STM's threshold). Each time the direction
reverses, the step bound halves (as in Rprop), so the strength settles instead of oscillating around
the budget line. Normalized violations:
``(R - retention) / R`` for a retention floor, ``(kl - K) / K`` for a KL ceiling, ``f - F`` for
forgetting (already a fraction of the score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Measurement:
    """What one budget check measured; None where the quantity is not budgeted or not measurable."""

    general_retention: float | None = None
    kl: float | None = None
    task_forgetting: float | None = None


@dataclass(frozen=True)
class Bounds:
    """The budget: each bound is optional; at least one must be set for a budget to mean anything."""

    min_general_retention: float | None = None
    max_kl: float | None = None
    max_task_forgetting: float | None = None


def violations(measured: Measurement, bounds: Bounds) -> dict[str, float]:
    """Normalized violation per bounded quantity (> 0 over budget, < 0 slack), skipping unmeasured ones."""
    out: dict[str, float] = {}
    if bounds.min_general_retention is not None and measured.general_retention is not None:
        floor = bounds.min_general_retention
        out["general_retention"] = (floor - measured.general_retention) / max(floor, 1e-12)
    if bounds.max_kl is not None and measured.kl is not None:
        out["kl"] = (measured.kl - bounds.max_kl) / max(bounds.max_kl, 1e-12)
    if bounds.max_task_forgetting is not None and measured.task_forgetting is not None:
        out["task_forgetting"] = measured.task_forgetting - bounds.max_task_forgetting
    return out


def worst_violation(measured: Measurement, bounds: Bounds) -> float | None:
    """The largest normalized violation; None when nothing budgeted was measured."""
    values = violations(measured, bounds)
    return max(values.values()) if values else None


def within_budget(measured: Measurement, bounds: Bounds) -> bool:
    worst = worst_violation(measured, bounds)
    return worst is None or worst <= 0.0


def dual_step(violation: float, *, eta: float, max_step: float, margin: float) -> float:
    """The change of log(strength) for one check: up while over budget, down while comfortably inside
    (by the slack beyond ``margin``, so the step is continuous at the band's edge), none in between;
    bounded by ``max_step`` (natural-log units).

    The violation is measured in units of ``margin``, so one setting works for retention floors near
    1 (where the slack can never exceed a few percent) and for KL ceilings alike.
    """
    if -margin <= violation <= 0.0:
        return 0.0
    excess = violation if violation > 0 else violation + margin
    return max(-max_step, min(max_step, eta * excess / margin))


@dataclass
class StrengthState:
    """One adapted strength: the strategy and key it belongs to, its range and current value."""

    strategy: str
    key: str
    value: float
    low: float
    high: float
    protects_more_when_higher: bool = True

    @property
    def label(self) -> str:
        return f"{self.strategy}.{self.key}"

    @property
    def at_protective_limit(self) -> bool:
        """No more protection is available from this strength: it sits at the end of its range that protects most."""
        return self.value >= self.high if self.protects_more_when_higher else self.value <= self.low

    def move(self, log_change: float) -> float:
        """Apply a change in log space (towards more protection when positive); returns the new value."""
        sign = 1.0 if self.protects_more_when_higher else -1.0
        moved = math.exp(math.log(self.value) + sign * log_change)
        self.value = min(max(moved, self.low), self.high)
        return self.value


@dataclass
class BudgetController:
    """Dual ascent on every declared strength, from the measured worst violation of the budget.

    All strengths move together by the same log change: the budget constrains the model, not one
    method, and the strategies of a hybrid share the work. State is plain data (checkpointed).
    """

    bounds: Bounds
    strengths: list[StrengthState]
    eta: float = 1.0
    max_step: float = math.log(10.0)  # at most one decade per check
    margin: float = 0.02
    step_scale: float = 1.0
    last_direction: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def update(self, measured: Measurement, step: int) -> float | None:
        """Record a check and move the strengths; returns the worst violation (None: nothing measured)."""
        worst = worst_violation(measured, self.bounds)
        bound = self.max_step * self.step_scale
        change = 0.0 if worst is None else dual_step(worst, eta=self.eta, max_step=bound, margin=self.margin)
        direction = (change > 0) - (change < 0)
        if direction and self.last_direction and direction != self.last_direction:
            self.step_scale = max(self.step_scale / 2, 1 / 64)
        if direction:
            self.last_direction = direction
        for strength in self.strengths:
            strength.move(change)
        self.history.append(
            {
                "step": step,
                "general_retention": measured.general_retention,
                "kl": measured.kl,
                "task_forgetting": measured.task_forgetting,
                "violation": worst,
                "log_change": change,
                **{s.label: s.value for s in self.strengths},
            }
        )
        return worst

    def values(self) -> dict[tuple[str, str], float]:
        return {(s.strategy, s.key): s.value for s in self.strengths}

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": [[s.strategy, s.key, s.value] for s in self.strengths],
            "step_scale": self.step_scale,
            "last_direction": self.last_direction,
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored = {(strategy, key): float(value) for strategy, key, value in state.get("values", [])}
        for s in self.strengths:
            if (s.strategy, s.key) in stored:
                s.value = stored[(s.strategy, s.key)]
        self.step_scale = float(state.get("step_scale", 1.0))
        self.last_direction = int(state.get("last_direction", 0))
        self.history = [dict(row) for row in state.get("history", [])]
