"""Hand-computed checks of the continual-learning metrics (retain.results.metrics)."""

import math

import numpy as np
import pytest

from retain.results import metrics as m

# Rows: 0 = base, i = after training task i. Columns: task 1, task 2, task 3 (0-indexed in code).
R3 = [
    [0.10, 0.95, 0.30],  # base: unusually good on task 2 before ever training on it
    [0.80, 0.30, 0.35],  # after task 1
    [0.85, 0.90, 0.40],  # after task 2 (task 1 improved further)
    [0.50, 0.70, 0.95],  # after task 3
]


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-12)


def test_acc_is_mean_of_last_row() -> None:
    # (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3
    assert m.average_accuracy(R3) == approx(2.15 / 3)


def test_bwt_paper_form() -> None:
    # tasks 1, 2: (0.50 - 0.80) + (0.70 - 0.90) = -0.5, over T-1 = 2
    assert m.backward_transfer(R3) == approx(-0.25)
    np.testing.assert_allclose(m.backward_transfer_per_task(R3), [-0.30, -0.20])


def test_fwt_paper_form() -> None:
    # task 2: R[1][2] - R[0][2] = 0.30 - 0.95 = -0.65; task 3: R[2][3] - R[0][3] = 0.40 - 0.30 = 0.10
    assert m.forward_transfer(R3) == approx(-0.275)
    np.testing.assert_allclose(m.forward_transfer_per_task(R3), [-0.65, 0.10])


def test_forgetting_uses_max_over_rows_after_the_task_was_learned() -> None:
    # k = 3. task 1: max(R[1][1], R[2][1]) - R[3][1] = 0.85 - 0.50 = 0.35
    #        task 2: max(R[2][2]) - R[3][2] = 0.90 - 0.70 = 0.20 (base row's 0.95 must not count)
    np.testing.assert_allclose(m.forgetting_per_task(R3), [0.35, 0.20])
    assert m.forgetting(R3) == approx(0.275)
    assert m.forgetting(R3, k=3) == m.forgetting(R3)


def test_forgetting_at_intermediate_step_can_be_negative() -> None:
    # k = 2: task 1: R[1][1] - R[2][1] = 0.80 - 0.85 = -0.05 (it improved)
    assert m.forgetting(R3, k=2) == approx(-0.05)
    assert math.isnan(m.forgetting(R3, k=1))
    with pytest.raises(ValueError):
        m.forgetting_per_task(R3, k=4)


def test_variants_differ_from_paper_forms() -> None:
    # GEM divides the same sums by T = 3 instead of T-1 = 2.
    assert m.gem_backward_transfer(R3) == approx(-0.5 / 3)
    assert m.gem_forward_transfer(R3) == approx(-0.55 / 3)
    # Avalanche: R[j][j] - R[T][j] without the max: (0.30 + 0.20) / 2 = 0.25, vs Chaudhry's 0.275.
    assert m.avalanche_forgetting(R3) == approx(0.25)
    assert m.avalanche_forgetting(R3) == approx(-m.backward_transfer(R3))
    assert m.avalanche_forgetting(R3) != approx(m.forgetting(R3))


def test_single_task_edge_case() -> None:
    R1 = [[0.2], [0.9]]
    assert m.average_accuracy(R1) == approx(0.9)
    for name in ("bwt", "fwt", "forgetting", "avalanche_forgetting"):
        assert math.isnan(m.METRICS[name](R1)), name
    # GEM's code averages over all T tasks with zero terms, so it reports 0.
    assert m.gem_backward_transfer(R1) == 0.0
    assert m.gem_forward_transfer(R1) == 0.0
    assert m.forgetting_per_task(R1).shape == (0,)


def test_missing_cells_are_dropped_from_the_mean() -> None:
    R = [row[:] for row in R3]
    R[3][0] = None  # task 1 not evaluated after the last step
    assert m.average_accuracy(R) == approx((0.70 + 0.95) / 2)
    assert m.backward_transfer(R) == approx(-0.20)
    assert m.forgetting(R) == approx(0.20)
    R[3] = [None, None, None]
    assert math.isnan(m.average_accuracy(R))
    assert math.isnan(m.gem_backward_transfer(R))


def test_missing_cell_inside_the_max_is_skipped() -> None:
    R = np.array(R3, dtype=float)
    R[2, 0] = np.nan  # task 1 only known right after it was trained
    assert m.forgetting_per_task(R)[0] == approx(0.80 - 0.50)


def test_numpy_and_list_inputs_agree_and_shape_is_checked() -> None:
    assert m.compute_all(np.array(R3)) == m.compute_all(R3)
    with pytest.raises(ValueError):
        m.as_matrix([[0.1, 0.2], [0.3, 0.4]])  # needs T+1 rows
    with pytest.raises(ValueError):
        m.as_matrix([[0.1], [0.2, 0.3]])
    with pytest.raises(ValueError):
        m.as_matrix([0.1, 0.2])


def test_compute_all_and_registry() -> None:
    out = m.compute_all(R3)
    assert set(out) == set(m.METRICS)
    assert out["forgetting"] == approx(0.275)
    assert m.compute_all(R3, ["acc"]) == {"acc": approx(2.15 / 3)}
    with pytest.raises(KeyError, match="unknown metric"):
        m.compute_all(R3, ["nope"])


def test_general_retention() -> None:
    assert m.general_retention(0.5, 0.4) == approx(0.8)
    # Losses: lower is better, so before/after: 2.0 -> 2.5 keeps 80%.
    assert m.general_retention(2.0, 2.5, higher_is_better=False) == approx(0.8)
    assert m.general_retention(2.0, 1.0, higher_is_better=False) == approx(2.0)
    assert math.isnan(m.general_retention(0.0, 0.4))
    assert math.isnan(m.general_retention(None, 0.4))
    assert math.isnan(m.general_retention(0.5, float("nan")))
