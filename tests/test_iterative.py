"""Iterative EFM (energyflow.iterative): schedules, ESS, resume, grouped conditions, and the 8-gaussians check."""
from __future__ import annotations

import math

import pytest
import torch

from energyflow.data import FunctionBatchSource
from energyflow.energies import FunctionEnergy
from energyflow.iterative import (AdaptiveSchedule, batch_ess_fraction, choose_delta_beta, draw_samples,
                                  iterative_tilt)
from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss
from energyflow.metrics import energy_distance, energy_distance_floor
from energyflow.nets import MLPField
from energyflow.paths import CondOTPath
from energyflow.samplers import build_sampler
from energyflow.trainer import Trainer
from energyflow.weights import energy_weights

TINY = {"steps": 20, "batch_size": 64, "lr": 1e-3, "ema_decay": 0.0, "device": "cpu", "log_every": 10}


def _tiny_net(seed: int = 0, **kw) -> MLPField:
    torch.manual_seed(seed)
    return MLPField(2, hidden=16, depth=1, **kw)


def test_batch_ess_fraction_matches_energy_weights():
    e = torch.randn(1000, generator=torch.Generator().manual_seed(0)).double()
    by_hand = sum(float(energy_weights(e[i:i + 100], 2.0).ess) for i in range(0, 1000, 100)) / 1000
    assert batch_ess_fraction(e, 2.0, 100) == pytest.approx(by_hand, rel=1e-9)
    assert batch_ess_fraction(e, 0.0, 100) == pytest.approx(1.0)
    assert batch_ess_fraction(e[:50], 2.0, 100) == pytest.approx(float(energy_weights(e[:50], 2.0).ess_fraction))
    grouped = float(energy_weights(e, 2.0, group_size=10).ess_fraction)
    assert batch_ess_fraction(e, 2.0, 100, group_size=10) == pytest.approx(grouped)


def test_choose_delta_beta_hits_the_target_ess():
    # Gaussian energies: the population ESS fraction at Δβ is exp(−Δβ²) for unit variance.
    e = torch.randn(200_000, generator=torch.Generator().manual_seed(1)).double()
    d = choose_delta_beta(e, 10.0, 0.5, 2000)
    assert batch_ess_fraction(e, d, 2000) == pytest.approx(0.5, abs=1e-3)
    assert d == pytest.approx(math.sqrt(math.log(2.0)), rel=0.05)
    assert choose_delta_beta(e, 0.1, 0.5, 2000) == 0.1          # the whole remaining step qualifies
    with pytest.raises(ValueError):
        choose_delta_beta(e, 0.0, 0.5, 2000)


def test_schedule_validation():
    net, energy = _tiny_net(), FunctionEnergy(lambda x: x[:, 0])
    for bad in ([], [1.0, 1.0], [2.0, 1.0], [0.0, 1.0]):
        with pytest.raises(ValueError):
            iterative_tilt(net, CondOTPath(), energy, bad, 64, (2,), trainer=TINY)
    with pytest.raises(ValueError):
        AdaptiveSchedule(1.0, min_ess_fraction=0.0)
    with pytest.raises(ValueError):
        iterative_tilt(net, CondOTPath(), energy, AdaptiveSchedule(0.5), 64, (2,), trainer=TINY, beta_start=1.0)


def test_rounds_records_input_untouched_and_resume(tmp_path):
    net = _tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    energy = FunctionEnergy(lambda x: x[:, 0])
    kwargs = dict(trainer=TINY, sampler={"name": "euler", "steps": 4}, seed=3)
    seen = []
    full = iterative_tilt(net, CondOTPath(), energy, [0.5, 1.0, 2.0], 128, (2,),
                          callback=lambda m, r: seen.append(r.round) or {"r": r.round}, **kwargs)
    assert [r.beta for r in full.records] == [0.5, 1.0, 2.0] and seen == [1, 2, 3]
    assert [r.delta_beta for r in full.records] == pytest.approx([0.5, 0.5, 1.0])
    assert all(0 < r.ess_fraction <= 1 for r in full.records) and full.records[2].metrics == {"r": 3.0}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())      # the input net is not trained

    # Two rounds, then the third in a second call on the same out_dir: the same final model.
    out = str(tmp_path / "chain")
    iterative_tilt(net, CondOTPath(), energy, [0.5, 1.0], 128, (2,), out_dir=out, **kwargs)
    resumed = iterative_tilt(net, CondOTPath(), energy, [0.5, 1.0, 2.0], 128, (2,), out_dir=out, **kwargs)
    assert [r.round for r in resumed.records] == [1, 2, 3]
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="prefix"):
        iterative_tilt(net, CondOTPath(), energy, [0.7, 1.0, 2.0], 128, (2,), out_dir=out, **kwargs)


def test_adaptive_schedule_reaches_beta_max():
    net, energy = _tiny_net(), FunctionEnergy(lambda x: x[:, 0])
    res = iterative_tilt(net, CondOTPath(), energy, AdaptiveSchedule(1.5, min_ess_fraction=0.6, max_rounds=10), 512, (2,),
                         trainer=TINY, sampler={"name": "euler", "steps": 4})
    assert res.betas[-1] == 1.5 and len(res.records) >= 2
    assert all(r.ess_fraction >= 0.6 - 1e-6 for r in res.records[:-1])
    assert all(b > a for a, b in zip(res.betas, res.betas[1:]))


