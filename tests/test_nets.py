"""The MLP networks: a time shared by the whole batch (what samplers pass) takes a fast path that
embeds it once; it must give exactly what the per-sample path gives, with or without a condition."""
import pytest
import torch

from energyflow.nets import MLPEnergyNet, MLPField


@pytest.mark.parametrize("cond_dim", [0, 5])
def test_shared_time_fast_path_matches_per_sample_embedding(cond_dim):
    torch.manual_seed(0)
    net = MLPField(3, hidden=32, depth=2, cond_dim=cond_dim)
    x = torch.randn(64, 3)
    cond = torch.randn(64, cond_dim) if cond_dim else None
    shared = net(x, torch.full((64,), 0.3), cond)
    t = torch.full((64,), 0.3)
    t[-1] = 0.7  # not shared: every row embedded on its own
    per_sample = net(x, t, cond)
    assert torch.allclose(shared[:-1], per_sample[:-1], atol=1e-6)
    assert not torch.allclose(shared[-1], per_sample[-1])
    assert shared.shape == (64, 3)


def test_energy_net_is_scalar_and_differentiable():
    net = MLPEnergyNet(2, hidden=16, depth=2, cond_dim=4)
    x = torch.randn(8, 2, requires_grad=True)
    f = net(x, torch.full((8,), 0.5), torch.randn(8, 4))
    assert f.shape == (8,)
    (grad,) = torch.autograd.grad(f.sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


@pytest.mark.parametrize("shared_time", [True, False])
def test_bound_field_equals_the_field_on_repeated_conditions(shared_time):
    """MLPField.bind(cond, M) is the field on cond.repeat_interleave(M): per-state projections once."""
    torch.manual_seed(0)
    net = MLPField(6, hidden=32, depth=3, cond_dim=5).eval()
    cond, m = torch.randn(7, 5), 4
    x = torch.randn(7 * m, 6)
    t = torch.full((7 * m,), 0.3) if shared_time else torch.rand(7 * m)
    with torch.no_grad():
        want = net(x, t, cond.repeat_interleave(m, 0))
    got = net.bind(cond, m)(x, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="28 rows"):
        net.bind(cond, m)(x[:-1], t[:-1])
    with pytest.raises(ValueError, match="conditional"):
        MLPField(6, hidden=32).bind(cond, m)
    with pytest.raises(ValueError, match="repeats"):
        net.bind(cond, 0)
