"""Toy domain: data sets, energies, closed-form Gaussian-mixture tilts and the exact tilted target."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from domains.toy import (
    CHECKERBOARD_HALF_WIDTH,
    EIGHT_GAUSSIANS_RADIUS,
    EIGHT_GAUSSIANS_STD,
    TOY_DATASETS,
    ExactTiltedTarget,
    GaussianMixture,
    LinearEnergy,
    QuadraticEnergy,
    RingEnergy,
    SineEnergy,
    eight_gaussians_mixture,
    log_density,
    sample_toy,
)
from energyflow.energies import Energy
from energyflow.metrics import energy_distance, energy_distance_floor

torch.set_num_threads(1)

LINEAR_A = [0.2, 0.1]
QUAD_C, QUAD_SCALE = [1.0, 2.0], 2.0
BETAS = (1.0, 3.0, 10.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grid(extent: float, res: int) -> tuple[torch.Tensor, float]:
    """Cell centres ``[res², 2]`` (float64) of a grid over ``[−extent, extent]²`` and the cell area."""
    h = 2 * extent / res
    c = -extent + h * (torch.arange(res, dtype=torch.float64) + 0.5)
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), h * h


def _weighted_moments(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(torch.float64)
    mean = w @ x
    c = x - mean
    return mean, c.T @ (w[:, None] * c)


# ------------------------------------------------------------------------------------ data sets
@pytest.mark.parametrize("name", TOY_DATASETS)
def test_dataset_is_seeded_reproducible_finite_and_in_range(name):
    a = sample_toy(name, 4000, generator=_gen(0))
    b = sample_toy(name, 4000, generator=_gen(0))
    c = sample_toy(name, 4000, generator=_gen(1))
    assert a.shape == (4000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()
    inside = (a.abs() <= 4.5).all(dim=1).float().mean()
    if name == "8gaussians":  # the 4 axis modes put P(z > 1) ≈ 16 % of their mass beyond 4.5: ≈ 92 % inside
        assert 0.9 < inside < 0.94 and a.abs().max() < 4.0 + 8 * EIGHT_GAUSSIANS_STD
    else:
        assert inside > 0.999
    # Not degenerate: spread over the box in both coordinates.
    assert (a.std(0) > 0.5).all()
    d64 = sample_toy(name, 10, generator=_gen(0), dtype=torch.float64)
    assert d64.dtype == torch.float64


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError, match="8gaussians.*checkerboard.*2spirals"):
        sample_toy("9gaussians", 10)
    with pytest.raises(ValueError, match="valid names"):
        log_density("nope", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="valid names"):
        ExactTiltedTarget("nope", LinearEnergy([1.0, 0.0]), 1.0)


def test_eight_gaussians_samples_follow_the_mixture():
    x = sample_toy("8gaussians", 80000, generator=_gen(2), dtype=torch.float64)
    gmm = eight_gaussians_mixture()
    assert torch.allclose(gmm.means.norm(dim=1), torch.full((8,), EIGHT_GAUSSIANS_RADIUS, dtype=torch.float64))
    # Each point's nearest mean gives its component (modes are 3 radii·sin(π/8)/std ≈ 6 std apart).
    nearest = torch.cdist(x, gmm.means).argmin(1)
    frac = torch.bincount(nearest, minlength=8).double() / len(x)
    assert torch.allclose(frac, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.006)
    resid = x - gmm.means[nearest]
    assert resid.std(0) == pytest.approx([EIGHT_GAUSSIANS_STD] * 2, rel=0.02)
    mean, cov = _weighted_moments(x, torch.full((len(x),), 1 / len(x), dtype=torch.float64))
    assert torch.allclose(mean, gmm.mean(), atol=0.05)
    assert torch.allclose(cov, gmm.covariance(), atol=0.15)  # 8.25 I
    assert torch.allclose(gmm.covariance(), 8.25 * torch.eye(2, dtype=torch.float64))


def test_log_densities_integrate_to_one_and_cover_the_samples():
    pts, area = _grid(7.0, 700)
    for name in ("8gaussians", "checkerboard"):
        mass = float(log_density(name, pts).exp().sum() * area)
        assert mass == pytest.approx(1.0, abs=2e-3), name
        samples = sample_toy(name, 5000, generator=_gen(3))
        assert torch.isfinite(log_density(name, samples)).all()
    lp = log_density("checkerboard", torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [1.0, 1.0], [4.5, 0.0]]))
    assert torch.allclose(lp[[0, 2]], torch.full((2,), -math.log(32.0)))
    assert torch.isneginf(lp[[1, 3]]).all()
    assert CHECKERBOARD_HALF_WIDTH == 4.0
    for name in ("swissroll", "moons", "rings", "2spirals"):
        with pytest.raises(NotImplementedError):
            log_density(name, pts[:3])


def test_gaussian_mixture_log_prob_matches_direct_formula():
    gmm = GaussianMixture(torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64), 0.7,
                          torch.log(torch.tensor([0.3, 0.7], dtype=torch.float64)))
    x = torch.randn(50, 2, generator=_gen(4), dtype=torch.float64)
    dens = sum(
        w * torch.exp(-((x - m) ** 2).sum(1) / (2 * 0.49)) / (2 * math.pi * 0.49)
        for w, m in zip([0.3, 0.7], gmm.means)
    )
    assert torch.allclose(gmm.log_prob(x), dens.log(), rtol=1e-12)
    # log_weights are normalised on construction.
    unnorm = GaussianMixture(gmm.means, 0.7, gmm.log_weights + 5.0)
    assert torch.allclose(unnorm.log_weights, gmm.log_weights)


# ------------------------------------------------------------------------------------ energies
def test_energy_values_gradients_and_reprs():
    x = torch.tensor([[3.0, 4.0], [0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    lin, quad = LinearEnergy([1.0, 2.0]), QuadraticEnergy([1.0, 1.0], scale=2.0)
    ring, sine = RingEnergy(radius=2.0, width=0.5), SineEnergy(amplitude=2.0, frequency=0.5, slope=-1.0)
    assert torch.allclose(lin(x), torch.tensor([11.0, -2.0], dtype=torch.float64))
    assert torch.allclose(quad(x), torch.tensor([13 / 8, 5 / 8], dtype=torch.float64))
    assert torch.allclose(ring(x), torch.tensor([18.0, 2.0], dtype=torch.float64))
    assert torch.allclose(sine(x), torch.tensor([2 * math.sin(1.5) - 4.0, 1.0], dtype=torch.float64))
    (g_quad,) = torch.autograd.grad(quad(x).sum(), x)
    assert torch.allclose(g_quad, (x.detach() - torch.tensor([1.0, 1.0], dtype=torch.float64)) / 4.0)
    (g_sine,) = torch.autograd.grad(sine(x).sum(), x)
    assert torch.allclose(g_sine[:, 0], torch.cos(0.5 * x.detach()[:, 0]))
    assert torch.allclose(g_sine[:, 1], torch.full((2,), -1.0, dtype=torch.float64))
    namespace = {c.__name__: c for c in (LinearEnergy, QuadraticEnergy, RingEnergy, SineEnergy)}
    for e in (lin, quad, ring, sine):
        assert isinstance(e, Energy) and e.differentiable
        clone = eval(repr(e), namespace)  # repr is the constructor call
        assert torch.equal(clone(x.detach()), e(x.detach()))
    assert LinearEnergy(torch.tensor([1.0, 2.0])).direction == (1.0, 2.0)
    with pytest.raises(ValueError, match="shape"):
        lin(torch.zeros(3, 3))
    with pytest.raises(ValueError):
        QuadraticEnergy([0.0, 0.0], scale=0.0)


def test_energies_build_from_hydra_configs():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {"_target_": "domains.toy.energies.QuadraticEnergy", "center": [1.0, -2.0], "scale": 0.5}
    )
    e = hydra_utils.instantiate(cfg)
    assert isinstance(e, QuadraticEnergy) and e.center == (1.0, -2.0) and e.scale == 0.5
    sine = hydra_utils.instantiate({"_target_": "domains.toy.SineEnergy", "slope": 0.5})
    assert sine(torch.tensor([[0.0, 2.0]])).item() == pytest.approx(1.0)


# ------------------------------------------------------------------- closed-form mixture tilts
def _tilts(gmm: GaussianMixture, beta: float):
    """(name, energy, tilted mixture, exact log Z) for the linear and quadratic test energies."""
    a, c = torch.tensor(LINEAR_A), torch.tensor(QUAD_C)
    return [
        ("linear", LinearEnergy(LINEAR_A), gmm.tilt_linear(a, beta), gmm.log_partition_linear(a, beta)),
        ("quadratic", QuadraticEnergy(QUAD_C, QUAD_SCALE), gmm.tilt_quadratic(c, QUAD_SCALE, beta),
         gmm.log_partition_quadratic(c, QUAD_SCALE, beta)),
    ]


@pytest.mark.parametrize("beta", BETAS)
def test_tilt_closed_forms_are_pointwise_exact(beta):
    # log q(x) = log p(x) − β E(x) − log Z at arbitrary points, for both tilts.
    gmm = eight_gaussians_mixture()
    x = 5.0 * torch.randn(200, 2, generator=_gen(5), dtype=torch.float64)
    for name, energy, tilted, log_z in _tilts(gmm, beta):
        expected = gmm.log_prob(x) - beta * energy(x) - log_z
        assert torch.allclose(tilted.log_prob(x), expected, atol=1e-9), name


def test_tilt_quadratic_matches_grid_integration():
    # Per-component masses ∫ N(x; μ_k, s²) exp(−β E) dx and log Z, by quadrature on a fine grid.
    gmm = eight_gaussians_mixture()
    pts, area = _grid(8.0, 800)
    energy = QuadraticEnergy(QUAD_C, QUAD_SCALE)
    for beta in (0.5, 3.0, 10.0):
        log_tilt = -beta * energy(pts)
        sq = torch.cdist(pts, gmm.means).square()
        comp_log = -sq / (2 * gmm.std**2) - math.log(2 * math.pi * gmm.std**2) + log_tilt[:, None]
        log_mass = torch.logsumexp(comp_log, 0) + math.log(area)  # [K]
        tilted = gmm.tilt_quadratic(torch.tensor(QUAD_C), QUAD_SCALE, beta)
        assert torch.allclose(tilted.log_weights, log_mass - torch.logsumexp(log_mass, 0), atol=1e-6)
        log_z_grid = torch.logsumexp(gmm.log_weights + log_mass, 0)
        assert float(gmm.log_partition_quadratic(torch.tensor(QUAD_C), QUAD_SCALE, beta)) == pytest.approx(
            float(log_z_grid), abs=1e-6
        )
        # The tilted components' std and means from the grid's first two moments.
        w = torch.softmax(comp_log, 0)  # [P, K]: each column the normalised tilted component
        means = w.T @ pts
        assert torch.allclose(tilted.means, means, atol=1e-6)
        var = (w * (pts[:, None, :] - means[None]).square().sum(-1)).sum(0) / 2
        assert torch.allclose(var, torch.full((8,), tilted.std**2, dtype=torch.float64), rtol=1e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_tilts_match_importance_resampling_of_the_data(beta):
    gmm = eight_gaussians_mixture()
    for name, energy, tilted, _ in _tilts(gmm, beta):
        target = ExactTiltedTarget("8gaussians", energy, beta)
        # Weighted pool moments agree with the closed form within a few standard errors.
        mean, cov = _weighted_moments(target.pool, target.weights)
        se = math.sqrt(float(tilted.covariance().diagonal().max()) / target.pool_ess)
        assert torch.allclose(mean, tilted.mean(), atol=6 * se), (name, mean, tilted.mean())
        assert torch.allclose(cov, tilted.covariance(), atol=0.02 + 0.03 * float(tilted.covariance().abs().max()))
        # Resampled points are indistinguishable from closed-form samples (energy distance at the floor) …
        n = 2000
        resampled = target.sample(n, generator=_gen(6))
        exact = tilted.sample(n, generator=_gen(7))
        floor = energy_distance_floor(tilted.sample(n, generator=_gen(8)), n)
        assert energy_distance(resampled, exact) < 5 * floor, name
        # … and clearly distinguishable from the untilted data: the test has power.
        assert energy_distance(gmm.sample(n, generator=_gen(9)), exact) > 10 * floor, name


def test_linear_tilt_moves_modes_and_mass_as_derived():
    gmm = eight_gaussians_mixture()
    a, beta = torch.tensor([1.0, 0.0], dtype=torch.float64), 2.0
    tilted = gmm.tilt_linear(a, beta)
    assert torch.allclose(tilted.means, gmm.means - beta * gmm.std**2 * a)
    ratio = (tilted.log_weights[4] - tilted.log_weights[0]).item()  # mode at (−4, 0) vs (4, 0)
    assert ratio == pytest.approx(beta * 8.0)
    assert tilted.std == gmm.std
    with pytest.raises(ValueError, match="beta"):
        gmm.tilt_quadratic(torch.zeros(2), 1.0, -1.0)


# ---------------------------------------------------------------------------- the exact target
def test_target_with_beta_zero_is_the_data_distribution():
    target = ExactTiltedTarget("moons", SineEnergy(), beta=0.0, pool_size=200_000)
    assert target.pool_ess == pytest.approx(200_000)
    assert torch.allclose(target.weights, torch.full_like(target.weights, 1 / 200_000))
    n = 2000
    fresh = sample_toy("moons", n, generator=_gen(10))
    floor = energy_distance_floor(sample_toy("moons", n, generator=_gen(11)), n)
    assert energy_distance(target.sample(n, generator=_gen(12)), fresh) < 5 * floor
    # Exact grid density at β = 0 is the data density.
    grid = ExactTiltedTarget("8gaussians", SineEnergy(), 0.0).density_grid(extent=6.0, resolution=100)
    pts, area = _grid(6.0, 100)
    p = log_density("8gaussians", pts).exp()
    assert torch.allclose(grid.density.reshape(-1), p / (p.sum() * area), rtol=1e-9)


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard", "swissroll", "2spirals"])
def test_density_grid_integrates_to_one(name):
    target = ExactTiltedTarget(name, RingEnergy(2.0, 0.5), beta=1.0, pool_size=200_000)
    grid = target.density_grid(extent=4.5, resolution=120)
    assert grid.density.shape == (120, 120) and grid.xs.shape == (120,)
    assert (grid.density >= 0).all()
    assert float(grid.density.sum()) * grid.cell_area == pytest.approx(1.0, abs=1e-9)
    assert grid.cell_area == pytest.approx((9.0 / 120) ** 2)
    hist = target.density_grid(extent=4.5, resolution=120, method="histogram")
    assert float(hist.density.sum()) * hist.cell_area == pytest.approx(1.0, abs=1e-9)


def test_sine_tilt_resampling_matches_the_exact_grid_density():
    # The non-Gaussian case: importance resampling of the pool against p·exp(−βE) on a grid.
    beta = 3.0
    target = ExactTiltedTarget("8gaussians", SineEnergy(), beta)
    exact = target.density_grid(extent=7.0, resolution=70, method="exact")
    hist = target.density_grid(extent=7.0, resolution=70, method="histogram")
    l1 = float((exact.density - hist.density).abs().sum()) * exact.cell_area
    assert l1 < 0.05, l1
    # Moments: grid quadrature vs weighted pool vs resampled points.
    pts, area = _grid(7.0, 700)
    q = torch.softmax(log_density("8gaussians", pts) - beta * SineEnergy()(pts), 0)
    grid_mean = q @ pts
    pool_mean = target.weights @ target.pool.double()
    assert torch.allclose(pool_mean, grid_mean, atol=0.02)
    s = target.sample(20000, generator=_gen(13)).double()
    assert torch.allclose(s.mean(0), grid_mean, atol=0.08)
    # The modes are reweighted unevenly: mode 5 (angle 5π/4, E ≈ −1.01) beats mode 1 (π/4, E ≈ +1.01).
    gmm = eight_gaussians_mixture()
    frac = torch.bincount(torch.cdist(s, gmm.means).argmin(1), minlength=8).double() / len(s)
    assert frac[5] > 5 * frac[1]
    assert frac.max() < 0.5


def test_target_sampling_is_seeded_and_warns_on_low_ess():
    target = ExactTiltedTarget("rings", RingEnergy(3.0, 0.2), beta=1.0, pool_size=100_000, seed=1)
    a = target.sample(500, generator=_gen(14))
    assert torch.equal(a, target.sample(500, generator=_gen(14)))
    assert a.shape == (500, 2)
    assert (a.norm(dim=1) - 3.0).abs().mean() < 0.3  # the ring of radius 3 is preferred
    other_seed = ExactTiltedTarget("rings", RingEnergy(3.0, 0.2), beta=1.0, pool_size=100_000, seed=2)
    assert not torch.equal(other_seed.pool, target.pool)
    with pytest.warns(RuntimeWarning, match="effective sample size"):
        ExactTiltedTarget("8gaussians", LinearEnergy([5.0, 0.0]), beta=20.0, pool_size=20_000).pool_ess
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ExactTiltedTarget("8gaussians", LinearEnergy([0.1, 0.0]), 1.0, pool_size=20_000).pool_ess > 1000
    with pytest.raises(ValueError, match="beta"):
        ExactTiltedTarget("rings", RingEnergy(), beta=-1.0)
