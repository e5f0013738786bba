"""Known-answer tests of energyflow.guidance on a Gaussian oracle tilted by a linear energy.

Data p = N(μ, s²I), energy E(x) = a·x, target q ∝ p·exp(−βE) = N(μ_q, s²I), μ_q = μ − β s² a.
On an affine path (x_t = α x1 + σ x0, v_t = α² s² + σ²) the posterior of x1 given x_t is Gaussian,

    m_t(x) = μ + (α s² / v_t)(x − α μ),     Var = s² σ² / v_t,

so QGPO's exact intermediate energy is
    f(x, t) = log E_p[exp(−β a·x1) | x_t = x] = −β a·m_t(x) + ½ β² |a|² s² σ² / v_t,
whose x-gradient is exactly ∇log q_t − ∇log p_t: CEP guidance with this f and scale 1 samples q.
Energy guidance at x̂1 (DPS) uses −β ∇_x E(x̂1(x)) = −β (α s²/v_t) a, the same gradient: it is also
exact here (linear energy, affine x̂1).  Guidance at x_t uses −β a: not exact.

On the linear VP schedule the score → velocity coefficient c(t) = σ(α̇σ/α − σ̇) equals ½ b(1 − t) ∈
[0.05, 10], so evaluating it at max(t, min_time) is harmless; on the cosine schedule c diverges as
t → 0 and the default min_time = 0.01 leaves a visible (small) error.
"""
from __future__ import annotations

import pytest
import torch

from energyflow.energies import BlackBoxEnergy, FunctionEnergy
from energyflow.guidance import CEPGuidedPredictor, EnergyGuidedPredictor
from energyflow.paths import CondOTPath, VPPath, _bc
from energyflow.predictor import Predictor
from energyflow.samplers import ODESampler

D = torch.float64
MU = torch.tensor([1.0, -0.5], dtype=D)
S = 0.5
A_VEC = torch.tensor([1.0, -2.0], dtype=D)
BETA = 0.8
MU_Q = MU - BETA * S * S * A_VEC  # = [0.8, -0.1]


def _coeffs(path, x, t):
    c = path.coefficients(t)
    a, sg = _bc(c.alpha, x), _bc(c.sigma, x)
    return a, sg, a * a * S * S + sg * sg


def _base(path):
    def eps_net(x, t, cond=None):
        a, sg, v = _coeffs(path, x, t)
        return sg * (x - a * MU) / v

    return Predictor(eps_net, path, "epsilon")


def _exact_f(path):
    def f(x, t, cond=None):
        a, sg, v = _coeffs(path, x, t)
        m = MU + a * S * S / v * (x - a * MU)
        var = (S * S * sg * sg / v)[:, 0]
        return -BETA * (m @ A_VEC) + 0.5 * BETA**2 * (A_VEC @ A_VEC) * var

    return f


def _linear_energy():
    return FunctionEnergy(lambda x: x @ A_VEC)


