"""Energies of images ``[B, C, H, W]`` in ``[-1, 1]`` (lower is preferred).

* :class:`ClassifierEnergy` — ``E(x) = -log p(y ∈ S | x)`` under a classifier, for a set ``S`` of
  target classes: differentiable, so both gradient guidance and energy-weighted training may use it.
* :class:`JPEGSizeEnergy` — the size of the image's JPEG encoding (Pillow): a black box with no
  gradient, so only energy-weighted training may use it; gradient-guided samplers refuse it.

Pillow is imported only when a :class:`JPEGSizeEnergy` is evaluated.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from energyflow.energies import Energy
from energyflow.errors import InputError
from energyflow.validation import check_number

__all__ = ["ClassifierEnergy", "JPEGSizeEnergy", "DIGITS_JPEG_UNIT", "DIGITS_JPEG_UPSCALE"]

DIGITS_JPEG_UPSCALE = 4
"""Recommended ``upscale`` for 8×8 digits: encode them as 32×32 images, 2×2 digit pixels per 8×8
JPEG block.  This gives the widest spread of sizes: at ``upscale=1`` a digit is a single block and
the ~330-byte header dominates (std ≈ 3 bytes), and at ``upscale=8`` every block is flat, so only the
DC terms vary (std ≈ 5 bytes).  Over scikit-learn's 1797 digits at ``quality=75``: mean 579 bytes,
std 36 (31–33 with N(0, 0.05–0.1²) pixel noise, as in model samples), range 474–683."""

DIGITS_JPEG_UNIT = 32.0
"""Recommended ``unit`` (bytes) for 8×8 digits at ``upscale=4`` and ``quality=75``: about the standard
deviation of the JPEG size across digits, so ``E`` varies by about 1 between images and
``β ∈ {1, 3, 10}`` give mild, clear and strong tilts."""

_PARALLEL_MIN_BATCH = 64


def _check_targets(targets: Sequence[int] | int) -> tuple[int, ...]:
    items = [targets] if isinstance(targets, (int, np.integer)) else targets
    try:
        items = list(items)
    except TypeError:
        raise InputError(f"targets must be a class index or a sequence of class indices, got {targets!r}") from None
    if not items:
        raise InputError("targets is empty: give at least one target class index")
    bad = [t for t in items if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0]
    if bad:
        raise InputError(f"targets must be non-negative integer class indices; bad: {bad}")
    out = tuple(int(t) for t in items)
    repeated = sorted({t for t in out if out.count(t) > 1})
    if repeated:
        raise InputError(f"targets lists class(es) {repeated} more than once: {list(out)}")
    return out


class ClassifierEnergy(Energy):
    """``E(x) = -log p(y ∈ S | x) = logsumexp_k z_k - logsumexp_{k ∈ S} z_k`` with ``z = logits / T``.

    Args:
        classifier: a module with ``forward(x) -> logits [B, K]`` (images ``[B, C, H, W]`` in ``[-1, 1]``).
            It is evaluated in eval mode (its previous mode is restored afterwards); ``cond`` is ignored.
        targets: the target class index, or a set of them (non-empty, no repeats, each in ``0..K-1``;
            the upper bound is checked at the first call, when ``K`` is known).
        temperature: ``T > 0``; the logits are divided by it (``T > 1`` flattens ``p``, ``T < 1`` sharpens it).

    ``E ≥ 0``, and ``E = 0`` exactly when all the probability lies in ``S``.  Differentiable in ``x``.
    """

    differentiable = True

    def __init__(self, classifier: nn.Module, targets: Sequence[int] | int, temperature: float = 1.0):
        if not callable(classifier):
            raise InputError(f"classifier must be a module mapping images to logits, got {type(classifier).__name__}")
        self.classifier = classifier
        self.targets = _check_targets(targets)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_inclusive=False)
        self._index: Optional[Tensor] = None
        self._num_classes: Optional[int] = None

    def _target_index(self, num_classes: int, device: torch.device) -> Tensor:
        if self._num_classes != num_classes:
            bad = [t for t in self.targets if t >= num_classes]
            if bad:
                raise InputError(f"target class(es) {bad} out of range: the classifier has {num_classes} classes "
                                 f"(indices 0..{num_classes - 1})")
            self._num_classes = num_classes
            self._index = torch.tensor(self.targets, dtype=torch.long)
        if self._index.device != device:
            self._index = self._index.to(device)
        return self._index

    def logits(self, x: Tensor) -> Tensor:
        """The classifier's logits of ``x`` divided by the temperature, ``[B, K]`` (eval mode)."""
        was_training = getattr(self.classifier, "training", False)
        if was_training:
            self.classifier.eval()
        try:
            logits = self.classifier(x)
        finally:
            if was_training:
                self.classifier.train()
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier returned logits of shape {tuple(logits.shape)}; expected ({x.shape[0]}, K)")
        return logits / self.temperature

    def forward(self, x: Tensor, cond: Optional[Any] = None) -> Tensor:
        z = self.logits(x)
        index = self._target_index(z.shape[1], z.device)
        return torch.logsumexp(z, dim=1) - torch.logsumexp(z.index_select(1, index), dim=1)

    def __repr__(self) -> str:
        targets = self.targets[0] if len(self.targets) == 1 else list(self.targets)
        return f"ClassifierEnergy(targets={targets}, temperature={self.temperature:g})"


