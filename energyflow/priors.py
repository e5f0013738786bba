"""Priors: the noise distribution at t = 0, shared by the losses (training noise) and samplers
(initial noise), so that a model is always integrated from the noise it was trained on.

A prior draws ``[B, *event_shape]`` samples; with a ``mask`` (``[B, N]`` for sets of up to ``N``
elements, each element of shape ``event_shape[1:]``), padded elements are exactly zero.

* :class:`GaussianPrior`: N(0, I), the default.
* :class:`CenteredGaussianPrior`: N(0, I) projected onto the subspace of zero centre of mass, per
  sample, over its *real* elements (point clouds and molecules, whose energies and data are
  translation-invariant; E(n)-equivariant flows use it).  Data on this path must be centred too
  (:func:`center_of_mass_free`).
"""
from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Prior", "GaussianPrior", "CenteredGaussianPrior", "build_prior", "expand_mask", "center_of_mass_free"]


def expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A ``[B, N]`` (or ``[B, ...]``) mask broadcast to ``like``'s shape ``[B, N, ...]``, as ``like``'s dtype."""
    if mask.shape != like.shape[: mask.dim()]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not index the leading dimensions of "
                         f"{tuple(like.shape)}")
    return mask.to(like.dtype).reshape(tuple(mask.shape) + (1,) * (like.dim() - mask.dim())).expand_as(like)


def center_of_mass_free(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``x`` ([B, N, D]) minus its per-sample mean over the real elements (padding stays zero)."""
    if x.dim() < 3:
        raise ValueError(f"centre of mass needs sets [B, N, D], got shape {tuple(x.shape)}")
    if mask is None:
        return x - x.mean(dim=1, keepdim=True)
    m = expand_mask(mask, x)
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (x - (x * m).sum(dim=1, keepdim=True) / count) * m


class Prior(abc.ABC):
    """The noise distribution of a path's t = 0 end."""

    @abc.abstractmethod
    def sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None, device: Any = None,
               dtype: Optional[torch.dtype] = None, mask: Optional[Tensor] = None) -> Tensor:
        """``[B, *event_shape]`` noise (``shape`` includes ``B``); padded elements (mask 0) are zero.

        Drawn on the generator's device (so a CPU generator gives the same numbers on any device),
        then moved to ``device``."""

    def spec(self) -> dict:
        """``build_prior(**spec)`` rebuilds this prior (stored in model files)."""
        return {"name": self.name}

    name = "prior"


class GaussianPrior(Prior):
    """Standard normal noise, zero on padding."""

    name = "gaussian"

    def sample(self, shape, generator=None, device=None, dtype=None, mask=None):
        where = generator.device if generator is not None else (device or "cpu")
        x = torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype or torch.get_default_dtype())
        x = x.to(device) if device is not None else x
        return x * expand_mask(mask.to(x.device), x) if mask is not None else x

    def __repr__(self) -> str:
        return "GaussianPrior()"


class CenteredGaussianPrior(Prior):
    """Standard normal noise on the zero-centre-of-mass subspace of each sample's real elements."""

    name = "centered_gaussian"

    def sample(self, shape, generator=None, device=None, dtype=None, mask=None):
        x = GaussianPrior().sample(shape, generator, device, dtype, mask)
        return center_of_mass_free(x, mask.to(x.device) if mask is not None else None)

    def __repr__(self) -> str:
        return "CenteredGaussianPrior()"


def build_prior(name: str = "gaussian") -> Prior:
    """A prior by name: ``"gaussian"`` or ``"centered_gaussian"``."""
    if name == "gaussian":
        return GaussianPrior()
    if name in ("centered_gaussian", "zero_com"):
        return CenteredGaussianPrior()
    raise ValueError(f"unknown prior {name!r}; choose 'gaussian' or 'centered_gaussian'")
