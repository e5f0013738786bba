"""Known-answer tests of the sample-based distances in energyflow.metrics."""
from __future__ import annotations

import math

import pytest
import torch

from energyflow.metrics import (
    distance_report,
    energy_distance,
    energy_distance_floor,
    mmd_rbf,
    sliced_wasserstein,
)

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal_abs_mean(m: float, sigma: float) -> float:
    """E|Z| for Z ~ N(m, σ²) (folded normal mean)."""
    phi = 0.5 * (1.0 + math.erf(-m / (sigma * math.sqrt(2.0))))
    return sigma * math.sqrt(2.0 / math.pi) * math.exp(-(m**2) / (2 * sigma**2)) + m * (1.0 - 2.0 * phi)


# ---------------------------------------------------------------------------- energy distance
def test_energy_distance_point_masses_known_value():
    # 2|0 − 1| − 0 − 0 = 2, in 1-D and in 3-D along an axis.
    assert energy_distance(torch.tensor([0.0]), torch.tensor([1.0])) == pytest.approx(2.0)
    assert energy_distance(torch.zeros(1, 3), torch.tensor([[0.0, 3.0, 4.0]])) == pytest.approx(10.0)


def test_energy_distance_identical_clouds_is_zero_and_symmetric():
    x = torch.randn(500, 2, generator=_gen(0))
    y = torch.randn(300, 2, generator=_gen(1)) + 1.0
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-10)
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-10)


def test_energy_distance_chunking_does_not_change_the_value():
    x = torch.randn(700, 2, generator=_gen(2))
    y = torch.randn(900, 2, generator=_gen(3)) * 1.5
    ref = energy_distance(x, y, max_block=10**8)
    assert energy_distance(x, y, max_block=1000) == pytest.approx(ref, rel=1e-10)
    assert energy_distance(x, y, max_block=1) == pytest.approx(ref, rel=1e-10)  # one row per chunk


def test_energy_distance_same_distribution_sits_at_the_floor():
    # Expected V-statistic for two samples of one law is (1/n + 1/m) E|X − X'|.
    n, m = 2000, 1500
    vals = []
    for seed in range(3):
        x = torch.randn(n, 2, generator=_gen(10 + seed))
        y = torch.randn(m, 2, generator=_gen(20 + seed))
        vals.append(energy_distance(x, y))
    floor = energy_distance_floor(torch.randn(n, 2, generator=_gen(30)), m)
    exact_floor = (1 / n + 1 / m) * math.sqrt(math.pi)  # E|X − X'| = √π for N(0, I_2)
    assert floor == pytest.approx(exact_floor, rel=0.05)
    mean_val = sum(vals) / len(vals)
    assert 0.3 * floor < mean_val < 3.0 * floor
    # A shift of 0.3 standard deviations is an order of magnitude above the floor.
    x = torch.randn(n, 2, generator=_gen(40))
    y = torch.randn(m, 2, generator=_gen(41)) + torch.tensor([0.3, 0.0])
    assert energy_distance(x, y) > 10 * floor


def test_energy_distance_matches_closed_form_for_1d_gaussians():
    # ED(N(0,1), N(m,1)) = 2 E|N(m, 2)| − 2 E|N(0, 2)|.
    n = 4000
    for m, seed in [(0.5, 0), (1.0, 1), (2.0, 2)]:
        x = torch.randn(n, generator=_gen(100 + seed), dtype=torch.float64)
        y = torch.randn(n, generator=_gen(200 + seed), dtype=torch.float64) + m
        exact = 2 * _normal_abs_mean(m, math.sqrt(2.0)) - 2 * _normal_abs_mean(0.0, math.sqrt(2.0))
        assert energy_distance(x, y) == pytest.approx(exact, rel=0.1, abs=0.01)


def test_energy_distance_grows_monotonically_with_the_shift():
    x = torch.randn(1500, 2, generator=_gen(5))
    y = torch.randn(1500, 2, generator=_gen(6))
    direction = torch.tensor([0.6, 0.8])
    values = [energy_distance(x, y + s * direction) for s in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_energy_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))


# ------------------------------------------------------------------------------------- MMD
def test_mmd_known_value_with_absolute_bandwidths():
    # Single points at distance 1: Σ_h (2 − 2 exp(−1 / (2h²))).
    hs = (0.5, 1.0, 3.0)
    exact = sum(2 - 2 * math.exp(-1 / (2 * h * h)) for h in hs)
    got = mmd_rbf(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), bandwidths=hs, relative=False)
    assert got == pytest.approx(exact, rel=1e-12)


def test_mmd_matches_a_dense_reference_for_any_bandwidth_ladder():
    x = torch.randn(300, 2, generator=_gen(7), dtype=torch.float64)
    y = torch.randn(250, 2, generator=_gen(8), dtype=torch.float64) * 1.3 + 0.2

    def reference(hs):
        k = lambda a, b: sum(torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h)) for h in hs)  # noqa: E731
        return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())

    for hs in [(0.25, 0.5, 1.0, 2.0, 4.0), (0.3, 1.7, 1.0), (2.0, 0.5)]:
        assert mmd_rbf(x, y, hs, relative=False, max_block=999) == pytest.approx(reference(hs), rel=1e-9)


