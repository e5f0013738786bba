"""Known-answer tests of energyflow.energies: composition, differentiability, black boxes, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from energyflow.energies import (BlackBoxEnergy, Energy, FunctionEnergy, NonFiniteEnergyError, ScaledEnergy,
                                 SumEnergy, check_energies)

D = torch.float64


def _e1(x):
    return (x**2).sum(1)


def _e2(x):
    return x[:, 0] - 3.0 * x[:, 1]


@pytest.fixture
def x():
    return torch.tensor([[1.0, 2.0], [-0.5, 0.25], [3.0, -1.0]], dtype=D)


def test_function_energy_values_and_cond(x):
    e = FunctionEnergy(_e1)
    torch.testing.assert_close(e(x), torch.tensor([5.0, 0.3125, 10.0], dtype=D))
    ec = FunctionEnergy(lambda x, c: (x * c).sum(1), takes_cond=True)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=D)
    torch.testing.assert_close(ec(x, c), torch.tensor([1.0, 0.25, 4.0], dtype=D))
    assert isinstance(e, Energy) and e.differentiable


def test_composition_values(x):
    e1, e2 = FunctionEnergy(_e1), FunctionEnergy(_e2)
    v1, v2 = _e1(x), _e2(x)
    torch.testing.assert_close((2 * e1 + e2)(x), 2 * v1 + v2, rtol=0, atol=0)
    torch.testing.assert_close((e1 * 2.0 + e2)(x), 2 * v1 + v2, rtol=0, atol=0)
    torch.testing.assert_close((-e1)(x), -v1, rtol=0, atol=0)
    torch.testing.assert_close((e1 - e2)(x), v1 - v2, rtol=0, atol=0)
    torch.testing.assert_close((e1 + e2 + -0.5 * e1)(x), 0.5 * v1 + v2, rtol=1e-15, atol=1e-15)
    assert isinstance(-e1, ScaledEnergy) and (-e1).scale == -1.0
    s = e1 + e2 + e1
    assert isinstance(s, SumEnergy) and len(s.energies) == 3  # nested sums are flattened
    with pytest.raises(TypeError):
        e1 + 3.0
    with pytest.raises(TypeError):
        e1 - 3.0


def test_composition_passes_cond_to_every_term(x):
    seen = []

    def fn(x, c):
        seen.append(c)
        return x[:, 0] * c

    c = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    e = FunctionEnergy(fn, takes_cond=True)
    out = (e - 2.0 * e)(x, c)
    torch.testing.assert_close(out, -x[:, 0] * c)
    assert len(seen) == 2 and all(s is c for s in seen)


def test_gradient_of_composition(x):
    e = 2.0 * FunctionEnergy(_e1) - FunctionEnergy(_e2)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(e(xg).sum(), xg)
    expected = 4.0 * x - torch.tensor([1.0, -3.0], dtype=D)
    torch.testing.assert_close(grad, expected)


def test_differentiable_flags_propagate():
    f = FunctionEnergy(_e1)
    nd = FunctionEnergy(_e1, differentiable=False)
    bb = BlackBoxEnergy(lambda a: (a**2).sum(1))
    assert f.differentiable and not nd.differentiable and not bb.differentiable
    assert (2.0 * f).differentiable and not (2.0 * bb).differentiable and not (-bb).differentiable
    assert (f + f).differentiable
    assert not (f + bb).differentiable and not (bb + f).differentiable
    assert not (f - bb).differentiable and not (f + nd).differentiable
    assert not SumEnergy([f, f + bb]).differentiable
    assert (3.0 * (f - 2.0 * f)).differentiable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_black_box_numpy_round_trip(dtype):
    received = {}

    def fn(a):
        received["type"], received["dtype"] = type(a), a.dtype
        return np.abs(a).sum(axis=1) + 0.5  # float64 array

    x = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=dtype, requires_grad=True)  # detached inside
    out = BlackBoxEnergy(fn)(x)
    assert received["type"] is np.ndarray and received["dtype"] == np.dtype(str(dtype).split(".")[1])
    assert out.dtype == dtype and out.device == x.device and not out.requires_grad
    torch.testing.assert_close(out, torch.tensor([3.5, 1.25], dtype=dtype))
    # A list works too, and cond is forwarded as is.
    bb = BlackBoxEnergy(lambda a, c: [float(v) * c for v in a[:, 0]], takes_cond=True)
    torch.testing.assert_close(bb(x, 2.0), torch.tensor([2.0, 1.0], dtype=dtype))
    # Composition with a torch energy gives a torch tensor of the right values.
    mixed = BlackBoxEnergy(fn) + FunctionEnergy(lambda v: v[:, 0])
    torch.testing.assert_close(mixed(x.detach()), torch.tensor([4.5, 1.75], dtype=dtype))


def test_wrong_output_shape_raises(x):
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        FunctionEnergy(lambda v: v)(x)  # [B, 2]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        FunctionEnergy(lambda v: v.sum(1, keepdim=True))(x)  # [B, 1]
    with pytest.raises(ValueError, match="one value per sample"):
        BlackBoxEnergy(lambda a: np.zeros(2))(x)
    with pytest.raises(ValueError):
        FunctionEnergy(lambda v: v.sum())(x)  # a scalar


def test_check_energies():
    e = torch.tensor([0.0, 1.0, -2.0])
    assert check_energies(e) is e  # finite values pass through untouched
    bad = torch.tensor([0.0, float("nan"), float("inf"), -float("inf"), 1.0])
    with pytest.raises(NonFiniteEnergyError) as info:
        check_energies(bad)
    assert "3 of 5" in str(info.value) and "1 NaN" in str(info.value) and "2 ±inf" in str(info.value)
    with pytest.raises(NonFiniteEnergyError, match="3 of 5 reward"):
        check_energies(bad, name="reward")
    with pytest.warns(RuntimeWarning, match="3 of 5"):
        masked = check_energies(bad, nonfinite="mask")
    torch.testing.assert_close(masked, torch.tensor([0.0, float("inf"), float("inf"), float("inf"), 1.0]))
    with pytest.raises(ValueError, match="nonfinite"):
        check_energies(e, nonfinite="drop")
