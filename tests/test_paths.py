"""Known-answer tests of energyflow.paths: coefficients, the conditional path, conversions.

Closed forms used as references (ALGORITHMS.md §2; t = 0 noise, t = 1 data):

* CondOT: α_t = t, σ_t = 1 − t.
* VP linear: α_t = exp(−½ ∫₀^{1−t} b(r) dr), b(r) = b_min + r (b_max − b_min), σ_t = √(1 − α_t²).
* VP cosine: α_t = cos(π/2 · (s + c)/(1 + c)) / cos(π/2 · c/(1 + c)), s = 1 − t, c = 0.008.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import integrate

from energyflow.paths import PREDICTIONS, CondOTPath, VPPath, build_path

D = torch.float64
PATHS = {
    "ot": CondOTPath(),
    "vp_linear": VPPath("linear"),
    "vp_cosine": VPPath("cosine"),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _b_linear(r: float, b_min: float = 0.1, b_max: float = 20.0) -> float:
    return b_min + r * (b_max - b_min)


def _alpha_sigma_closed_form(name: str, t: float) -> tuple[float, float]:
    """α_t, σ_t from the formulas in the spec, independently of the engine's code."""
    if name == "ot":
        return t, 1.0 - t
    s = 1.0 - t
    if name == "vp_linear":
        integral, _ = integrate.quad(_b_linear, 0.0, s, epsabs=1e-13, epsrel=1e-12)
        alpha = math.exp(-0.5 * integral)
    else:
        c = 0.008
        alpha = math.cos(0.5 * math.pi * (s + c) / (1 + c)) / math.cos(0.5 * math.pi * c / (1 + c))
    return alpha, math.sqrt(1.0 - alpha * alpha)


# --------------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("name", list(PATHS))
def test_coefficients_match_closed_form(name):
    path = PATHS[name]
    ts = [0.05, 0.2, 0.37, 0.5, 0.71, 0.9, 0.99]
    c = path.coefficients(torch.tensor(ts, dtype=D))
    for i, t in enumerate(ts):
        a, s = _alpha_sigma_closed_form(name, t)
        assert c.alpha[i].item() == pytest.approx(a, rel=1e-12, abs=1e-15)
        assert c.sigma[i].item() == pytest.approx(s, rel=1e-12, abs=1e-15)


