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

__all__ = ["Prior", "GaussianPrior", "CenteredGaussianPrior", "build_prior", "expand_mask", "center_of_mass_free",
           "kabsch_align", "build_coupling"]


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


def kabsch_align(x0: Tensor, x1: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Each noise sample ``x0[b]`` rotated (a proper rotation, det = +1) onto its data sample ``x1[b]``.

    ``x0`` and ``x1`` are centred sets ``[B, N, D]`` (zero centre of mass over the real elements);
    the rotation R minimises ``Σ_i |R x0_i − x1_i|²`` over the real elements (Kabsch: the SVD of
    the ``D × D`` cross-covariance, with the last singular direction flipped when the optimum would
    be a reflection).  Padded elements stay zero.

    Used as the noise–data *coupling* of flow matching on rotation-invariant data (molecules, point
    clouds): the pairs' paths cross less, the conditional targets are shorter, and since the prior
    is isotropic and the data are only defined up to rotation, the learned field still carries the
    prior to the data distribution (up to a global rotation, which an E(3)-equivariant network and
    a rotation-invariant energy cannot see).  The rotation is computed without gradient.
    """
    if x0.shape != x1.shape or x0.dim() != 3:
        raise ValueError(f"kabsch_align needs two sets of one shape [B, N, D], got {tuple(x0.shape)} and {tuple(x1.shape)}")
    with torch.no_grad():
        a, b = x0.double(), x1.double()
        if mask is not None:
            m = expand_mask(mask.to(x0.device), a)
            a, b = a * m, b * m
        h = a.transpose(1, 2) @ b                                  # [B, D, D] cross-covariance
        u, _, vh = torch.linalg.svd(h)
        d = torch.sign(torch.linalg.det(vh.transpose(1, 2) @ u.transpose(1, 2)))
        flip = torch.ones(x0.shape[0], x0.shape[2], dtype=a.dtype, device=a.device)
        flip[:, -1] = torch.where(d == 0, torch.ones_like(d), d)
        rot = vh.transpose(1, 2) @ torch.diag_embed(flip) @ u.transpose(1, 2)   # [B, D, D], x ↦ R x
        out = (a @ rot.transpose(1, 2)).to(x0.dtype)
    return out


_COUPLINGS = {"kabsch": kabsch_align}


def build_coupling(name: Optional[str]):
    """A noise–data coupling ``f(x0, x1, mask) -> x0'`` by name: ``None`` / ``"independent"`` (the
    noise as drawn) or ``"kabsch"`` (:func:`kabsch_align`)."""
    if name in (None, "none", "independent"):
        return None
    if name not in _COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; choose 'independent' or 'kabsch'")
    return _COUPLINGS[name]


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