def _standard_normal(n=2000, seed=0):
    """Noise with exactly zero mean and unit std per dimension, so that moments carry no sampling error."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=D)
    return (z - z.mean(0)) / z.std(0)


def _start_and_expected(path, z, mean):
    """Start at the exact marginal N(α μ, v) at t_min; the exact flow then gives, after x̂1 at t_max,
    x = mean + s_eff z with s_eff = s · α s / √v at t_max."""
    a0, _, v0 = _coeffs(path, z, torch.full((z.shape[0],), path.t_min, dtype=D))
    a1, _, v1 = _coeffs(path, z, torch.full((z.shape[0],), path.t_max, dtype=D))
    s_eff = S * a1 * S / v1.sqrt()
    return a0 * mean + v0.sqrt() * z, mean + s_eff * z


def test_guidance_refuses_black_box_energies():
    base = _base(VPPath())
    with pytest.raises(TypeError, match="differentiable"):
        EnergyGuidedPredictor(base, BlackBoxEnergy(lambda a: a.sum(1)), beta=1.0)
    with pytest.raises(TypeError, match="differentiable"):
        EnergyGuidedPredictor(base, _linear_energy() + BlackBoxEnergy(lambda a: a.sum(1)), beta=1.0)
    with pytest.raises(ValueError, match="at"):
        EnergyGuidedPredictor(base, _linear_energy(), beta=1.0, at="x0")


def test_cep_with_exact_energy_gives_the_tilted_predictions():
    """At any (x, t ≥ min_time) the guided model predicts the tilted posterior: x̂1 = μ_q + (α s²/v)(x − α μ_q)."""
    path = VPPath()
    guided = CEPGuidedPredictor(_base(path), _exact_f(path), scale=1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=D) * 1.5
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.99], dtype=D)
    a, sg, v = _coeffs(path, x, t)
    torch.testing.assert_close(guided.predict(x, t, kind="x1"), MU_Q + a * S * S / v * (x - a * MU_Q), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(guided.predict(x, t, kind="epsilon"), sg * (x - a * MU_Q) / v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(guided.predict(x, t, kind="score"), -(x - a * MU_Q) / v, rtol=1e-9, atol=1e-9)
    # scale 0 is the unguided model
    base_v = _base(path).predict(x, t)
    torch.testing.assert_close(CEPGuidedPredictor(_base(path), _exact_f(path), scale=0.0).predict(x, t), base_v)


def test_cep_guided_sampling_reaches_the_tilted_target():
    path = VPPath("linear")  # c(t) is bounded here: the default min_time is harmless
    z = _standard_normal()
    x_start, expected = _start_and_expected(path, z, MU_Q)
    guided = CEPGuidedPredictor(_base(path), _exact_f(path), scale=1.0)
    res = ODESampler("rk4", 50).sample(guided, x_start)
    # measured: max pathwise error 1.3e-6 (7.5e-7 with min_time = 0)
    assert (res.x - expected).abs().max().item() < 1e-5
    torch.testing.assert_close(res.x.mean(0), MU_Q, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.x.std(0), torch.full((2,), S, dtype=D), rtol=0, atol=1e-3)  # s_eff = s(1 − 2e-4)
    assert not res.x.requires_grad
    # The unguided model from the same start stays near μ (the tilt really is 0.8 a·s² = 0.2|a|).
    unguided = ODESampler("rk4", 50).sample(_base(path), x_start).x.mean(0)
    assert (unguided - MU_Q).abs().max().item() > 0.15


def test_min_time_on_the_cosine_schedule():
    """With min_time = 0 CEP guidance is exact on the cosine schedule too (c(t) → ∞ at t = 0, but the
    sampler starts at t_min = 1e-3); the default min_time = 0.01 leaves a small error (measured 1.2e-3)."""
    path = VPPath("cosine")
    z = _standard_normal(500)
    x_start, expected = _start_and_expected(path, z, MU_Q)
    exact = ODESampler("rk4", 50).sample(CEPGuidedPredictor(_base(path), _exact_f(path), min_time=0.0), x_start).x
    assert (exact - expected).abs().max().item() < 1e-5  # measured 5e-8
    clamped = ODESampler("rk4", 50).sample(CEPGuidedPredictor(_base(path), _exact_f(path)), x_start).x
    err = (clamped - expected).abs().max().item()
    assert 1e-4 < err < 0.01


def test_energy_guidance_at_x1_is_exact_for_linear_energy():
    """DPS guidance with E(x̂1) equals CEP with the exact f here, and moves the mean by −β s² a."""
    path = VPPath("linear")
    z = _standard_normal()
    x_start, expected = _start_and_expected(path, z, MU_Q)
    guided = EnergyGuidedPredictor(_base(path), _linear_energy(), beta=BETA, at="x1")
    res = ODESampler("rk4", 50).sample(guided, x_start)
    assert (res.x - expected).abs().max().item() < 1e-5
    cep = ODESampler("rk4", 50).sample(CEPGuidedPredictor(_base(path), _exact_f(path)), x_start).x
    torch.testing.assert_close(res.x, cep, rtol=0, atol=1e-9)
    # The right direction: the mean energy drops by β s² |a|² = 1 relative to the data mean μ
    # (and by 0.997 relative to the unguided run from the same start, whose mean is 0.3 % off μ).
    drop = ((MU - res.x.mean(0)) @ A_VEC).item()
    assert drop == pytest.approx(BETA * S * S * (A_VEC @ A_VEC).item(), rel=1e-4)
    base_mean = ODESampler("rk4", 50).sample(_base(path), x_start).x.mean(0)
    assert ((base_mean - res.x.mean(0)) @ A_VEC).item() > 0.99
    # β = 0 is the unguided model.
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=D)
    t = torch.full((4,), 0.4, dtype=D)
    torch.testing.assert_close(EnergyGuidedPredictor(_base(path), _linear_energy(), beta=0.0).predict(x, t),
                               _base(path).predict(x, t))


def test_energy_guidance_at_xt_is_crude():
    """Guidance with ∇E(x_t) = a ignores that x_t is noisy: it moves the mean the right way, but overshoots."""
    path = VPPath("linear")
    z = _standard_normal()
    x_start, _ = _start_and_expected(path, z, MU_Q)
    res = ODESampler("rk4", 50).sample(EnergyGuidedPredictor(_base(path), _linear_energy(), beta=BETA, at="xt"), x_start)
    base_mean = ODESampler("rk4", 50).sample(_base(path), x_start).x.mean(0)
    drop = ((base_mean - res.x.mean(0)) @ A_VEC).item()
    assert drop > BETA * S * S * (A_VEC @ A_VEC).item()  # right direction, beyond the exact tilt
    assert (res.x.mean(0) - MU_Q).abs().max().item() > 0.5  # measured 3.8: not the target


def test_guidance_on_the_ot_path_at_interior_times():
    """On the OT path c(t) = (1 − t)/t; the guided predictions are the tilted posterior for t ≥ min_time."""
    path = CondOTPath()

    def vel_net(x, t, cond=None):
        a, sg, v = _coeffs(path, x, t)
        return (MU + a * S * S / v * (x - a * MU)) - sg * (x - a * MU) / v  # x̂1 − ε̂

    base = Predictor(vel_net, path, "velocity")
    guided = EnergyGuidedPredictor(base, _linear_energy(), beta=BETA, at="x1", min_time=0.05)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=D)
    t = torch.tensor([0.05, 0.2, 0.5, 0.7, 0.95], dtype=D)
    a, sg, v = _coeffs(path, x, t)
    torch.testing.assert_close(guided.predict(x, t, kind="x1"), MU_Q + a * S * S / v * (x - a * MU_Q), rtol=1e-9, atol=1e-9)
