"""Structured batches: masked (padded) sets, priors shared by losses and samplers, dict conditions
sliced by the trainer, and a Dataset-backed batch source with exactly the in-memory batches."""
from __future__ import annotations

import pytest
import torch

from energyflow.data import DatasetBatchSource, TensorBatchSource
from energyflow.energies import FunctionEnergy
from energyflow.errors import InputError
from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss, draw_noise_and_time
from energyflow.metrics import energy_distance
from energyflow.nets import MLPField, PointwiseField
from energyflow.paths import CondOTPath
from energyflow.predictor import Predictor
from energyflow.priors import CenteredGaussianPrior, GaussianPrior, expand_mask
from energyflow.sampling import initial_noise, sampler_from_config
from energyflow.trainer import Trainer, TrainerConfig

MU, SIGMA, C = torch.tensor([1.0, 0.0]), 0.5, torch.tensor([1.0, 0.0])


def _sets(n: int, n_max: int, g: torch.Generator, n_min: int = 2):
    """``n`` sets of 2-D points i.i.d. N(MU, SIGMA² I), of sizes uniform in [n_min, n_max], padded to n_max."""
    sizes = torch.randint(n_min, n_max + 1, (n,), generator=g)
    mask = (torch.arange(n_max)[None] < sizes[:, None]).float()
    x = (MU + SIGMA * torch.randn(n, n_max, 2, generator=g)) * mask[..., None]
    return {"x1": x, "mask": mask}


def _set_energy(x, mask):
    """Additive linear energy: Σ over the real points of C·x_i (its tilt of each point is a known shift)."""
    return ((x * C).sum(-1) * mask).sum(-1)


def test_padding_a_batch_changes_neither_loss_nor_weights():
    g = torch.Generator().manual_seed(0)
    batch = _sets(32, 6, g)
    x0, t = draw_noise_and_time(CondOTPath(), batch["x1"], g, mask=batch["mask"])
    padded = {"x1": torch.nn.functional.pad(batch["x1"], (0, 0, 0, 4)),
              "mask": torch.nn.functional.pad(batch["mask"], (0, 4)),
              "x0": torch.nn.functional.pad(x0, (0, 0, 0, 4)), "t": t}
    torch.manual_seed(0)
    net = PointwiseField(2, hidden=16, depth=1)
    loss = EnergyWeightedLoss(CondOTPath(), 2.0, FunctionEnergy(_set_energy, takes_mask=True))
    a = loss(net, {**batch, "x0": x0, "t": t})
    b = loss(net, padded)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-6, atol=1e-9)
    assert a.weights.shape == (32,)  # one weight per set, whatever its shape
    with pytest.raises(ValueError, match="does not take a mask"):
        EnergyWeightedLoss(CondOTPath(), 1.0, FunctionEnergy(lambda x: x.sum((1, 2))))(net, batch)


@pytest.mark.slow
def test_masked_efm_matches_the_exact_tilt_of_variable_size_sets():
    """Sets of 2..6 i.i.d. points tilted by an additive linear energy at β: each real point of q is
    exactly N(MU − β·SIGMA²·C, SIGMA² I).  EFM with masks reaches it within 2× the two-sample floor."""
    beta, n_max = 2.0, 6
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    pool = _sets(20000, n_max, g)
    data = TensorBatchSource(pool)
    net = PointwiseField(2, hidden=64, depth=2)
    loss = EnergyWeightedLoss(CondOTPath(), beta, FunctionEnergy(_set_energy, takes_mask=True))
    cfg = TrainerConfig(steps=1000, batch_size=512, lr=2e-3, ema_decay=0.99, lr_schedule="cosine", progress=False,
                        device="cpu", tensorboard=False, num_threads=1)
    trainer = Trainer(net, loss, data, cfg)
    trainer.fit()
    test = _sets(600, n_max, torch.Generator().manual_seed(2))
    x0 = initial_noise(600, (n_max, 2), seed=3, mask=test["mask"])
    x = sampler_from_config({"name": "heun", "steps": 30}).sample(
        Predictor(trainer.ema_module, CondOTPath()), x0, cond={"mask": test["mask"]}).x
    assert bool((x[test["mask"] == 0] == 0).all())  # padding stays exactly zero
    points = x[test["mask"] == 1]
    exact = lambda n, s: MU - beta * SIGMA**2 * C + SIGMA * torch.randn(n, 2, generator=torch.Generator().manual_seed(s))
    floor = sum(energy_distance(exact(len(points), 10 + i), exact(len(points), 20 + i)) for i in range(4)) / 4
    ratio = energy_distance(points, exact(len(points), 99)) / floor
    untilted = energy_distance(pool["x1"][pool["mask"] == 1][: len(points)], exact(len(points), 99)) / floor
    assert ratio < 2.0, (ratio, untilted)
    assert untilted > 10.0


