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
the budget line. Each violation is measured in units of what the bound allows the run to lose, so
that -1 means "nothing spent", 0 "exactly at the bound" and +1 "twice the allowance":
``(R - retention) / (1 - R)`` for a retention floor (the allowed drop is 1 - R),
``(kl - K) / K`` for a KL ceiling and ``(f - F) / F`` for a forgetting ceiling. One margin (the
share of the allowance kept unspent without moving, 0.2 by default) then means the same for every
bound, and a run that has spent nothing moves at full speed whatever the floor.

Checks come every ``check_every`` steps, plus ``early`` extra ones in a task's first interval (at
``check_every / 2``, ``/ 4``, ...): most forgetting happens in a task's first steps, and a strength
that starts far too weak should not wait a whole interval to be corrected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from retain.eval.budget import Measurement
from retain.strategies.base import Strength


@dataclass(frozen=True)
class Bounds:
    """The budget: each bound is optional; at least one must be set for a budget to mean anything."""

    min_general_retention: float | None = None
    max_kl: float | None = None
    max_task_forgetting: float | None = None
    max_task_kl: float | None = None


def violations(measured: Measurement, bounds: Bounds) -> dict[str, float]:
    """Violation per bounded quantity in units of its allowance (> 0 over budget, -1 nothing spent),
    skipping unmeasured ones."""
    out: dict[str, float] = {}
    if bounds.min_general_retention is not None and measured.general_retention is not None:
        floor = bounds.min_general_retention
        out["general_retention"] = (floor - measured.general_retention) / max(1.0 - floor, 1e-12)
    if bounds.max_kl is not None and measured.kl is not None:
        out["kl"] = (measured.kl - bounds.max_kl) / max(bounds.max_kl, 1e-12)
    if bounds.max_task_kl is not None and measured.task_kl is not None:
        out["task_kl"] = (measured.task_kl - bounds.max_task_kl) / max(bounds.max_task_kl, 1e-12)
    if bounds.max_task_forgetting is not None and measured.task_forgetting is not None:
        out["task_forgetting"] = (measured.task_forgetting - bounds.max_task_forgetting) / max(bounds.max_task_forgetting, 1e-12)
    return out


def worst_violation(measured: Measurement, bounds: Bounds) -> float | None:
    """The largest normalized violation; None when nothing budgeted was measured."""
    values = violations(measured, bounds)
    return max(values.values()) if values else None


def within_budget(measured: Measurement, bounds: Bounds) -> bool:
    worst = worst_violation(measured, bounds)
    return worst is None or worst <= 0.0


def dual_step(violation: float, *, eta: float, max_step: float, margin: float, noise: float = 0.0) -> float:
    """The change of log(strength) for one check: up while over budget, down while comfortably inside
    (by the slack beyond the band, so the step is continuous at the band's edges), none in between;
    bounded by ``max_step`` (natural-log units).

    The band is ``[-max(margin, noise), noise]``: ``noise`` (twice the measurement's standard error, in
    allowance units) keeps the controller from chasing a violation it cannot tell from noise. The step
    is measured in units of ``margin`` (itself a share of the bound's allowance), so a step means the
    same for a retention floor and a KL ceiling.
    """
    low = max(margin, noise)
    if -low <= violation <= noise:
        return 0.0
    excess = violation - noise if violation > 0 else violation + low
    return max(-max_step, min(max_step, eta * excess / margin))


def noise_band(measured: Measurement, bounds: Bounds) -> float:
    """Twice the standard error of the measured retention, in units of the floor's allowance (0 when the
    retention floor is not set or its error is unknown)."""
    se, floor = measured.general_retention_se, bounds.min_general_retention
    if se is None or floor is None or not math.isfinite(se):
        return 0.0
    return 2.0 * se / max(1.0 - floor, 1e-12)


def next_check_step(step: int, check_every: int, early: int, last: int) -> int:
    """The first check step after ``step`` (a task's last step, ``last``, is always measured)."""
    return next((s for s in range(step + 1, last) if is_check_step(s, check_every, early)), last)


def is_check_step(step: int, check_every: int, early: int = 0) -> bool:
    """Whether the budget measures after ``step`` (steps into the task, from 1): every ``check_every``
    steps, and at ``check_every // 2**k`` for k = 1..``early`` (distinct, at least 1) in the first interval."""
    if step % check_every == 0:
        return True
    return step < check_every and any(step == check_every >> k for k in range(1, early + 1) if check_every >> k >= 1)