def test_vp_linear_alpha_is_exp_of_quadrature_of_b():
    """α at t = 1 − s equals exp(−½ ∫₀^s b(r) dr), the integral done by numerical quadrature."""
    path = VPPath("linear", b_min=0.3, b_max=12.0)
    for s in [1e-3, 0.1, 0.25, 0.5, 0.8, 1.0]:
        integral, _ = integrate.quad(lambda r: _b_linear(r, 0.3, 12.0), 0.0, s, epsabs=1e-13, epsrel=1e-12)
        alpha = path.coefficients(torch.tensor([1.0 - s], dtype=D)).alpha.item()
        assert alpha == pytest.approx(math.exp(-0.5 * integral), rel=1e-12)
    # The natural SDE diffusion is g(t)² = b(1 − t).
    t = torch.tensor([0.0, 0.3, 0.9], dtype=D)
    g = path.sde_diffusion(t)
    for i, ti in enumerate(t.tolist()):
        assert g[i].item() ** 2 == pytest.approx(_b_linear(1.0 - ti, 0.3, 12.0), rel=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vp_log_alpha_is_integral_of_rate(schedule):
    """log α_t = −∫_t^1 α̇/α du (α_1 = 1): the derivative and the value are consistent."""
    path = VPPath(schedule)

    def rate(u: float) -> float:
        c = path.coefficients(torch.tensor([u], dtype=D))
        return (c.d_alpha / c.alpha).item()

    for t in [0.05, 0.3, 0.6, 0.95]:
        integral, _ = integrate.quad(rate, t, 1.0, epsabs=1e-13, epsrel=1e-13)
        alpha = path.coefficients(torch.tensor([t], dtype=D)).alpha.item()
        assert math.log(alpha) == pytest.approx(-integral, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vp_is_variance_preserving(schedule):
    path = VPPath(schedule)
    t = torch.linspace(0.001, 1.0, 1001, dtype=D)
    c = path.coefficients(t)
    torch.testing.assert_close(c.alpha**2 + c.sigma**2, torch.ones_like(t), rtol=0, atol=1e-14)
    # α increases from (almost) 0 at t = 0 to 1 at t = 1.
    assert (c.alpha[1:] > c.alpha[:-1]).all()
    assert c.alpha[-1].item() == pytest.approx(1.0, abs=1e-15)
    assert c.sigma[-1].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", list(PATHS))
def test_coefficient_derivatives_match_central_differences(name):
    path = PATHS[name]
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=D)
    h = 1e-6
    c, cp, cm = path.coefficients(t), path.coefficients(t + h), path.coefficients(t - h)
    torch.testing.assert_close(c.d_alpha, (cp.alpha - cm.alpha) / (2 * h), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.d_sigma, (cp.sigma - cm.sigma) / (2 * h), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ the path itself
@pytest.mark.parametrize("name", list(PATHS))
def test_sample_interpolant_and_velocity_are_exact(name):
    """x_t = α_t x1 + σ_t x0 per sample (event shape [3, 2]); velocity = d x_t/dt by central differences."""
    path = PATHS[name]
    g = _gen(0)
    x0 = torch.randn(6, 3, 2, generator=g, dtype=D)
    x1 = torch.randn(6, 3, 2, generator=g, dtype=D) * 2.0 + 1.0
    ts = [0.05, 0.2, 0.4, 0.6, 0.8, 0.95]
    t = torch.tensor(ts, dtype=D)
    smp = path.sample(x0, x1, t)
    for i, ti in enumerate(ts):
        a, s = _alpha_sigma_closed_form(name, ti)
        torch.testing.assert_close(smp.xt[i], a * x1[i] + s * x0[i], rtol=1e-12, atol=1e-12)
    h = 1e-6
    fd = (path.sample(x0, x1, t + h).xt - path.sample(x0, x1, t - h).xt) / (2 * h)
    torch.testing.assert_close(smp.velocity, fd, rtol=1e-6, atol=1e-6)
    assert smp.t is t and smp.x0 is x0 and smp.x1 is x1
    if name == "ot":
        torch.testing.assert_close(smp.velocity, x1 - x0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(PATHS))
def test_sample_marginals_for_gaussian_data(name):
    """For x1 ~ N(μ, s²): x_t ~ N(α_t μ, α_t² s² + σ_t²) (statistical check, 5-sigma bounds)."""
    path = PATHS[name]
    n, mu, s = 200_000, 1.5, 0.4
    g = _gen(1)
    for t0 in [0.1, 0.5, 0.9]:
        x0 = torch.randn(n, 1, generator=g, dtype=D)
        x1 = mu + s * torch.randn(n, 1, generator=g, dtype=D)
        xt = path.sample(x0, x1, torch.full((n,), t0, dtype=D)).xt[:, 0]
        a, sg = _alpha_sigma_closed_form(name, t0)
        var = a * a * s * s + sg * sg
        assert abs(xt.mean().item() - a * mu) < 5 * math.sqrt(var / n)
        assert abs(xt.var().item() / var - 1.0) < 5 * math.sqrt(2.0 / n)


def test_time_convention():
    """t = 0 is noise, t = 1 is data."""
    g = _gen(2)
    x0, x1 = torch.randn(4, 3, generator=g, dtype=D), torch.randn(4, 3, generator=g, dtype=D) + 5.0
    ot = CondOTPath()
    torch.testing.assert_close(ot.sample(x0, x1, torch.zeros(4, dtype=D)).xt, x0, rtol=0, atol=0)
    torch.testing.assert_close(ot.sample(x0, x1, torch.ones(4, dtype=D)).xt, x1, rtol=0, atol=0)
    vp = VPPath()
    at0 = vp.sample(x0, x1, torch.zeros(4, dtype=D)).xt
    assert (at0 - x0).abs().max() < 0.05  # α_0 = exp(−½(0.1 + 9.95)) ≈ 0.0066: almost pure noise
    torch.testing.assert_close(vp.sample(x0, x1, torch.ones(4, dtype=D)).xt, x1, rtol=0, atol=1e-15)
    # Time grids run from noise to data.
    for path in PATHS.values():
        grid = path.time_grid(10, dtype=D)
        assert grid.shape == (11,) and grid[0] == path.t_min and grid[-1] == path.t_max
        assert (grid[1:] > grid[:-1]).all()
        tt = path.sample_time(1000, generator=_gen(3), dtype=D)
        assert tt.min() >= path.t_min and tt.max() <= path.t_max
    assert VPPath().t_max == pytest.approx(1 - 1e-3) and VPPath("cosine").t_min == pytest.approx(1e-3)


# --------------------------------------------------------------------------- targets, conversions
def _truth(path, seed=4, ts=(0.2, 0.35, 0.5, 0.65, 0.8, 0.9)):
    g = _gen(seed)
    n = len(ts)
    x0 = torch.randn(n, 5, generator=g, dtype=D)
    x1 = torch.randn(n, 5, generator=g, dtype=D) * 1.3 - 0.7
    t = torch.tensor(ts, dtype=D)
    smp = path.sample(x0, x1, t)
    sigma = path.coefficients(t).sigma[:, None]
    truth = {"velocity": smp.velocity, "epsilon": x0, "x1": x1, "score": -x0 / sigma}
    return smp, truth


@pytest.mark.parametrize("name", list(PATHS))
def test_targets(name):
    path = PATHS[name]
    smp, truth = _truth(path)
    for kind in PREDICTIONS:
        torch.testing.assert_close(path.target(smp, kind), truth[kind], rtol=1e-14, atol=1e-14)
    default = "velocity" if name == "ot" else "epsilon"
    assert path.default_prediction == default
    torch.testing.assert_close(path.target(smp), truth[default], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown prediction"):
        path.target(smp, "noise")


@pytest.mark.parametrize("name", list(PATHS))
def test_convert_maps_true_quantities_into_each_other(name):
    """From the exact x0, x1 of a draw, every prediction converts to every other exactly (16 pairs)."""
    path = PATHS[name]
    smp, truth = _truth(path)
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        out = path.convert(truth[src], smp.xt, smp.t, src, dst)
        torch.testing.assert_close(out, truth[dst], rtol=1e-8, atol=1e-10, msg=f"{src} -> {dst}")


@pytest.mark.parametrize("name", list(PATHS))
def test_convert_round_trips_arbitrary_predictions(name):
    """src -> dst -> src is the identity for an arbitrary (not self-consistent) prediction."""
    path = PATHS[name]
    g = _gen(5)
    t = torch.tensor([0.25, 0.5, 0.75, 0.9], dtype=D)
    xt = torch.randn(4, 3, generator=g, dtype=D)
    pred = torch.randn(4, 3, generator=g, dtype=D)
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        back = path.convert(path.convert(pred, xt, t, src, dst), xt, t, dst, src)
        torch.testing.assert_close(back, pred, rtol=1e-8, atol=1e-10, msg=f"{src} -> {dst} -> {src}")
    with pytest.raises(ValueError, match="unknown prediction"):
        path.convert(pred, xt, t, "velocity", "noise")
    with pytest.raises(ValueError, match="unknown prediction"):
        path.convert(pred, xt, t, "noise", "x1")


def test_ot_velocity_to_x1_is_defined_at_t0():
    """On the OT path the velocity form is regular at t = 0 (x̂1 = x + v), unlike ε (α_0 = 0)."""
    path = CondOTPath()
    g = _gen(6)
    x0, x1 = torch.randn(3, 2, generator=g, dtype=D), torch.randn(3, 2, generator=g, dtype=D)
    t = torch.zeros(3, dtype=D)
    torch.testing.assert_close(path.convert(x1 - x0, x0, t, "velocity", "x1"), x1, rtol=0, atol=1e-15)
    torch.testing.assert_close(path.convert(x1 - x0, x0, t, "velocity", "epsilon"), x0, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------ build / errors
def test_build_path_and_errors():
    assert isinstance(build_path("ot"), CondOTPath)
    assert isinstance(build_path("cond_ot", t_max=0.9), CondOTPath) and build_path("cond_ot", t_max=0.9).t_max == 0.9
    vp = build_path("vp", schedule="cosine", b_min=0.2)
    assert isinstance(vp, VPPath) and vp.schedule == "cosine" and vp.b_min == 0.2
    with pytest.raises(ValueError, match="unknown path"):
        build_path("ve")
    with pytest.raises(ValueError, match="schedule"):
        VPPath("quadratic")
    with pytest.raises(TypeError):
        build_path("ot", schedule="linear")  # OT takes no schedule
    path = CondOTPath()
    x = torch.zeros(3, 2, dtype=D)
    with pytest.raises(ValueError, match="shape"):
        path.sample(x, x, torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match="shape"):
        path.sample(x, x, torch.zeros(3, 1, dtype=D))
    with pytest.raises(ValueError, match="steps"):
        path.time_grid(0)
    with pytest.raises(NotImplementedError, match="diffusion"):
        path.sde_diffusion(torch.zeros(3))
