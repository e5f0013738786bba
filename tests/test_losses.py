"""Known-answer tests of energyflow.losses: flow matching, energy-weighted (EFM), grouped, and CEP."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from energyflow.energies import BlackBoxEnergy, FunctionEnergy, NonFiniteEnergyError
from energyflow.losses import (ContrastiveEnergyLoss, EnergyWeightedLoss, FlowMatchingLoss, draw_noise_and_time,
                               energy_weighted_diffusion, energy_weighted_flow_matching)
from energyflow.paths import CondOTPath, VPPath

D = torch.float64
B, DIM = 12, 3


class _Net(nn.Module):
    """A small deterministic network net(x, t, cond) -> like x."""

    def __init__(self, dim: int = DIM, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim + 1, dim).double()

    def forward(self, x, t, cond=None):
        return self.lin(torch.cat([x, t[:, None]], dim=1))


def _batch(seed: int = 0, b: int = B):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, DIM, generator=g, dtype=D) * 2.0 + 1.0
    x0 = torch.randn(b, DIM, generator=g, dtype=D)
    t = torch.rand(b, generator=g, dtype=D)
    return {"x1": x1, "x0": x0, "t": t}


def _vp_alpha_sigma(t):
    s = 1.0 - t
    alpha = torch.exp(-0.5 * (0.1 * s + 0.5 * (20.0 - 0.1) * s * s))
    return alpha, torch.sqrt(1.0 - alpha**2)


def _hand_per_sample(net, batch, path_name: str, prediction: str):
    x1, x0, t = batch["x1"], batch["x0"], batch["t"]
    if path_name == "ot":
        a, s = t, 1.0 - t
    else:
        a, s = _vp_alpha_sigma(t)
    xt = a[:, None] * x1 + s[:, None] * x0
    target = {"velocity": (x1 - x0) if path_name == "ot" else None, "epsilon": x0, "x1": x1,
              "score": -x0 / s[:, None]}[prediction]
    return ((net(xt, t) - target) ** 2).mean(1)


def _energy(x):
    return (x - 0.5).square().sum(1) * 0.3


# ------------------------------------------------------------------------------- flow matching
@pytest.mark.parametrize("path_name,prediction", [("ot", "velocity"), ("ot", "x1"), ("vp", "epsilon"), ("vp", "score")])
def test_flow_matching_loss_equals_hand_mse(path_name, prediction):
    path = CondOTPath() if path_name == "ot" else VPPath()
    net, batch = _Net(), _batch()
    out = FlowMatchingLoss(path, prediction)(net, batch)
    per = _hand_per_sample(net, batch, path_name, prediction)
    torch.testing.assert_close(out.per_sample, per, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, per.mean(), rtol=1e-12, atol=1e-12)
    assert out.weights is None and out.metrics["loss"] == pytest.approx(per.mean().item(), rel=1e-12)
    assert FlowMatchingLoss(path).prediction == ("velocity" if path_name == "ot" else "epsilon")


def test_flow_matching_event_shape_and_default_target():
    """Per-sample losses average over all non-batch dimensions; the default OT target is x1 − x0."""
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(4, 2, 3, generator=g, dtype=D), torch.randn(4, 2, 3, generator=g, dtype=D)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=D)
    net = lambda x, t, cond=None: 0.5 * x  # noqa: E731
    out = FlowMatchingLoss(CondOTPath())(net, {"x1": x1, "x0": x0, "t": t})
    xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
    per = ((0.5 * xt - (x1 - x0)) ** 2).mean((1, 2))
    torch.testing.assert_close(out.per_sample, per, rtol=1e-13, atol=1e-13)


def test_flow_matching_draws_noise_and_time_from_generator():
    path = VPPath("cosine")
    net, x1 = _Net(), _batch()["x1"]
    out = FlowMatchingLoss(path)(net, {"x1": x1}, generator=torch.Generator().manual_seed(7))
    x0, t = draw_noise_and_time(path, x1, torch.Generator().manual_seed(7))
    assert (t >= path.t_min).all() and (t <= path.t_max).all()
    ref = FlowMatchingLoss(path)(net, {"x1": x1, "x0": x0, "t": t})
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    # Grouped draws share one t per group.
    _, tg = draw_noise_and_time(path, x1, torch.Generator().manual_seed(7), group_size=4)
    assert tg.shape == (B,) and (tg.view(3, 4) == tg.view(3, 4)[:, :1]).all()
    assert len(set(tg.tolist())) == 3


# ---------------------------------------------------------------------------- energy weighted
def test_energy_weighted_loss_whole_batch():
    net, batch = _Net(), _batch()
    beta = 1.3
    out = EnergyWeightedLoss(CondOTPath(), beta, FunctionEnergy(_energy))(net, batch)
    per = _hand_per_sample(net, batch, "ot", "velocity")
    w = torch.softmax(-beta * _energy(batch["x1"]), 0)
    torch.testing.assert_close(out.weights, w, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.per_sample, per, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, (w * per).sum(), rtol=1e-12, atol=1e-12)
    ess = 1.0 / w.square().sum().item()
    assert set(out.metrics) >= {"loss", "ess", "ess_fraction"}
    assert out.metrics["loss"] == pytest.approx((w * per).sum().item(), rel=1e-12)
    assert out.metrics["ess"] == pytest.approx(ess, rel=1e-12)
    assert out.metrics["ess_fraction"] == pytest.approx(ess / B, rel=1e-12)
    assert 1.0 < ess < B  # a genuine tilt, not a uniform or one-hot batch
    # The weighted loss differs from the plain mean (the test would not see a dropped weighting).
    assert abs(out.loss.item() - per.mean().item()) > 1e-3


def test_energy_weighted_loss_grouped():
    net, batch = _Net(), _batch()
    beta, m = 0.8, 4
    g = B // m
    out = EnergyWeightedLoss(VPPath(), beta, FunctionEnergy(_energy), group_size=m)(net, batch)
    per = _hand_per_sample(net, batch, "vp", "epsilon")
    w = torch.softmax(-beta * _energy(batch["x1"]).view(g, m), 1)
    torch.testing.assert_close(out.weights, w.reshape(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss, (w * per.view(g, m)).sum() / g, rtol=1e-12, atol=1e-12)
    ess = (1.0 / w.square().sum(1)).mean().item()
    assert out.metrics["ess"] == pytest.approx(ess, rel=1e-12)
    assert out.metrics["ess_fraction"] == pytest.approx(ess / m, rel=1e-12)


def test_grouped_loss_draws_one_time_per_group():
    seen = {}

    def rec(x, t, cond=None):
        seen["t"] = t
        return x

    x1 = _batch()["x1"]
    EnergyWeightedLoss(CondOTPath(), 1.0, FunctionEnergy(_energy), group_size=4)(
        rec, {"x1": x1}, generator=torch.Generator().manual_seed(0))
    t = seen["t"].view(3, 4)
    assert (t == t[:, :1]).all() and len(set(t[:, 0].tolist())) == 3


@pytest.mark.parametrize("group_size", [None, 3])
def test_beta_zero_is_plain_loss(group_size):
    net, batch = _Net(), _batch()
    for path in (CondOTPath(), VPPath()):
        out = EnergyWeightedLoss(path, 0.0, FunctionEnergy(_energy), group_size=group_size)(net, batch)
        plain = FlowMatchingLoss(path)(net, batch)
        torch.testing.assert_close(out.loss, plain.loss, rtol=1e-12, atol=1e-14)
        assert out.metrics["ess_fraction"] == pytest.approx(1.0)


def test_batch_energy_overrides_the_energy_callable():
    def boom(x):
        raise AssertionError("the energy callable must not be called when the batch has energies")

    net, batch = _Net(), _batch()
    e = torch.linspace(-1.0, 1.0, B, dtype=D)
    batch["energy"] = e
    out = EnergyWeightedLoss(CondOTPath(), 2.0, FunctionEnergy(boom))(net, batch)
    w = torch.softmax(-2.0 * e, 0)
    torch.testing.assert_close(out.weights, w, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss, (w * _hand_per_sample(net, batch, "ot", "velocity")).sum(), rtol=1e-12, atol=0)
    del batch["energy"]
    with pytest.raises(ValueError, match="energy"):
        EnergyWeightedLoss(CondOTPath(), 2.0)(net, batch)


def test_black_box_energy_in_loss():
    calls = []

    def np_energy(a):
        calls.append(type(a))
        return 0.3 * ((a - 0.5) ** 2).sum(1)

    net, batch = _Net(), _batch()
    loss = EnergyWeightedLoss(CondOTPath(), 1.3, BlackBoxEnergy(np_energy))
    out = loss(net, batch)
    ref = EnergyWeightedLoss(CondOTPath(), 1.3, FunctionEnergy(_energy))(net, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    assert calls == [np.ndarray]
    out.loss.backward()  # no gradient is ever taken through the black box
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_gradient_is_that_of_the_weighted_sum_with_detached_weights():
    beta = 1.7
    batch = _batch(3)
    energies = _energy(batch["x1"]).clone().requires_grad_(True)  # must not receive a gradient
    batch["energy"] = energies
    net = _Net(seed=1)
    EnergyWeightedLoss(CondOTPath(), beta)(net, batch).loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    assert energies.grad is None

    ref_net = _Net(seed=1)
    w = torch.softmax(-beta * energies.detach(), 0)
    (w * _hand_per_sample(ref_net, batch, "ot", "velocity")).sum().backward()
    for g, p in zip(grads, ref_net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-14)
    # and it differs from the unweighted gradient
    plain_net = _Net(seed=1)
    FlowMatchingLoss(CondOTPath())(plain_net, batch).loss.backward()
    assert not torch.allclose(grads[0], next(plain_net.parameters()).grad)


def test_constructors():
    fm = energy_weighted_flow_matching(2.0, FunctionEnergy(_energy), group_size=4)
    assert isinstance(fm.path, CondOTPath) and fm.prediction == "velocity" and fm.beta == 2.0 and fm.group_size == 4
    dm = energy_weighted_diffusion(0.5, schedule="cosine")
    assert isinstance(dm.path, VPPath) and dm.path.schedule == "cosine" and dm.prediction == "epsilon"


def test_nonfinite_energies_in_loss():
    net, batch = _Net(), _batch()
    e = torch.zeros(B, dtype=D)
    e[2] = float("nan")
    batch["energy"] = e
    with pytest.raises(NonFiniteEnergyError, match="1 of 12"):
        EnergyWeightedLoss(CondOTPath(), 1.0)(net, batch)
    with pytest.warns(RuntimeWarning):
        out = EnergyWeightedLoss(CondOTPath(), 1.0, nonfinite="mask")(net, batch)
    per = _hand_per_sample(net, batch, "ot", "velocity")
    keep = torch.ones(B, dtype=torch.bool)
    keep[2] = False
    assert out.weights[2] == 0
    torch.testing.assert_close(out.loss, per[keep].mean(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------ CEP
def _entropy(w):
    return -(w * torch.log(w)).sum(1)


def test_contrastive_energy_loss_minimum_is_target_entropy():
    g_count, m, beta = 3, 5, 1.5
    batch = _batch(4, b=g_count * m)
    batch["t"] = torch.tensor([0.2, 0.5, 0.8], dtype=D).repeat_interleave(m)
    energy = FunctionEnergy(_energy)
    x1 = batch["x1"]
    w = torch.softmax(-beta * _energy(x1).view(g_count, m), 1)
    seen = {}

    def cheat(xt, t, cond=None):  # knows the clean data: outputs exactly −β E(x1), ignoring t
        seen["xt"], seen["t"] = xt, t
        return -beta * _energy(x1)

    loss = ContrastiveEnergyLoss(CondOTPath(), beta, m, energy)
    out = loss(cheat, batch)
    torch.testing.assert_close(out.loss, _entropy(w).mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.weights, w.reshape(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.per_sample, _entropy(w).repeat_interleave(m), rtol=1e-12, atol=1e-14)
    # The network saw x_t of the pre-drawn noise and times.
    xt = (1 - batch["t"])[:, None] * batch["x0"] + batch["t"][:, None] * x1
    torch.testing.assert_close(seen["xt"], xt, rtol=0, atol=1e-15)
    assert seen["t"] is batch["t"]
    # A per-group constant shift changes nothing (softmax) …
    shift = torch.tensor([3.0, -1.0, 10.0], dtype=D).repeat_interleave(m)
    out_shift = loss(lambda xt, t, c=None: -beta * _energy(x1) + shift, batch)
    torch.testing.assert_close(out_shift.loss, out.loss, rtol=1e-12, atol=1e-14)
    # … and any other logits give a strictly higher loss (cross-entropy > entropy, Gibbs).
    g = torch.Generator().manual_seed(5)
    for k in range(5):
        noise = torch.randn(g_count * m, generator=g, dtype=D) * (0.1 * (k + 1))
        other = loss(lambda xt, t, c=None: -beta * _energy(x1) + noise, batch).loss
        assert other.item() > out.loss.item() + 1e-6
    other = loss(lambda xt, t, c=None: torch.zeros(g_count * m, dtype=D), batch).loss  # uniform logits
    torch.testing.assert_close(other, torch.tensor(math.log(m), dtype=D), rtol=1e-12, atol=0)
    # Batch energies override the energy callable.
    b2 = dict(batch, energy=-_energy(x1))
    w2 = torch.softmax(beta * _energy(x1).view(g_count, m), 1)
    torch.testing.assert_close(loss(cheat, b2).weights, w2.reshape(-1), rtol=1e-12, atol=1e-15)


def test_contrastive_energy_loss_gradient():
    """∂L/∂logits = (softmax(logits) − w) / G within each group."""
    g_count, m, beta = 2, 4, 0.7
    batch = _batch(6, b=g_count * m)
    logits = torch.randn(g_count * m, generator=torch.Generator().manual_seed(8), dtype=D, requires_grad=True)
    out = ContrastiveEnergyLoss(VPPath(), beta, m, FunctionEnergy(_energy))(lambda xt, t, c=None: logits * 1.0, batch)
    out.loss.backward()
    w = torch.softmax(-beta * _energy(batch["x1"]).view(g_count, m), 1)
    expected = (torch.softmax(logits.detach().view(g_count, m), 1) - w) / g_count
    torch.testing.assert_close(logits.grad, expected.reshape(-1), rtol=1e-12, atol=1e-15)
    # Without pre-drawn times, the members of one group share t.
    seen = {}

    def rec(xt, t, c=None):
        seen["t"] = t
        return xt.sum(1)

    ContrastiveEnergyLoss(VPPath(), beta, m, FunctionEnergy(_energy))(rec, {"x1": batch["x1"]},
                                                                        generator=torch.Generator().manual_seed(0))
    assert (seen["t"].view(g_count, m) == seen["t"].view(g_count, m)[:, :1]).all()


def test_grouped_loss_draws_one_time_per_group_or_per_sample():
    from energyflow.losses import EnergyWeightedLoss
    from energyflow.paths import CondOTPath

    batch = {"x1": torch.randn(12, 2), "energy": torch.randn(12)}
    g = torch.Generator().manual_seed(0)
    t_group = EnergyWeightedLoss(CondOTPath(), 1.0, group_size=4).prepare(batch, g)["t"].view(3, 4)
    assert torch.equal(t_group, t_group[:, :1].expand(3, 4))
    t_each = EnergyWeightedLoss(CondOTPath(), 1.0, group_size=4, group_time=False).prepare(batch, g)["t"]
    assert len(set(t_each.tolist())) == 12


def test_one_step_distillation_learns_the_teachers_flow_map():
    """Known answer: the teacher's map is affine, x1 = A x0 + b (N(0, I) → N(b, AAᵀ)); the one-step
    student x0 + net(x0, 0) must reproduce it on fresh noise, so its samples have the teacher's law."""
    from energyflow.data import TensorBatchSource
    from energyflow.losses import OneStepDistillationLoss
    from energyflow.nets import MLPField
    from energyflow.trainer import Trainer, TrainerConfig

    torch.manual_seed(0)
    A, b = torch.tensor([[2.0, 0.5], [0.0, 0.5]]), torch.tensor([1.0, -1.0])
    teacher = lambda x0, cond: x0 @ A.T + b  # noqa: E731
    net = MLPField(2, hidden=64, depth=2)
    source = TensorBatchSource({"x1": torch.zeros(4096, 2)})
    Trainer(net, OneStepDistillationLoss(teacher), source,
            TrainerConfig(steps=1500, batch_size=256, lr=2e-3, ema_decay=0.0, progress=False, device="cpu",
                          log_every=10**9, checkpoint_every=0)).fit()
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x1 = x0 + net(x0, torch.zeros(4000))
    err = (x1 - teacher(x0, None)).norm(dim=1).mean()
    assert err < 0.05, err
    torch.testing.assert_close(torch.cov(x1.T), A @ A.T, atol=0.1, rtol=0.05)