@dataclass
class BudgetController:
    """Dual ascent on every declared strength, from the measured worst violation of the budget.

    All strengths move together by the same log change: the budget constrains the model, not one
    method, and the strategies of a hybrid share the work. State is plain data (checkpointed).
    """

    bounds: Bounds
    strengths: list[Strength]  # bound to their strategies (``Strength.of``)
    values: dict[str, float] = field(default_factory=dict)  # label -> value now (the defaults when not given)
    eta: float = 1.0
    max_step: float = math.log(10.0)  # at most one decade per check
    margin: float = 0.2
    step_scale: float = 1.0
    last_direction: int = 0
    last_violation: float | None = None
    last_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for strength in self.strengths:
            start = self.values.get(strength.label, strength.default)
            self.values[strength.label] = strength.clip(start if start is not None else strength.low)

    def at_protective_limit(self) -> bool:
        """Every strength sits at the end of its range that protects most (true when there are none)."""
        return all(s.at_protective_limit(self.values[s.label]) for s in self.strengths)

    #: Rprop's factors: the step bound grows while the direction holds and halves when it reverses.
    GROW: ClassVar[float] = 1.2
    SHRINK: ClassVar[float] = 0.5

    def new_task(self) -> None:
        """A task starts: its violations are not a continuation of the last task's (no trend across tasks),
        and the step bound starts over (a new task may need a very different strength)."""
        self.last_violation, self.last_step = None, None
        self.step_scale, self.last_direction = 1.0, 0

    def update(self, measured: Measurement, step: int, next_step: int | None = None) -> float | None:
        """Record a check and move the strengths; returns the worst violation (None: nothing measured).

        Rules that keep the strengths from swinging around the budget line, since a strength acts on the
        model with a lag (the weights must move back first), and from chasing noise: a reversal of
        direction halves the step bound and a repeat grows it again, up to one ``max_step`` (Rprop); while
        over budget but recovering (the violation shrank since the last check), the step follows the
        violation predicted at the next check (``next_step``) by extending the trend: none if the run
        should be back in budget by then; and no step within twice the measurement's standard error.
        """
        worst = worst_violation(measured, self.bounds)
        signal = worst
        previous, since = self.last_violation, self.last_step
        if (worst is not None and previous is not None and since is not None and next_step is not None
                and 0 < worst < previous and step > since):
            signal = worst + (worst - previous) * (next_step - step) / (step - since)  # the trend, extended
            signal = max(signal, 0.0)
        self.last_violation, self.last_step = worst, step
        noise = noise_band(measured, self.bounds)
        raw = 0.0 if signal is None else dual_step(signal, eta=self.eta, max_step=math.inf, margin=self.margin, noise=noise)
        direction = (raw > 0) - (raw < 0)
        if direction and self.last_direction:
            grown = self.step_scale * (self.GROW if direction == self.last_direction else self.SHRINK)
            self.step_scale = min(max(grown, 1 / 64), 1.0)
        bound = self.max_step * self.step_scale
        change = max(-bound, min(bound, raw))
        if direction:
            self.last_direction = direction
        for strength in self.strengths:
            self.values[strength.label] = strength.moved(self.values[strength.label], change)
        self.history.append(
            {
                "step": step,
                "general_retention": measured.general_retention,
                "kl": measured.kl,
                "task_forgetting": measured.task_forgetting,
                "violation": worst,
                "noise": noise,
                "log_change": change,
                **self.values,
            }
        )
        return worst

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": [[s.strategy, s.key, self.values[s.label]] for s in self.strengths],
            "step_scale": self.step_scale,
            "last_direction": self.last_direction,
            "last_violation": self.last_violation,
            "last_step": self.last_step,
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored = {(strategy, key): float(value) for strategy, key, value in state.get("values", [])}
        for s in self.strengths:
            if (s.strategy, s.key) in stored:
                self.values[s.label] = stored[(s.strategy, s.key)]
        self.step_scale = float(state.get("step_scale", 1.0))
        self.last_direction = int(state.get("last_direction", 0))
        last, since = state.get("last_violation"), state.get("last_step")
        self.last_violation = None if last is None else float(last)
        self.last_step = None if since is None else int(since)
        self.history = [dict(row) for row in state.get("history", [])]