def test_centered_prior_has_zero_centre_of_mass_under_a_mask_and_is_shared():
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(7)[None] < torch.tensor([[3], [7], [5]])).float()
    x = CenteredGaussianPrior().sample((3, 7, 3), generator=g, mask=mask)
    com = (x * expand_mask(mask, x)).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(com, torch.zeros(3, 3), atol=1e-6, rtol=0)
    assert bool((x[mask == 0] == 0).all()) and x[mask == 1].std() > 0.5
    # the loss's training noise and the sampler's initial noise come from the same prior and stream
    prior = CenteredGaussianPrior()
    x1 = torch.zeros(3, 7, 3)
    x0_loss, _ = draw_noise_and_time(CondOTPath(), x1, torch.Generator().manual_seed(5), prior=prior, mask=mask)
    x0_sampler = initial_noise(3, (7, 3), prior=prior, generator=torch.Generator().manual_seed(5), mask=mask)
    assert torch.equal(x0_loss, x0_sampler)
    batch = FlowMatchingLoss(CondOTPath(), prior=prior).prepare({"x1": x1, "mask": mask}, torch.Generator().manual_seed(5))
    assert torch.equal(batch["x0"], x0_loss)
    plain = GaussianPrior().sample((2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, torch.randn(2, 3, generator=torch.Generator().manual_seed(5)))


class _DictCondNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.field = MLPField(2, hidden=8, depth=1, cond_dim=3)
        self.seen: list = []

    def forward(self, x, t, cond):
        self.seen.append({k: (tuple(v.shape), v.device.type) for k, v in cond.items()})
        return self.field(x, t, torch.cat([cond["a"], cond["b"]], dim=1))


def test_trainer_slices_dict_conditions_and_refuses_other_types():
    g = torch.Generator().manual_seed(0)
    data = TensorBatchSource({"x1": torch.randn(64, 2, generator=g)})

    class WithDictCond:
        def sample(self, n, gen):
            batch = data.sample(n, gen)
            return {**batch, "cond": {"a": torch.ones(n, 1), "b": torch.zeros(n, 2)}}

    net = _DictCondNet()
    cfg = TrainerConfig(steps=2, batch_size=16, progress=False, device="cpu", tensorboard=False)
    Trainer(net, FlowMatchingLoss(CondOTPath()), WithDictCond(), cfg).fit()
    assert net.seen[0] == {"a": ((16, 1), "cpu"), "b": ((16, 2), "cpu")}

    class WithListCond:
        def sample(self, n, gen):
            return {**data.sample(n, gen), "cond": [1, 2, 3]}

    with pytest.raises(InputError, match="batch entry 'cond' is a list"):
        Trainer(MLPField(2, hidden=8, depth=1), FlowMatchingLoss(CondOTPath()), WithListCond(), cfg).fit()


class _Items(torch.utils.data.Dataset):
    def __init__(self, x, c):
        self.x, self.c = x, c

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x1": self.x[i], "cond": self.c[i]}


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_batch_source_gives_the_in_memory_batches(workers):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(500, 2, generator=g), torch.randn(500, 3, generator=g)
    memory = TensorBatchSource({"x1": x, "cond": c})
    loaded = DatasetBatchSource(_Items(x, c), num_workers=workers)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for size in (64, 33, 64):
        a, b = memory.sample(size, g1), loaded.sample(size, g2)
        assert torch.equal(a["x1"], b["x1"]) and torch.equal(a["cond"], b["cond"])
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws: resume and DDP stay exact


def test_tilted_resampling_draws_items_in_proportion_to_the_tilt():
    from energyflow.data import TiltedResamplingSource

    x = torch.arange(4.0)[:, None]
    energies = torch.tensor([0.0, 1.0, 2.0, 0.0])
    source = TiltedResamplingSource({"x1": x}, energies, beta=1.5)
    expected = torch.softmax(-1.5 * energies.double(), 0)
    batch = source.sample(200_000, torch.Generator().manual_seed(0))["x1"][:, 0].long()
    freq = torch.bincount(batch, minlength=4).double() / batch.numel()
    assert torch.allclose(freq, expected, atol=0.005)
    assert source.dataset_ess == pytest.approx(float(1.0 / expected.square().sum()), rel=1e-9)
    again = source.sample(64, torch.Generator().manual_seed(3))["x1"]
    assert torch.equal(again, source.sample(64, torch.Generator().manual_seed(3))["x1"])  # seeded
    with pytest.raises(ValueError, match="energies must have shape"):
        TiltedResamplingSource({"x1": x}, torch.zeros(3), beta=1.0)
