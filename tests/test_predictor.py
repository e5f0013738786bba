"""Predictor: conversions through the path, and x̂1 clipping."""
import torch

from energyflow.paths import CondOTPath, VPPath
from energyflow.predictor import Predictor
from energyflow.samplers import build_sampler


def _x1_net(value):
    return lambda x, t, cond=None: torch.full_like(x, value)


def test_x1_clip_bounds_the_clean_prediction_and_keeps_the_rest_consistent():
    path = VPPath()
    x = torch.randn(64, 2, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.9
    pred = Predictor(_x1_net(50.0), path, "x1", x1_clip=3.0)
    assert torch.allclose(pred.x1(x, t), torch.full_like(x, 3.0))
    # ε̂ is re-derived from the clipped x̂1, so x_t = α x̂1 + σ ε̂ still holds
    c = path.coefficients(t)
    eps = pred.epsilon(x, t)
    assert torch.allclose(c.alpha[:, None] * 3.0 + c.sigma[:, None] * eps, x)
    # unclipped predictor leaves it alone
    assert torch.allclose(Predictor(_x1_net(50.0), path, "x1").x1(x, t), torch.full_like(x, 50.0))


def test_x1_clip_is_finite_at_t_equal_one_on_the_ot_path():
    path = CondOTPath()
    net = lambda x, t, cond=None: -x  # a velocity field
    x0 = torch.randn(128, 2)
    out = build_sampler("heun", 10).sample(Predictor(net, path, x1_clip=10.0), x0).x
    ref = build_sampler("heun", 10).sample(Predictor(net, path), x0).x
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-5)  # |x̂1| stays below the bound: clipping changes nothing