def test_sample_transform_maps_the_samples_that_are_scored_and_fitted():
    """A projection onto a discrete set (here: the sign of each coordinate) is what the energy sees."""
    net = _tiny_net()
    seen = []

    def energy_fn(x):
        seen.append(x.clone())
        return x[:, 0]

    res = iterative_tilt(net, CondOTPath(), FunctionEnergy(energy_fn), [1.0], 256, (2,), trainer=TINY,
                         sampler={"name": "euler", "steps": 4}, sample_transform=torch.sign)
    assert len(seen) == 1 and set(seen[0].unique().tolist()) <= {-1.0, 0.0, 1.0}
    # the recorded mean energy is that of the projected samples, a mean of ±1 values
    assert res.records[0].mean_energy == pytest.approx(float(seen[0][:, 0].double().mean()))


def test_grouped_conditional_rounds():
    """QIPO's shape: S conditions, M samples each, weights within each group, fresh conditions per round."""
    net = _tiny_net(cond_dim=3)
    energy = FunctionEnergy(lambda x, c: (x[:, 0] - c[:, 0]).square(), takes_cond=True)
    drawn = []

    def conditions(k, g):
        c = torch.randn(8, 3, generator=g)
        drawn.append(c)
        return c

    res = iterative_tilt(net, CondOTPath(), energy, [1.0, 2.0], 8 * 4, (2,), cond=conditions, group_size=4,
                         energy_transform=lambda e: (e.view(-1, 4) - e.view(-1, 4).mean(1, keepdim=True)).reshape(-1),
                         trainer={**TINY, "batch_size": 16}, sampler={"name": "euler", "steps": 4})
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])
    assert len(res.records) == 2 and all(0.25 <= r.ess_fraction <= 1 for r in res.records)
    assert abs(res.records[0].tilted_mean_energy) < 10                 # per-group transformed energies
    with pytest.raises(ValueError, match="num_samples"):
        iterative_tilt(net, CondOTPath(), energy, [1.0], 30, (2,), cond=torch.zeros(8, 3), group_size=4, trainer=TINY)


def test_draw_samples_any_shape_and_chunking():
    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t, cond):
            return self.w * x

    smp = build_sampler("euler", 3)
    a = draw_samples(Field(), CondOTPath(), 10, (2, 3, 3), smp, torch.Generator().manual_seed(0))
    b = draw_samples(Field(), CondOTPath(), 10, (2, 3, 3), smp, torch.Generator().manual_seed(0), chunk=3)
    assert a.shape == (10, 2, 3, 3) and torch.allclose(a, b)


# -- the 8-gaussians check at a reduced budget ---------------------------------------------------------------------
@pytest.mark.slow
def test_iterative_reaches_a_tilt_one_shot_cannot():
    """8 gaussians, E(x) = x_0 / 2, β = 10: one data batch of 1024 has ESS < 1 % at β = 10, so one-shot EFM
    stays far from the exact (closed-form) target; iterative EFM from a flow-matching model of p gets much
    closer on the same budget (at least 3× closer, and within 15× the floor).

    At this reduced budget (about 1.5 min on one core) the chain's accuracy is limited by the base model's
    tails (the chain converges to model_0·exp(−βE)): measured 8.7× the floor against one-shot's 36.7×.
    The 3× bound of the issue holds at the recipe's budget (recipes/toy_iterative.yaml: 1.98× against 90.9×),
    not here; this test guards the gap between the two methods, not that bound.
    """
    from domains.toy.datasets import sample_toy
    from domains.toy.energies import LinearEnergy
    from domains.toy.iterative import data_batch_ess, exact_linear_tilt

    torch.set_num_threads(1)
    energy, beta, path = LinearEnergy([0.5, 0.0]), 10.0, CondOTPath()
    assert data_batch_ess(energy, beta, 1024)["fraction"] < 0.01
    data = FunctionBatchSource(lambda n, g: sample_toy("8gaussians", n, g))
    cfg = {"lr_schedule": "cosine", "device": "cpu", "progress": False, "tensorboard": False}
    base_cfg = {**cfg, "batch_size": 2048, "lr": 3e-3, "ema_decay": 0.995, "steps": BASE_STEPS}

    def fit(objective):  # the two models fitted on data get the same budget
        torch.manual_seed(0)
        trainer = Trainer(MLPField(2, hidden=64, depth=2), objective, data, base_cfg)
        trainer.fit()
        return trainer.ema_module.eval()

    base = fit(FlowMatchingLoss(path))
    oneshot = fit(EnergyWeightedLoss(path, beta, energy))
    chain = iterative_tilt(base, path, energy, SCHEDULE, ROUND_SAMPLES, (2,),
                           trainer={**cfg, "batch_size": 1024, "lr": 1e-3, "ema_decay": 0.99, "steps": ROUND_STEPS})

    n, g = 1000, torch.Generator().manual_seed(7)
    q = exact_linear_tilt(energy.direction, beta)
    floor = energy_distance_floor(q.sample(4000, g).float()) * 4000 / n      # (2/n)·E|X − X'|
    smp = build_sampler("heun", 50)

    def ratio(net):
        x = draw_samples(net, path, 4 * n, (2,), smp, torch.Generator().manual_seed(1))
        return sum(energy_distance(xi, q.sample(n, g).float()) for xi in x.split(n)) / 4 / floor

    r_oneshot, r_iter = ratio(oneshot), ratio(chain.net)
    print(f"iterative {r_iter:.2f}x the floor, one-shot {r_oneshot:.2f}x")
    assert all(r.ess_fraction > 0.1 for r in chain.records)           # every round is a mild tilt
    assert r_oneshot > 20, r_oneshot
    assert r_iter < ITER_BOUND and r_iter < r_oneshot / 3, (r_iter, r_oneshot)


BASE_STEPS, ROUND_STEPS, ROUND_SAMPLES, SCHEDULE, ITER_BOUND = 3000, 300, 8000, [2.5, 5.0, 7.5, 10.0], 15.0
