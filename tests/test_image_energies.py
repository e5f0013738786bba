"""domains/image: the classifier and JPEG-size energies, and the offline evaluators."""
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("PIL")
pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

from PIL import Image

from domains.image.energies import ClassifierEnergy, JPEGSizeEnergy
from domains.image.evaluate import (
    beta_sweep_figure,
    classifier_features,
    diversity,
    frechet_distance,
    target_rate,
)
from energyflow.guidance import EnergyGuidedPredictor
from energyflow.paths import CondOTPath
from energyflow.predictor import Predictor


class TinyClassifier(nn.Module):
    """A stand-in with the classifier interface: features = the flattened image through a linear map,
    logits = a linear map of the features."""

    def __init__(self, pixels: int = 16, num_features: int = 4, num_classes: int = 3):
        super().__init__()
        self.num_features = num_features
        self.embed = nn.Linear(pixels, num_features)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x):
        return self.embed(x.flatten(1))

    def forward(self, x):
        return self.head(self.features(x))


class LinearLogits(nn.Module):
    """logits = W · flatten(x) + b with W, b given (a known classifier for hand computations)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.num_features = weight.shape[1]
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(weight))
            self.linear.bias.copy_(torch.tensor(bias))

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.linear(x.flatten(1))


def _hand_energy(weight, bias, x, targets, temperature=1.0):
    """-log Σ_{k∈S} softmax(z)_k in float64 numpy."""
    z = (x.reshape(len(x), -1).astype(np.float64) @ weight.T.astype(np.float64) + bias) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return -np.log(p[:, list(targets)].sum(axis=1))


@pytest.fixture
def known():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 4)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    x = rng.uniform(-1, 1, size=(7, 1, 2, 2)).astype(np.float32)
    return weight, bias, x


# -- ClassifierEnergy --------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [2, [0, 3], (1, 2, 4)])
def test_classifier_energy_matches_hand_computation(known, targets):
    weight, bias, x = known
    energy = ClassifierEnergy(LinearLogits(weight, bias), targets)
    got = energy(torch.tensor(x)).detach().numpy()
    expected = _hand_energy(weight, bias, x, [targets] if isinstance(targets, int) else targets)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()


def test_classifier_energy_all_classes_is_zero(known):
    weight, bias, x = known
    got = ClassifierEnergy(LinearLogits(weight, bias), range(5))(torch.tensor(x))
    assert torch.allclose(got, torch.zeros(7), atol=1e-6)


def test_classifier_energy_temperature(known):
    weight, bias, x = known
    energy = ClassifierEnergy(LinearLogits(weight, bias), [1, 3], temperature=2.5)
    np.testing.assert_allclose(energy(torch.tensor(x)).detach().numpy(),
                               _hand_energy(weight, bias, x, [1, 3], temperature=2.5), rtol=1e-5, atol=1e-6)
    assert "temperature=2.5" in repr(energy) and "[1, 3]" in repr(energy)


def test_classifier_energy_differentiable(known):
    weight, bias, x = known
    energy = ClassifierEnergy(LinearLogits(weight, bias), 0)
    assert energy.differentiable
    xt = torch.tensor(x, requires_grad=True)
    (grad,) = torch.autograd.grad(energy(xt).sum(), xt)
    assert grad.shape == xt.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_classifier_energy_restores_training_mode(known):
    weight, bias, x = known
    classifier = LinearLogits(weight, bias).train()
    ClassifierEnergy(classifier, 0)(torch.tensor(x))
    assert classifier.training


@pytest.mark.parametrize("targets, words", [([], "empty"), ([1, 1], "[1]"), ([-1], "-1"), ([0.5], "0.5"),
                                            ([True], "True")])
def test_classifier_energy_bad_targets(known, targets, words):
    weight, bias, _ = known
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ClassifierEnergy(LinearLogits(weight, bias), targets)


def test_classifier_energy_out_of_range_targets_named_at_first_call(known):
    weight, bias, x = known
    energy = ClassifierEnergy(LinearLogits(weight, bias), [2, 5, 7])
    with pytest.raises(ValueError, match=r"\[5, 7\].*5 classes"):
        energy(torch.tensor(x))


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "hot"])
def test_classifier_energy_bad_temperature(known, temperature):
    weight, bias, _ = known
    with pytest.raises(ValueError, match="temperature"):
        ClassifierEnergy(LinearLogits(weight, bias), 0, temperature=temperature)


# -- JPEGSizeEnergy -----------------------------------------------------------------------------------
def test_jpeg_constant_smaller_than_noise():
    torch.manual_seed(0)
    constant = torch.zeros(1, 1, 8, 8)
    noise = torch.rand(1, 1, 8, 8) * 2 - 1
    energy = JPEGSizeEnergy(upscale=4)
    assert energy(constant).item() < energy(noise).item()
    rgb = JPEGSizeEnergy(quality=90)
    assert rgb(torch.zeros(1, 3, 16, 16)).item() < rgb(torch.rand(1, 3, 16, 16) * 2 - 1).item()


def test_jpeg_size_is_the_pillow_size_in_units():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    got = JPEGSizeEnergy(quality=60, unit=10.0, upscale=2)(x)
    for image, value in zip(x, got):
        pixels = torch.round((image[0] + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
        big = Image.fromarray(pixels).resize((16, 16), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=60, optimize=False)
        assert value.item() == pytest.approx(len(buffer.getvalue()) / 10.0)


def test_jpeg_deterministic_threaded_equals_sequential_shape_and_type():
    torch.manual_seed(0)
    x = torch.rand(100, 1, 8, 8, dtype=torch.float64) * 2 - 1
    energy = JPEGSizeEnergy(upscale=4, workers=4)
    first = energy(x)
    assert first.shape == (100,) and first.dtype == torch.float64
    assert torch.equal(first, energy(x))                                              # deterministic
    assert torch.equal(first, JPEGSizeEnergy(upscale=4, workers=1)(x))                # threaded == sequential
    assert torch.equal(first, torch.cat([energy(x[:50]), energy(x[50:])]))             # batches below 64: sequential
    assert not energy.differentiable
    assert repr(energy) == "JPEGSizeEnergy(quality=75, unit=1, upscale=4)"


@pytest.mark.parametrize("kwargs, word", [({"quality": 0}, "quality"), ({"unit": 0}, "unit"),
                                          ({"upscale": 1.5}, "upscale"), ({"workers": 0}, "workers")])
def test_jpeg_bad_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        JPEGSizeEnergy(**kwargs)


def test_jpeg_bad_channels():
    with pytest.raises(ValueError, match="C = 1"):
        JPEGSizeEnergy()(torch.zeros(2, 2, 8, 8))


def test_gradient_guidance_refuses_jpeg_energy():
    base = Predictor(lambda x, t, c: torch.zeros_like(x), CondOTPath())
    with pytest.raises(TypeError):
        EnergyGuidedPredictor(base, JPEGSizeEnergy(), beta=1.0)


# -- evaluators ---------------------------------------------------------------------------------------
def test_target_rate_and_features():
    # logits = [x_0, -x_0, 0] of the first pixel: class 0 when it is positive, class 1 when negative
    weight = np.zeros((3, 4), dtype=np.float32)
    weight[0, 0], weight[1, 0] = 1.0, -1.0
    classifier = LinearLogits(weight, np.zeros(3, dtype=np.float32))
    x = torch.zeros(10, 1, 2, 2)
    x[:7, 0, 0, 0] = 0.5
    x[7:, 0, 0, 0] = -0.5
    assert target_rate(classifier, x, 0, batch_size=3) == pytest.approx(0.7)
    assert target_rate(classifier, x, [0, 1], batch_size=4) == 1.0
    assert target_rate(classifier, x, [2]) == 0.0
    with pytest.raises(ValueError, match=r"\[4\]"):
        target_rate(classifier, x, [0, 4])
    features = classifier_features(classifier, x, batch_size=3)
    assert torch.equal(features, x.flatten(1))


def _frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance():
    torch.manual_seed(0)
    classifier = TinyClassifier()
    real = torch.rand(300, 1, 4, 4) * 2 - 1
    fake = (torch.rand(200, 1, 4, 4) * 1.5 - 0.5).clamp(-1, 1)
    got = frechet_distance(classifier, real, fake, batch_size=64)
    expected = _frechet_numpy(classifier_features(classifier, real).double().numpy(),
                              classifier_features(classifier, fake).double().numpy())
    assert got == pytest.approx(expected, rel=1e-3)
    same = frechet_distance(classifier, real, real.clone(), batch_size=128)
    assert abs(same) < 1e-3 * got
    assert got > 1e-2
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(classifier, real, fake[:1])


def test_diversity():
    torch.manual_seed(0)
    classifier = TinyClassifier()
    same = torch.rand(1, 1, 4, 4).repeat(50, 1, 1, 1)
    assert diversity(classifier, same) == 0.0
    x = torch.rand(30, 1, 4, 4) * 2 - 1
    features = classifier_features(classifier, x).double()
    pairs = [torch.dist(features[i], features[j]).item() for i in range(30) for j in range(i + 1, 30)]
    assert diversity(classifier, x, batch_size=7) == pytest.approx(np.mean(pairs), rel=1e-9)


def test_beta_sweep_figure(tmp_path):
    rows = [{"method": m, "beta": b, "target_rate": 1 - 1 / (1 + b + i), "frechet": b * (i + 1)}
            for i, m in enumerate(["efm_ot", "guidance"]) for b in (1.0, 3.0, 10.0)]
    path = beta_sweep_figure(rows, tmp_path / "sweep.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size[0] > picture.size[1]           # two panels side by side
    with pytest.raises(ValueError, match="no row has"):
        beta_sweep_figure(rows, tmp_path / "none.png", metrics=("jpeg_size",))
