"""Offline evaluation of image samples with a trained classifier (no internet, no Inception weights).

Images are float tensors ``[N, C, H, W]`` in ``[-1, 1]``.  A classifier is a module with
``forward(x) -> logits [B, K]``, ``features(x) -> [B, F]`` and an int attribute ``num_features``;
every function runs it in eval mode without gradients, in batches, on the device of its parameters,
and restores its previous mode.

* :func:`target_rate` — the fraction of images classified into a set of target classes;
* :func:`frechet_distance` — torchmetrics' Fréchet distance with the classifier's features in place
  of Inception's (works for any number of channels);
* :func:`diversity` — the mean pairwise distance of the classifier's features;
* :func:`beta_sweep_figure` — the β-sweep figure, written atomically (image grids: :func:`energyflow.figures.save_image_grid`).

torchvision, torchmetrics, Pillow and matplotlib are imported only inside the functions that need them.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from energyflow.errors import InputError
from energyflow.files import atomic_open

from .energies import _check_targets

__all__ = ["target_rate", "classifier_features", "frechet_distance", "diversity", "beta_sweep_figure",
           "MAX_DIVERSITY_IMAGES"]

MAX_DIVERSITY_IMAGES = 2000
""":func:`diversity` uses at most this many images (the first ones): the distance matrix is N×N."""


def _check_images(images: Tensor, what: str = "images", min_count: int = 1) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{what} must be a tensor [N, C, H, W] of images in [-1, 1], got {shape}")
    if images.shape[0] < min_count:
        raise InputError(f"{what}: need at least {min_count} image(s), got {images.shape[0]}")
    return images


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _evaluating(classifier: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no gradients; yields the classifier's device and restores its mode."""
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            yield _device(classifier)
    finally:
        classifier.train(was_training)


def _batches(images: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size].to(device)


def target_rate(classifier: nn.Module, images: Tensor, targets: Sequence[int] | int, batch_size: int = 1000) -> float:
    """The fraction of ``images`` whose most likely class (argmax of the logits) is in ``targets``."""
    images = _check_images(images)
    targets = _check_targets(targets)
    batch_size = _check_batch_size(batch_size)
    hits = 0
    with _evaluating(classifier) as device:
        wanted = torch.tensor(targets, device=device)
        for batch in _batches(images, batch_size, device):
            logits = classifier(batch)
            bad = [t for t in targets if t >= logits.shape[1]]
            if bad:
                raise InputError(f"target class(es) {bad} out of range: the classifier has {logits.shape[1]} classes")
            hits += int(torch.isin(logits.argmax(dim=1), wanted).sum())
    return hits / images.shape[0]


def classifier_features(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """``classifier.features`` of ``images``, ``[N, F]`` on the CPU (no gradients, batched)."""
    images = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    with _evaluating(classifier) as device:
        return torch.cat([classifier.features(batch).cpu() for batch in _batches(images, batch_size, device)])


class _Features(nn.Module):
    """torchmetrics' feature-extractor interface around a classifier: images in ``[0, 1]``
    (``normalize=True``) are mapped back to ``[-1, 1]`` and given to ``classifier.features``."""

    def __init__(self, classifier: nn.Module, num_features: int):
        super().__init__()
        self.classifier = classifier
        self.num_features = int(num_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images * 2.0 - 1.0).to(torch.float64)


def frechet_distance(classifier: nn.Module, real: Tensor, fake: Tensor, batch_size: int = 1000) -> float:
    """The Fréchet distance between Gaussians fitted to ``classifier.features`` of ``real`` and ``fake``:
    ``‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½)`` (FID with the classifier in place of Inception).

    Computed by ``torchmetrics.image.fid.FrechetInceptionDistance`` with the classifier as its feature
    extractor; each set needs at least 2 images, and both the same image shape.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = _check_images(real, "real images", min_count=2)
    fake = _check_images(fake, "fake images", min_count=2)
    if real.shape[1:] != fake.shape[1:]:
        raise InputError(f"real and fake images differ in shape: {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}")
    batch_size = _check_batch_size(batch_size)
    num_features = getattr(classifier, "num_features", None)
    if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features < 1:
        raise InputError(f"the classifier needs an int attribute num_features (its feature size), got {num_features!r}")
    with _evaluating(classifier) as device:
        metric = FrechetInceptionDistance(feature=_Features(classifier, num_features), normalize=True,
                                          reset_real_features=True).to(device)
        for images, is_real in ((real, True), (fake, False)):
            for batch in _batches(images, batch_size, device):
                metric.update((batch + 1.0) / 2.0, real=is_real)
        return float(metric.compute())


def diversity(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> float:
    """The mean Euclidean distance between the classifier features of all pairs of images
    (the first :data:`MAX_DIVERSITY_IMAGES`; at least 2 are needed)."""
    images = _check_images(images, min_count=2)[:MAX_DIVERSITY_IMAGES]
    features = classifier_features(classifier, images, batch_size).to(torch.float64)
    # the direct difference, not the |a|² + |b|² − 2ab shortcut: identical images are exactly 0 apart
    distances = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    i, j = torch.triu_indices(len(features), len(features), offset=1)
    return float(distances[i, j].mean())


def beta_sweep_figure(rows: list[dict], file: str | os.PathLike,
                      metrics: Sequence[str] = ("target_rate", "frechet", "jpeg_size")) -> str:
    """Plot metrics against β: one panel per metric of ``metrics`` that some row has, one line per method.

    Args:
        rows: e.g. ``{"method": "efm_ot", "beta": 3.0, "target_rate": 0.9, "frechet": 12.3}``; each needs
            ``method`` and ``beta``; a row without a metric (or with ``None``) is left out of its panel.
        file: the figure's path (format from the extension, default PNG); written atomically.
        metrics: the metric keys to plot, in panel order.

    β is on a log axis when every β is positive.  Returns the path.
    """
    from matplotlib.figure import Figure

    from energyflow.files import save_figure

    if not rows:
        raise InputError("beta_sweep_figure needs at least one row")
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or "method" not in row or "beta" not in row:
            raise InputError(f"beta_sweep_figure: row {number} needs 'method' and 'beta' keys, got {row!r}")
    present = [m for m in metrics if any(row.get(m) is not None for row in rows)]
    if not present:
        raise InputError(f"beta_sweep_figure: no row has any of the metrics {list(metrics)}")
    methods = list(dict.fromkeys(str(row["method"]) for row in rows))
    log_x = all(float(row["beta"]) > 0 for row in rows)

    fig = Figure(figsize=(4.0 * len(present), 3.2))
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, metric in zip(axes, present):
        for method in methods:
            points = sorted((float(row["beta"]), float(row[metric])) for row in rows
                            if str(row["method"]) == method and row.get(metric) is not None)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        if log_x:
            ax.set_xscale("log")
        values = [float(row[metric]) for row in rows if row.get(metric) is not None]
        if metric == "frechet" and values and min(values) > 0:
            ax.set_yscale("log")  # the unguided model is orders of magnitude away from the target class
        ax.set_xlabel("β")
        ax.set_title(metric, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, file, dpi=90)
    return os.fspath(file)
