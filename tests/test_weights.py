"""Known-answer tests of energyflow.weights: w = softmax(−β E), grouped weights, ESS, non-finite energies."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from energyflow.energies import NonFiniteEnergyError
from energyflow.weights import effective_sample_size, energy_weights

D = torch.float64


def _hand_softmax(energies: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.softmax(-beta * energies.to(D), dim=0)


def test_weights_equal_hand_softmax():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(37, generator=g, dtype=D) * 3.0
    for beta in [0.1, 1.0, 2.5, 10.0]:
        w = energy_weights(e, beta)
        ref = _hand_softmax(e, beta)
        torch.testing.assert_close(w.weights, ref, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(w.log_weights, torch.log(ref), rtol=1e-12, atol=1e-12)
        assert w.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
        ess = 1.0 / ref.square().sum()
        assert w.ess.item() == pytest.approx(ess.item(), rel=1e-12)
        assert w.ess_fraction.item() == pytest.approx(ess.item() / 37, rel=1e-12)
        assert w.num_groups == 1
    # Lower energy gets the larger weight.
    w = energy_weights(torch.tensor([0.0, 1.0, 2.0], dtype=D), 1.0).weights
    assert w[0] > w[1] > w[2]
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-1), math.exp(-2)], dtype=D) / (1 + math.exp(-1) + math.exp(-2)))


def test_weights_are_exact_for_huge_energies():
    """Logits of ±1e6 (E = ±1e4, β = 100): no overflow, the closed form is recovered."""
    e = torch.tensor([1e4, 1e4 + 0.01, -1e4, -1e4 + 0.01], dtype=D)
    w = energy_weights(e, 100.0)
    assert torch.isfinite(w.weights).all() and torch.isfinite(w.log_weights[2:]).all()
    p = 1.0 / (1.0 + math.exp(-1.0))  # the two low-energy samples differ by β·0.01 = 1 in logit
    torch.testing.assert_close(w.weights, torch.tensor([0.0, 0.0, p, 1.0 - p], dtype=D), rtol=1e-9, atol=0)
    # log-weights of the high-energy samples are about −2e6, finite, not −inf
    assert w.log_weights[0].item() == pytest.approx(-2e6 - math.log1p(math.exp(-1.0)), rel=1e-12)
    assert w.ess.item() == pytest.approx(1.0 / (p * p + (1 - p) ** 2), rel=1e-9)
    # float32 energies: computed in float64 internally, returned in float32.
    e32 = torch.tensor([-1e4, -1e4 + 0.03125, 5e3], dtype=torch.float32)  # exactly representable
    w32 = energy_weights(e32, 100.0)
    assert w32.weights.dtype == torch.float32
    q = 1.0 / (1.0 + math.exp(-3.125))
    torch.testing.assert_close(w32.weights, torch.tensor([q, 1 - q, 0.0]), rtol=1e-6, atol=0)


def test_grouped_weights_equal_per_group_softmax():
    g = torch.Generator().manual_seed(1)
    groups, m, beta = 5, 8, 1.7
    e = torch.randn(groups * m, generator=g, dtype=D) * 2.0
    w = energy_weights(e, beta, group_size=m)
    assert w.num_groups == groups
    ess = []
    for k in range(groups):
        ref = _hand_softmax(e[k * m:(k + 1) * m], beta)
        torch.testing.assert_close(w.weights[k * m:(k + 1) * m], ref, rtol=1e-12, atol=1e-15)
        ess.append((1.0 / ref.square().sum()).item())
    torch.testing.assert_close(w.weights.view(groups, m).sum(1), torch.ones(groups, dtype=D), rtol=0, atol=1e-12)
    assert w.ess.item() == pytest.approx(sum(ess) / groups, rel=1e-12)
    assert w.ess_fraction.item() == pytest.approx(sum(ess) / groups / m, rel=1e-12)
    # A shift of the energies within one group leaves its weights unchanged (softmax invariance) …
    shifted = e.clone()
    shifted[:m] += 100.0
    torch.testing.assert_close(energy_weights(shifted, beta, group_size=m).weights, w.weights, rtol=1e-10, atol=1e-15)
    # … but the whole-batch weights do change.
    assert not torch.allclose(energy_weights(shifted, beta).weights, energy_weights(e, beta).weights)


def test_effective_sample_size_limits():
    b = 16
    w = energy_weights(torch.full((b,), 3.3, dtype=D), 5.0)
    torch.testing.assert_close(w.weights, torch.full((b,), 1.0 / b, dtype=D), rtol=1e-14, atol=0)
    assert w.ess.item() == pytest.approx(b, rel=1e-12)
    assert w.ess_fraction.item() == pytest.approx(1.0, rel=1e-12)
    e = torch.zeros(b, dtype=D)
    e[3] = -1.0  # one dominant sample as β grows
    prev = float(b)
    for beta in [1.0, 5.0, 20.0, 100.0]:
        ess = energy_weights(e, beta).ess.item()
        assert 1.0 <= ess < prev
        prev = ess
    assert prev == pytest.approx(1.0, abs=1e-30 + 1e-12)
    assert energy_weights(e, 100.0).ess_fraction.item() == pytest.approx(1.0 / b, rel=1e-10)
    # effective_sample_size on explicit weights
    ww = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=D)
    torch.testing.assert_close(effective_sample_size(ww), torch.tensor([2.0, 4.0], dtype=D))


def test_beta_zero_is_uniform():
    e = torch.tensor([1e3, -5.0, 0.0, 7.0], dtype=D)
    w = energy_weights(e, 0.0)
    torch.testing.assert_close(w.weights, torch.full((4,), 0.25, dtype=D), rtol=0, atol=1e-15)
    assert w.ess.item() == pytest.approx(4.0)
    wg = energy_weights(e, 0.0, group_size=2)
    torch.testing.assert_close(wg.weights, torch.full((4,), 0.5, dtype=D), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="beta"):
        energy_weights(e, -1.0)


def test_weights_do_not_carry_gradients():
    e = torch.tensor([0.5, 1.0, -0.2], dtype=D, requires_grad=True)
    w = energy_weights(e, 2.0)
    assert not w.weights.requires_grad and not w.log_weights.requires_grad


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_energies_raise_with_count(bad):
    e = torch.tensor([0.0, bad, 1.0, bad, 2.0], dtype=D)
    with pytest.raises(NonFiniteEnergyError, match="2 of 5"):
        energy_weights(e, 1.0)
    with pytest.raises(NonFiniteEnergyError, match="2 of 5"):
        energy_weights(e, 1.0, nonfinite="raise", group_size=5)
    assert issubclass(NonFiniteEnergyError, ValueError)


def test_nonfinite_energies_masked_get_zero_weight():
    e = torch.tensor([0.0, float("nan"), 1.0, float("inf"), 2.0, -float("inf")], dtype=D)
    with pytest.warns(RuntimeWarning, match="3 of 6"):
        w = energy_weights(e, 1.0, nonfinite="mask")
    finite = torch.tensor([0.0, 1.0, 2.0], dtype=D)
    ref = _hand_softmax(finite, 1.0)
    torch.testing.assert_close(w.weights[[0, 2, 4]], ref, rtol=1e-12, atol=0)
    assert (w.weights[[1, 3, 5]] == 0).all()
    assert torch.isneginf(w.log_weights[[1, 3, 5]]).all()
    assert w.ess.item() == pytest.approx((1.0 / ref.square().sum()).item(), rel=1e-12)
    # β = 0 with a masked sample: uniform over the others (no 0·inf = NaN).
    with pytest.warns(RuntimeWarning):
        w0 = energy_weights(e, 0.0, nonfinite="mask")
    torch.testing.assert_close(w0.weights, torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3, 0], dtype=D), rtol=1e-14, atol=0)
    # Grouped: the masked sample's group renormalises over its finite members.
    eg = torch.tensor([0.0, float("nan"), 1.0, 2.0], dtype=D)
    with pytest.warns(RuntimeWarning):
        wg = energy_weights(eg, 1.0, group_size=2, nonfinite="mask")
    torch.testing.assert_close(wg.weights[:2], torch.tensor([1.0, 0.0], dtype=D), rtol=0, atol=0)
    torch.testing.assert_close(wg.weights[2:], _hand_softmax(eg[2:], 1.0), rtol=1e-12, atol=0)


def test_all_masked_set_raises():
    eg = torch.tensor([0.0, 1.0, float("nan"), float("inf")], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="1 group"):
            energy_weights(eg, 1.0, group_size=2, nonfinite="mask")
        with pytest.raises(ValueError, match="masked"):
            energy_weights(torch.tensor([float("nan")] * 3, dtype=D), 1.0, nonfinite="mask")
    with pytest.raises(ValueError, match="nonfinite"):
        energy_weights(torch.zeros(3), 1.0, nonfinite="ignore")


def test_bad_shapes_and_group_sizes_raise():
    e = torch.zeros(10, dtype=D)
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        energy_weights(e, 1.0, group_size=3)
    with pytest.raises(ValueError, match="group_size=0"):
        energy_weights(e, 1.0, group_size=0)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        energy_weights(e.view(2, 5), 1.0)


@pytest.mark.parametrize("scale", [1.0, 1e6, 1e15, 1e20, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_stay_normalised_for_any_magnitude_and_ties(scale, dtype):
    """Energies up to ±1e30 and ties at the minimum: the weights sum to 1 within 1e-6, the tied
    minima share the mass equally and the ESS equals the number of ties (the exact limit)."""
    g = torch.Generator().manual_seed(1)
    for ties in (1, 2, 5):
        e = (torch.rand(64, generator=g, dtype=D) + 0.5) * scale  # all > 0.5·scale
        e[:ties] = -scale  # the minimum, tied `ties` times
        e = e[torch.randperm(64, generator=g)].to(dtype)
        for group in (None, 16):
            w = energy_weights(e, 1.0, group_size=group)
            sets = w.weights.view(-1, group or 64).to(D)
            torch.testing.assert_close(sets.sum(1), torch.ones(sets.shape[0], dtype=D), rtol=0, atol=1e-6)
            if group is None and scale == 1.0:  # no dominance: the plain softmax
                torch.testing.assert_close(w.weights.to(D), _hand_softmax(e, 1.0), rtol=1e-5, atol=1e-7)
            elif group is None:  # the tied minima dominate: they share the mass equally
                minima = e == e.min()
                torch.testing.assert_close(w.weights.to(D)[minima], torch.full((ties,), 1.0 / ties, dtype=D),
                                           rtol=0, atol=1e-6)
                assert w.ess.item() == pytest.approx(ties, rel=1e-6)
                assert w.ess_fraction.item() == pytest.approx(ties / 64, rel=1e-6)
    # all tied: uniform weights whatever the magnitude
    flat = torch.full((10,), scale, dtype=dtype)
    w = energy_weights(flat, 3.0)
    torch.testing.assert_close(w.weights.to(D), torch.full((10,), 0.1, dtype=D), rtol=0, atol=1e-7)
    assert w.ess.item() == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), -1.0])
def test_bad_beta_is_refused(beta):
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        energy_weights(torch.zeros(4), beta)