def _jpeg_size(image: Any, quality: int) -> int:
    buffer = io.BytesIO()
    # every setting fixed (no optimisation pass, baseline, 4:2:0 chroma for RGB): the same image
    # always gives the same bytes for a given Pillow/libjpeg
    image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=2)
    return buffer.getbuffer().nbytes


def _jpeg_sizes(images: list[Any], quality: int) -> list[int]:
    return [_jpeg_size(image, quality) for image in images]


class JPEGSizeEnergy(Energy):
    """The size of each image's JPEG encoding (Pillow), in units of ``unit`` bytes; lower = more compressible.

    A black box: no gradient exists, so ``differentiable = False`` and gradient-guided samplers refuse
    it; energy-weighted training (EFM) can use it.

    Each image (``[-1, 1]``) becomes ``uint8`` (``round((x + 1) · 127.5)``, clamped to 0..255), is
    optionally enlarged ``upscale`` times by nearest-neighbour repetition (an 8×8 digit is a single
    JPEG block: enlarge it, e.g. ``upscale=4``, for sizes that differ between images), and is encoded
    as grayscale (``C = 1``) or RGB (``C = 3``) at ``quality`` with fixed settings, so the result is
    deterministic.  Batches of at least 64 are encoded by a thread pool (Pillow releases the GIL while
    encoding); the values are the same as sequential encoding.

    Args:
        quality: JPEG quality, an integer in 1..100.
        unit: bytes per unit of energy (> 0); :data:`DIGITS_JPEG_UNIT` suits 8×8 digits at ``upscale=4``.
        upscale: integer enlargement factor (≥ 1).
        workers: threads for large batches (default ``min(8, cpu count)``; 1 encodes sequentially).
    """

    differentiable = False

    def __init__(self, quality: int = 75, unit: float = 1.0, upscale: int = 1, workers: Optional[int] = None):
        if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
            raise InputError(f"quality must be an integer in 1..100, got {quality!r}")
        unit = check_number(unit, "unit (bytes)", low=0.0, low_inclusive=False)
        if isinstance(upscale, bool) or not isinstance(upscale, (int, np.integer)) or upscale < 1:
            raise InputError(f"upscale must be an integer >= 1, got {upscale!r}")
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise InputError(f"workers must be an integer >= 1, got {workers!r}")
        self.quality = int(quality)
        self.unit = unit
        self.upscale = int(upscale)
        self.workers = int(workers)

    def to_uint8(self, x: Tensor) -> np.ndarray:
        """Images ``[B, C, H, W]`` in ``[-1, 1]`` as the ``uint8`` arrays ``[B, H·upscale, W·upscale, C]`` that are encoded."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"JPEGSizeEnergy needs images [B, C, H, W] with C = 1 (grayscale) or 3 (RGB), "
                             f"got shape {tuple(x.shape)}")
        pixels = torch.round((x.detach().to(torch.float64) + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)
        array = pixels.cpu().numpy().transpose(0, 2, 3, 1)
        if self.upscale > 1:
            array = array.repeat(self.upscale, axis=1).repeat(self.upscale, axis=2)
        return np.ascontiguousarray(array)

    def sizes(self, x: Tensor) -> list[int]:
        """The JPEG sizes of the images in bytes."""
        from PIL import Image

        array = self.to_uint8(x)
        # a 2-D uint8 array is a grayscale (L) image, an [H, W, 3] one an RGB image
        images = [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in array]
        if len(images) < _PARALLEL_MIN_BATCH or self.workers == 1:
            return _jpeg_sizes(images, self.quality)
        # one contiguous chunk per thread (small images encode in ~0.1 ms: a task per image costs more
        # than it saves); pool.map keeps the chunks in order, so the result equals the sequential one
        workers = min(self.workers, len(images) // (_PARALLEL_MIN_BATCH // 2))
        bounds = np.linspace(0, len(images), workers + 1).astype(int)
        chunks = [images[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return [size for sizes in pool.map(_jpeg_sizes, chunks, [self.quality] * workers) for size in sizes]

    def forward(self, x: Tensor, cond: Optional[Any] = None) -> Tensor:
        sizes = np.asarray(self.sizes(x), dtype=np.float64) / self.unit
        return torch.as_tensor(sizes, device=x.device).to(x.dtype if x.is_floating_point() else torch.float32)

    def __repr__(self) -> str:
        return f"JPEGSizeEnergy(quality={self.quality}, unit={self.unit:g}, upscale={self.upscale})"