def test_one_hot_cross_entropy_values_and_minimiser():
    from energyflow.losses import OneHotCrossEntropy

    scale = 2.0
    err = OneHotCrossEntropy(scale)
    p = torch.tensor([[0.7, 0.2, 0.1]])
    onehot = torch.tensor([[0.0, 1.0, 0.0]])
    e = err(scale * (2 * p - 1), scale * (2 * onehot - 1))
    assert torch.allclose(e.sum(-1), -torch.log(torch.tensor([0.2])), atol=1e-6)
    # the expected error over one-hot targets drawn from q is minimised by the prediction p = q (a Bregman
    # divergence, like the squared error): gradient descent on the logits reaches q
    q = torch.tensor([0.5, 0.3, 0.2])
    targets = scale * (2 * torch.eye(3) - 1)
    logits = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(500):
        pred = scale * (2 * torch.softmax(logits, -1) - 1)
        loss = (q[:, None] * err(pred.expand(3, 3), targets)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(torch.softmax(logits, -1), q, atol=1e-3)
    # and FlowMatchingLoss uses it in place of the squared error
    net = lambda x, t, c=None: torch.zeros_like(x)  # noqa: E731 - predicts p uniform-ish (x̂1 = 0 → p = 1/2)
    loss = FlowMatchingLoss(CondOTPath(), prediction="x1", error=err)
    batch = {"x1": targets[:2].unsqueeze(1)}
    out = loss(net, batch, torch.Generator().manual_seed(0))
    assert torch.allclose(out.loss, -torch.log(torch.tensor(0.5)) / 3, atol=1e-5)
