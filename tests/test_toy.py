"""Toy domain: data sets, energies, closed-form Gaussian-mixture tilts and the exact tilted target;
the toy experiment's input validation, its stage cache and its refusal of β beyond the exact target."""
from __future__ import annotations

import json
import math
import os
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
from domains.toy.experiment import ToyExperiment
from energyflow.cli import main
from energyflow.energies import Energy, FunctionEnergy
from energyflow.errors import InputError
from energyflow.experiment import load_model_state
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


# ------------------------------------------------------------------ β beyond the pool's reach
def test_extreme_beta_keeps_valid_weights_and_reports_the_collapse():
    # β = 1e6: the weights stay a finite distribution (log space, max-subtracted) but the pool's ESS is ~1.
    energy = SineEnergy(0.3, 1.0, 0.1)
    with pytest.warns(RuntimeWarning, match="effective sample size"):
        target = ExactTiltedTarget("8gaussians", energy, 1e6, pool_size=20_000)
        weights = target.weights
    assert torch.isfinite(weights).all() and float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert target.pool_ess == pytest.approx(1.0, abs=1e-6)
    best = int(torch.argmin(energy(target.pool.double())))
    assert torch.equal(target.sample(5, _gen(0)), target.pool[[best] * 5])  # every "exact" sample is one point
    # The largest β at which the pool still has an ESS of 1000, found by bisection.
    limit = target.max_supported_beta(1000.0)
    assert 5.0 < limit < 30.0
    assert target.ess_at(limit) >= 1000.0 > target.ess_at(limit * 1.01)
    assert ExactTiltedTarget("8gaussians", energy, 0.0, pool_size=500).max_supported_beta(1000.0) == 0.0
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite and >= 0"):
            ExactTiltedTarget("8gaussians", energy, bad)


# -------------------------------------------------------------- the toy experiment: validation
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "toy_8gaussians.yaml")
TINY_TOY = [  # one β, OT path, FM + CEP baselines, tiny nets and evaluation: seconds on one core
    "experiment.betas=[1]", "experiment.paths=[ot]", "experiment.baselines=[fm,guidance,cep]",
    "experiment.trainer.steps=5", "experiment.trainer.batch_size=64", "experiment.net.hidden=16",
    "experiment.net.depth=1", "experiment.cep.steps=5", "experiment.cep.hidden=16", "experiment.cep.depth=1",
    "experiment.num_eval_samples=50", "experiment.eval_repeats=1", "experiment.pool_size=20000",
    "experiment.sampler.steps=4", "experiment.guidance_steps=4", "experiment.trainer.progress=false",
    "experiment.trainer.device=cpu", "++experiment.trainer.tensorboard=false", "++experiment.plot=false",
]
SMALL = dict(dataset="8gaussians", energy=SineEnergy(0.3, 1.0, 0.1), betas=[1.0], paths=["ot", "vp"],
             baselines=["fm", "cep"], net={"hidden": 16, "depth": 1},
             trainer={"steps": 5, "batch_size": 64, "device": "cpu", "progress": False, "tensorboard": False},
             path_trainer={"vp": {"steps": 6}}, cep={"steps": 5, "hidden": 16, "depth": 1},
             num_eval_samples=50, eval_repeats=1, pool_size=20_000, plot=False)


def _toy(**changes) -> ToyExperiment:
    return ToyExperiment(**{**SMALL, **changes})


def _cli_error(argv, capsys) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr (no traceback); return it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("energyflow: error: ")
    return lines[0]