def test_mmd_relative_bandwidths_are_scale_invariant():
    x = torch.randn(400, 2, generator=_gen(9))
    y = torch.randn(400, 2, generator=_gen(10)) + 0.5
    assert mmd_rbf(3.0 * x, 3.0 * y) == pytest.approx(mmd_rbf(x, y), rel=1e-6)
    assert mmd_rbf(3.0 * x, 3.0 * y, relative=False) != pytest.approx(mmd_rbf(x, y, relative=False), rel=1e-2)


def test_mmd_same_distribution_small_and_grows_with_shift():
    x = torch.randn(1500, 2, generator=_gen(11))
    y = torch.randn(1500, 2, generator=_gen(12))
    values = [mmd_rbf(x, y + torch.tensor([s, 0.0])) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[2] > 10 * values[0]
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-10)


# -------------------------------------------------------------------------- sliced Wasserstein
@pytest.mark.parametrize("m", [0.5, 1.5, -3.0])
def test_sliced_wasserstein_1d_gaussian_shift_is_w2(m):
    x = torch.randn(20000, generator=_gen(13))
    y = torch.randn(20000, generator=_gen(14)) + m
    assert sliced_wasserstein(x, y, num_projections=8, generator=_gen(0)) == pytest.approx(abs(m), abs=0.04)


def test_sliced_wasserstein_unequal_sizes_interpolates_quantiles():
    x = torch.randn(20000, generator=_gen(15))
    y = torch.randn(7000, generator=_gen(16)) * 2.0 + 1.0
    # W2(N(0,1), N(1, 4)) = sqrt(1² + (2 − 1)²) = √2 in 1-D.
    assert sliced_wasserstein(x, y, num_projections=4, generator=_gen(0)) == pytest.approx(math.sqrt(2), abs=0.05)
    # A cloud against a subsample of itself is close to 0, p = 1 as well.
    assert sliced_wasserstein(x, x[::3], num_projections=4, p=1, generator=_gen(0)) < 0.03


def test_sliced_wasserstein_unequal_sizes_known_interpolation():
    # Levels (k + 0.5)/4; x's quantile function interpolates its order statistics at levels 1/4, 3/4
    # (flat beyond): q_x = [0, 0.25, 0.75, 1] against y = [0, 1/3, 2/3, 1] → W2² = 2 (1/12)² / 4.
    x = torch.tensor([1.0, 0.0])
    y = torch.tensor([0.0, 1.0, 1 / 3, 2 / 3])
    assert sliced_wasserstein(x, y, num_projections=2, generator=_gen(0)) == pytest.approx(math.sqrt(1 / 288))
    assert sliced_wasserstein(y, x, num_projections=2, generator=_gen(0)) == pytest.approx(math.sqrt(1 / 288))


def test_sliced_wasserstein_equal_sizes_is_exact_sorted_matching():
    x = torch.tensor([[0.0], [3.0], [1.0]])
    y = torch.tensor([[2.0], [5.0], [1.0]])  # sorted pairs (0,1) (1,2) (3,5): W2² = (1 + 1 + 4) / 3
    assert sliced_wasserstein(x, y, num_projections=3, generator=_gen(0)) == pytest.approx(math.sqrt(2.0))
    assert sliced_wasserstein(x, y, num_projections=3, p=1, generator=_gen(0)) == pytest.approx(4.0 / 3.0)
    assert sliced_wasserstein(x, x, generator=_gen(0)) == 0.0


def test_sliced_wasserstein_2d_shift_and_seeding():
    x = torch.randn(5000, 2, generator=_gen(17))
    y = torch.randn(5000, 2, generator=_gen(18)) + torch.tensor([2.0, -1.0])
    # SW_2² = E_θ (θ·m)² = |m|² / d for a pure shift (plus a small sampling floor).
    expected = math.sqrt(5.0 / 2.0)
    assert sliced_wasserstein(x, y, num_projections=512, generator=_gen(1)) == pytest.approx(expected, rel=0.08)
    a = sliced_wasserstein(x, y, generator=_gen(3))
    assert sliced_wasserstein(x, y, generator=_gen(3)) == a
    assert sliced_wasserstein(x, y, generator=_gen(4)) != a


# ------------------------------------------------------------------------------------- report
def test_distance_report_keys_and_ordering():
    g = _gen(19)
    ref = torch.randn(2000, 2, generator=g)
    same = torch.randn(2000, 2, generator=g)
    far = torch.randn(2000, 2, generator=g) + 1.0
    r_same = distance_report(same, ref, generator=_gen(0))
    r_far = distance_report(far, ref, generator=_gen(0))
    assert set(r_same) == {"energy_distance", "sliced_wasserstein", "mmd"}
    assert all(isinstance(v, float) and v >= 0 for v in r_same.values())
    for key in r_same:
        assert r_far[key] > 5 * r_same[key], key
