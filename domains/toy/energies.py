"""Differentiable energies for the 2-D toy problems (lower energy is preferred).

Each class is an :class:`energyflow.energies.Energy` whose constructor takes plain floats and
lists, so a recipe can build it with Hydra ``instantiate`` (config keys = constructor
arguments).  ``forward(x)`` takes ``x`` of shape ``[B, d]`` and returns ``[B]`` in ``x``'s dtype
and device; ``cond`` is ignored.

* :class:`LinearEnergy` and :class:`QuadraticEnergy` have closed-form tilts of a Gaussian
  mixture (:meth:`domains.toy.datasets.GaussianMixture.tilt_linear` / ``tilt_quadratic``).
* :class:`RingEnergy` prefers a circle.
* :class:`SineEnergy` is smooth, non-linear and non-Gaussian: the exactness tests check the
  importance-resampled target against the exact grid density for it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from energyflow.energies import Energy

__all__ = ["LinearEnergy", "QuadraticEnergy", "RingEnergy", "SineEnergy"]

VectorLike = Union[Sequence[float], Tensor]


def _to_floats(v: VectorLike, name: str) -> tuple[float, ...]:
    """A plain tuple of floats from a list, a ListConfig or a 1-D tensor."""
    if isinstance(v, Tensor):
        v = v.detach().reshape(-1).tolist()
    out = tuple(float(c) for c in v)
    if not out:
        raise ValueError(f"{name} must be non-empty")
    return out


def _flat(x: Tensor, d: Optional[int], name: str) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} expects x of shape [B, {d}], got {tuple(x.shape)}")
    return x


class LinearEnergy(Energy):
    """``E(x) = a · x``: the tilt pushes mass towards ``−a``.

    Args:
        direction: the vector ``a`` (length ``d``).
    """

    def __init__(self, direction: VectorLike):
        self.direction = _to_floats(direction, "direction")

    def forward(self, x: Tensor, cond: Optional[Any] = None) -> Tensor:
        x = _flat(x, len(self.direction), "LinearEnergy")
        a = torch.tensor(self.direction, dtype=x.dtype, device=x.device)
        return x @ a

    def __repr__(self) -> str:
        return f"LinearEnergy(direction={list(self.direction)})"


class QuadraticEnergy(Energy):
    """``E(x) = |x − c|² / (2 scale²)``: the tilt pulls mass towards ``c``.

    Args:
        center: the minimum ``c`` (length ``d``).
        scale: the length scale (> 0); ``β / scale²`` is the precision the tilt adds.
    """

    def __init__(self, center: VectorLike, scale: float = 1.0):
        self.center = _to_floats(center, "center")
        self.scale = float(scale)
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")

    def forward(self, x: Tensor, cond: Optional[Any] = None) -> Tensor:
        x = _flat(x, len(self.center), "QuadraticEnergy")
        c = torch.tensor(self.center, dtype=x.dtype, device=x.device)
        return (x - c).square().sum(1) / (2.0 * self.scale**2)

    def __repr__(self) -> str:
        return f"QuadraticEnergy(center={list(self.center)}, scale={self.scale})"


class RingEnergy(Energy):
    """``E(x) = (|x| − radius)² / (2 width²)``: the tilt prefers the circle of ``radius``.

    Args:
        radius: the preferred distance from the origin (≥ 0).
        width: the radial length scale (> 0).
    """

    def __init__(self, radius: float = 2.0, width: float = 0.5):
        self.radius = float(radius)
        self.width = float(width)
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {width}")

    def forward(self, x: Tensor, cond: Optional[Any] = None) -> Tensor:
        r = torch.linalg.vector_norm(_flat(x, None, "RingEnergy"), dim=1)
        return (r - self.radius).square() / (2.0 * self.width**2)

    def __repr__(self) -> str:
        return f"RingEnergy(radius={self.radius}, width={self.width})"


class SineEnergy(Energy):
    """``E(x) = amplitude · sin(frequency · x_0) + slope · x_1`` (uses the first two coordinates).

    Smooth, bounded in ``x_0``, non-linear and non-Gaussian.  With the defaults (1, 1, 0.25) the
    eight modes of ``8gaussians`` get distinct energies (at the mode centres, from about −1.01 at
    angle 5π/4 to +1.01 at π/4, e.g. −0.76 at angle 0 and +0.76 at π), so the tilt reweights the
    modes unevenly, and within each mode (std 0.5, on which scale the sine is markedly curved)
    the tilt skews the component: no Gaussian-mixture closed form exists, and the exact target is
    the grid density ``p · exp(−β E)``.

    Args:
        amplitude: height of the sine term.
        frequency: angular frequency of the sine in ``x_0``.
        slope: the linear coefficient on ``x_1``.
    """

    def __init__(self, amplitude: float = 1.0, frequency: float = 1.0, slope: float = 0.25):
        self.amplitude = float(amplitude)
        self.frequency = float(frequency)
        self.slope = float(slope)

    def forward(self, x: Tensor, cond: Optional[Any] = None) -> Tensor:
        x = _flat(x, None, "SineEnergy")
        if x.shape[1] < 2:
            raise ValueError(f"SineEnergy needs at least 2 coordinates, got {x.shape[1]}")
        return self.amplitude * torch.sin(self.frequency * x[:, 0]) + self.slope * x[:, 1]

    def __repr__(self) -> str:
        return f"SineEnergy(amplitude={self.amplitude}, frequency={self.frequency}, slope={self.slope})"