@pytest.mark.parametrize("override, key, expected", [
    ("experiment.betas=[nan]", "experiment.betas", "finite"),
    ("experiment.betas=[inf]", "experiment.betas", "finite"),
    ("experiment.betas=[1,-1]", "experiment.betas[1]", ">= 0"),
    ("experiment.betas=[]", "experiment.betas", "non-empty list"),
    ("experiment.betas=3", "experiment.betas", "list"),
    ("experiment.betas=[1,1.0000001]", "experiment.betas", "same model name"),
    ("experiment.betas=[1e6]", "experiment.betas", "supported: 0 <= beta <= "),
    ("experiment.dataset=nope", "experiment.dataset", "unknown toy dataset"),
    ("experiment.paths=[ot,sde]", "experiment.paths", "'sde'"),
    ("experiment.paths=[ot,ot]", "experiment.paths", "twice"),
    ("experiment.baselines=[fm,dpo]", "experiment.baselines", "'dpo'"),
    ("experiment.num_eval_samples=0", "experiment.num_eval_samples", ">= 2"),
    ("experiment.eval_repeats=0", "experiment.eval_repeats", ">= 1"),
    ("experiment.pool_size=0", "experiment.pool_size", ">= 1000"),
    ("experiment.guidance_steps=0", "experiment.guidance_steps", ">= 1"),
    ("experiment.guidance_min_time=0", "experiment.guidance_min_time", "> 0"),
    ("experiment.x1_clip=-1", "experiment.x1_clip", "> 0"),
    ("experiment.x1_clip=nan", "experiment.x1_clip", "finite"),
    ("experiment.sampler.name=leapfrog", "experiment.sampler", "unknown sampler 'leapfrog'"),
    ("experiment.sampler.steps=0", "experiment.sampler.steps", ">= 1"),
    ("experiment.net.hidden=0", "experiment.net.hidden", ">= 1"),
    ("experiment.net.depth=2.5", "experiment.net.depth", "integer"),
    ("++experiment.net.width=3", "experiment.net", "'width'"),
    ("experiment.cep.group_size=1", "experiment.cep.group_size", ">= 2"),
    ("experiment.cep.group_size=7", "experiment.cep.group_size", "must divide"),
    ("experiment.cep.steps=0", "experiment.cep", "'steps'"),
    ("experiment.trainer.steps=0", "experiment.trainer", "'steps'"),
    ("++experiment.path_trainer.vp.batch_size=0", "experiment.path_trainer.vp", "'batch_size'"),
    ("++experiment.path_trainer.sde={steps:1}", "experiment.path_trainer", "'sde'"),
    ("++experiment.trainer.colour=red", "experiment.trainer", "'colour'"),
])
def test_bad_toy_inputs_are_refused_before_training(override, key, expected, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = _cli_error(["run", RECIPE, *TINY_TOY, override, "--run-dir", str(run_dir)], capsys)
    assert key in line and expected in line, line
    assert not (run_dir / "stages").exists()  # nothing was trained


def test_beta_beyond_the_exact_target_is_refused_with_the_supported_range(tmp_path, capsys):
    line = _cli_error(["run", RECIPE, *TINY_TOY, "experiment.betas=[1,1e6]", "--run-dir", str(tmp_path / "r")], capsys)
    assert "experiment.betas: beta=1e+06" in line and "effective sample size 1.0 < 1000" in line
    limit = float(line.split("<= beta <= ")[1].split()[0])
    assert 5 < limit < 30
    # just inside the range is accepted, just outside refused: the limit is the one the message states
    _toy(betas=[limit * 0.99])
    with pytest.raises(InputError, match="experiment.betas"):
        _toy(betas=[limit * 1.05])


def test_toy_inputs_that_only_python_can_give_are_checked():
    with pytest.raises(InputError, match="experiment.energy: FunctionEnergy has no stable description"):
        _toy(energy=FunctionEnergy(lambda x: x[:, 0]))
    assert _toy(baselines=["guidance"]).energy.differentiable  # the toy energies are
    nondiff = SineEnergy()
    nondiff.differentiable = False
    with pytest.raises(InputError, match="experiment.baselines: 'guidance' needs a differentiable energy"):
        _toy(energy=nondiff, baselines=["guidance"])
    with pytest.raises(InputError, match="nothing to train"):
        _toy(paths=[], baselines=[])
    with pytest.raises(InputError, match="experiment.energy cannot weight"):
        _toy(energy=LinearEnergy([1.0, 0.0, 0.0]))
    with pytest.raises(InputError, match="experiment.plot"):
        _toy(plot="yes")


# ----------------------------------------------------------- the toy experiment: stage cache
def _keys(experiment: ToyExperiment) -> dict[str, str]:
    return {name: stage.key for name, stage in experiment.stages("unused").items()}


ALL_MODELS = {"efm_ot_beta1", "efm_vp_beta1", "fm_ot", "cep_beta1"}


@pytest.mark.parametrize("changes, changed", [
    (dict(dataset="moons"), ALL_MODELS),
    (dict(energy=SineEnergy(0.3, 1.0, 0.2)), {"efm_ot_beta1", "efm_vp_beta1", "cep_beta1"}),
    (dict(energy=RingEnergy(2.0, 0.5)), {"efm_ot_beta1", "efm_vp_beta1", "cep_beta1"}),
    (dict(seed=1), ALL_MODELS),
    (dict(net={"hidden": 32, "depth": 1}), {"efm_ot_beta1", "efm_vp_beta1", "fm_ot"}),
    (dict(net={"hidden": 16, "depth": 1, "time_dim": 32}), {"efm_ot_beta1", "efm_vp_beta1", "fm_ot"}),
    (dict(trainer={**SMALL["trainer"], "lr": 1e-2}), ALL_MODELS),
    (dict(trainer={**SMALL["trainer"], "steps": 10}), {"efm_ot_beta1", "fm_ot"}),  # vp and cep override steps
    (dict(trainer={**SMALL["trainer"], "seed": 3}), ALL_MODELS),
    (dict(path_trainer={"vp": {"steps": 7}}), {"efm_vp_beta1"}),
    (dict(path_trainer={"vp": {"steps": 6}, "ot": {"ema_decay": 0.5}}), {"efm_ot_beta1", "fm_ot"}),
    (dict(cep={**SMALL["cep"], "steps": 6}), {"cep_beta1"}),
    (dict(cep={**SMALL["cep"], "group_size": 8}), {"cep_beta1"}),
    (dict(cep={**SMALL["cep"], "hidden": 8}), {"cep_beta1"}),
    # what does not change a model keeps its stage: execution settings, sampling and evaluation
    (dict(trainer={**SMALL["trainer"], "progress": True, "tensorboard": True, "log_every": 1, "device": "auto",
                   "num_threads": 2, "checkpoint_every": 2}), set()),
    (dict(sampler={"name": "rk4", "steps": 3}, guidance_steps=3, x1_clip=6.0, num_eval_samples=10,
          eval_repeats=3, pool_size=30_000, plot=True), set()),
    (dict(net={"hidden": 16, "depth": 1, "time_dim": 64}), set()),  # the default, spelled out
    (dict(betas=[1.0, 2.0], baselines=["fm", "guidance", "cep"]), set()),  # a new β adds stages only
])
def test_stage_keys_hold_every_input_of_their_model(changes, changed):
    base, other = _keys(_toy()), _keys(_toy(**changes))
    assert set(base) <= set(other)
    assert {name for name in base if other[name] != base[name]} == changed
    assert _toy().stage_names() == ["efm_ot_beta1", "efm_vp_beta1", "fm_ot", "cep_beta1"]
    stage = _toy().stages("R")["efm_ot_beta1"]
    assert stage.folder == os.path.join("R", "stages", f"efm_ot_beta1-{stage.key}")
    assert stage.config["energy"] is SMALL["energy"] and stage.config["beta"] == 1.0 and stage.config["path"] == "ot"


def _run(run_dir, *overrides, force=False) -> dict:
    argv = ["run", RECIPE, *TINY_TOY, *overrides, "--run-dir", str(run_dir)] + (["--force"] if force else [])
    assert main(argv) == 0
    return json.loads((run_dir / "results.json").read_text())


def _stage_files(run_dir) -> dict[str, float]:
    root = run_dir / "stages"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_changed_config_retrains_its_models_and_evaluates_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = _run(run_dir)
    assert {k: v["trained_now"] for k, v in first["training"].items()} == {
        "efm_ot_beta1": True, "fm_ot": True, "cep_beta1": True}
    old = load_model_state(str(run_dir), "efm_ot_beta1")
    assert old["meta"]["steps"] == 5

    # --force with more steps: the OT models are retrained (cep has its own steps), and evaluated
    second = _run(run_dir, "experiment.trainer.steps=10", force=True)
    trained = {k: v["trained_now"] for k, v in second["training"].items()}
    assert trained == {"efm_ot_beta1": True, "fm_ot": True, "cep_beta1": False}
    assert second["training"]["efm_ot_beta1"]["steps"] == 10 == second["training"]["fm_ot"]["steps"]
    assert second["stages"]["efm_ot_beta1"] != first["stages"]["efm_ot_beta1"]
    assert second["stages"]["cep_beta1"] == first["stages"]["cep_beta1"]
    new = load_model_state(str(run_dir), "efm_ot_beta1")  # the published copy follows the config
    assert new["meta"]["steps"] == 10 and new["meta"]["stage"] == os.path.basename(second["stages"]["efm_ot_beta1"])
    assert any(not torch.equal(a, new["state_dict"][k]) for k, a in old["state_dict"].items())
    assert second["methods"]["efm_ot"]["beta1"] != first["methods"]["efm_ot"]["beta1"]
    assert second["methods"]["guidance"]["beta1"] != first["methods"]["guidance"]["beta1"]  # on the new fm_ot
    metrics = [json.loads(line) for line in open(run_dir / "train" / "efm_ot_beta1" / "metrics.jsonl")]
    assert metrics[-1]["step"] == 10

    # the same config again trains nothing and rewrites no stage file or published model
    before = _stage_files(run_dir)
    published = os.path.getmtime(run_dir / "models" / "efm_ot_beta1.pt")
    third = _run(run_dir, "experiment.trainer.steps=10")
    assert not any(v["trained_now"] for v in third["training"].values())
    assert _stage_files(run_dir) == before
    assert os.path.getmtime(run_dir / "models" / "efm_ot_beta1.pt") == published
    assert third["methods"] == second["methods"]

    # back to 5 steps: the first stages are reused, nothing is trained
    back = _run(run_dir, force=True)
    assert not any(v["trained_now"] for v in back["training"].values())
    assert back["stages"] == first["stages"] and back["methods"] == first["methods"]
    assert load_model_state(str(run_dir), "efm_ot_beta1")["meta"]["steps"] == 5
    capsys.readouterr()


def test_evaluation_reads_only_the_current_configs_stages(tmp_path, capsys):
    run_dir = tmp_path / "run"
    results = _run(run_dir, "experiment.betas=[1,3]")
    # a published copy is never read back: clobbering it changes nothing
    (run_dir / "models" / "efm_ot_beta1.pt").write_bytes(b"not a model")
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["methods"] == results["methods"]
    # a config whose stages were never trained cannot be evaluated or sampled from the old models
    longer = ToyExperiment(**{**SMALL, "paths": ["ot"], "trainer": {**SMALL["trainer"], "steps": 50}})
    with pytest.raises(InputError, match="'efm_ot_beta1' of this run's config is not trained"):
        longer.sample(str(run_dir), 4, model="efm_ot_beta1")
    with pytest.raises(InputError, match="no model 'efm_ot_beta7'"):
        longer.sample(str(run_dir), 4, model="efm_ot_beta7")
    # dropping a β unpublishes its model copy (its stage stays cached)
    _run(run_dir, "experiment.betas=[1]", force=True)
    assert sorted(os.listdir(run_dir / "models")) == ["cep_beta1.pt", "efm_ot_beta1.pt", "fm_ot.pt"]
    assert any(p.name.startswith("efm_ot_beta3-") for p in (run_dir / "stages").iterdir())
    capsys.readouterr()
