"""Energies: batched scalar functions E(x, cond) whose low values are preferred.

Convention (used everywhere in energyflow): the target is q(x) ∝ p(x) · exp(−β · E(x)),
so *lower energy is better*.  For offline RL the energy is −Q(s, a).

An :class:`Energy` maps ``x`` of shape ``[B, *event_shape]`` (and an optional ``cond`` whose
first dimension is also ``B``) to a tensor of shape ``[B]``.  It is either

* **differentiable** (a torch function; gradient guidance may use it), or
* a **black box** (numpy, RDKit, a simulator; only energy-weighted training may use it).

Energies compose: ``2.0 * e1 + e2`` is an energy, and so is ``-e`` (e.g. ``-q_function``).
"""
from __future__ import annotations

import abc
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Energy",
    "FunctionEnergy",
    "BlackBoxEnergy",
    "ScaledEnergy",
    "SumEnergy",
    "NonFiniteEnergyError",
    "check_energies",
]


class NonFiniteEnergyError(ValueError):
    """Raised when an energy returns NaN or ±inf and the caller asked for ``nonfinite='raise'``."""


class Energy(abc.ABC):
    """A batched energy ``E(x, cond) -> Tensor[B]`` (lower is preferred).

    Subclasses implement :meth:`forward`.  ``__call__`` validates the output shape ``[B]``.

    Attributes:
        differentiable: ``True`` when ``forward`` is a torch function of ``x`` that autograd can
            differentiate.  Gradient-guided samplers refuse energies with ``differentiable=False``.
    """

    differentiable: bool = True
    takes_mask: bool = False
    """Whether :meth:`forward` accepts ``mask=`` (``[B, N]``, 1 for real elements of padded sets)."""

    @abc.abstractmethod
    def forward(self, x: Tensor, cond: Optional[Any] = None) -> Tensor:
        """Return the energies of ``x`` (``[B, ...]``) as a tensor of shape ``[B]``; energies that
        set ``takes_mask`` also receive ``mask=`` and must ignore padded elements."""

    def __call__(self, x: Tensor, cond: Optional[Any] = None, mask: Optional[Tensor] = None) -> Tensor:
        if mask is not None and not self.takes_mask:
            raise ValueError(f"{type(self).__name__} does not take a mask, but the batch is masked (padded sets): "
                             f"use an energy with takes_mask=True, or give the batch precomputed 'energy' values")
        out = self.forward(x, cond, mask=mask) if mask is not None else self.forward(x, cond)
        if not isinstance(out, Tensor):
            out = torch.as_tensor(np.asarray(out), dtype=x.dtype, device=x.device)
        if out.shape != (x.shape[0],):
            raise ValueError(
                f"{type(self).__name__} returned shape {tuple(out.shape)}; an energy must return "
                f"one value per sample, shape ({x.shape[0]},)"
            )
        return out

    # -- composition -------------------------------------------------------------------------
    def __mul__(self, scale: float) -> "Energy":
        return ScaledEnergy(self, float(scale))

    __rmul__ = __mul__

    def __neg__(self) -> "Energy":
        return ScaledEnergy(self, -1.0)

    def __add__(self, other: "Energy") -> "Energy":
        if not isinstance(other, Energy):
            return NotImplemented
        return SumEnergy([self, other])

    def __sub__(self, other: "Energy") -> "Energy":
        if not isinstance(other, Energy):
            return NotImplemented
        return SumEnergy([self, ScaledEnergy(other, -1.0)])


class FunctionEnergy(Energy):
    """Wrap a torch function ``fn(x, cond) -> [B]`` (or ``fn(x) -> [B]``) as an :class:`Energy`.

    Args:
        fn: the function; called as ``fn(x, cond)`` when ``takes_cond`` else ``fn(x)`` (plus
            ``mask=`` for masked batches when ``takes_mask``).
        differentiable: whether autograd can differentiate ``fn`` with respect to ``x``.
        takes_cond: whether ``fn`` accepts a second ``cond`` argument.
        takes_mask: whether ``fn`` accepts ``mask=`` (padded sets).
    """

    def __init__(self, fn: Callable[..., Tensor], differentiable: bool = True, takes_cond: bool = False,
                 takes_mask: bool = False):
        self.fn = fn
        self.differentiable = differentiable
        self.takes_cond = takes_cond
        self.takes_mask = takes_mask

    def forward(self, x: Tensor, cond: Optional[Any] = None, **kw: Any) -> Tensor:
        args = (x, cond) if self.takes_cond else (x,)
        return self.fn(*args, **kw)


class BlackBoxEnergy(Energy):
    """Wrap a numpy function (RDKit, a simulator…) ``fn(x_np, cond) -> array[B]``.

    ``x`` is detached and moved to the CPU as a numpy array; the result comes back as a tensor
    on ``x``'s device and dtype.  It is never differentiable.
    """

    differentiable = False

    def __init__(self, fn: Callable[..., Any], takes_cond: bool = False, takes_mask: bool = False):
        self.fn = fn
        self.takes_cond = takes_cond
        self.takes_mask = takes_mask

    def forward(self, x: Tensor, cond: Optional[Any] = None, mask: Optional[Tensor] = None) -> Tensor:
        x_np = x.detach().cpu().numpy()
        args = (x_np, cond) if self.takes_cond else (x_np,)
        kw = {"mask": mask.detach().cpu().numpy()} if mask is not None else {}
        out = self.fn(*args, **kw)
        return torch.as_tensor(np.asarray(out, dtype=np.float64), device=x.device).to(x.dtype)


class ScaledEnergy(Energy):
    """``scale · E`` (``scale`` may be negative, e.g. ``-Q``)."""

    def __init__(self, energy: Energy, scale: float):
        self.energy = energy
        self.scale = float(scale)
        self.differentiable = energy.differentiable
        self.takes_mask = energy.takes_mask

    def forward(self, x: Tensor, cond: Optional[Any] = None, mask: Optional[Tensor] = None) -> Tensor:
        return self.scale * self.energy(x, cond, mask=mask)


class SumEnergy(Energy):
    """``E_1 + E_2 + …``; differentiable only when every term is."""

    def __init__(self, energies: list[Energy]):
        flat: list[Energy] = []
        for e in energies:
            flat.extend(e.energies if isinstance(e, SumEnergy) else [e])
        self.energies = flat
        self.differentiable = all(e.differentiable for e in flat)
        self.takes_mask = all(e.takes_mask for e in flat)

    def forward(self, x: Tensor, cond: Optional[Any] = None, mask: Optional[Tensor] = None) -> Tensor:
        return torch.stack([e(x, cond, mask=mask) for e in self.energies]).sum(0)


def check_energies(energies: Tensor, nonfinite: str = "raise", name: str = "energy") -> Tensor:
    """Validate a ``[B]`` tensor of energies.

    Args:
        energies: the values.
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteEnergyError` naming how many values
            are NaN/inf; ``"mask"`` returns them as ``+inf`` (a sample with infinite energy gets weight
            0) and warns once with the count.
        name: what to call the values in messages.

    Returns:
        The energies, with non-finite entries replaced by ``+inf`` under ``"mask"``.
    """
    if nonfinite not in ("raise", "mask"):
        raise ValueError(f"nonfinite must be 'raise' or 'mask', got {nonfinite!r}")
    bad = ~torch.isfinite(energies)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return energies
    n_nan = int(torch.isnan(energies).sum())
    msg = (
        f"{n_bad} of {energies.numel()} {name} values are not finite ({n_nan} NaN, {n_bad - n_nan} ±inf)."
    )
    if nonfinite == "raise":
        raise NonFiniteEnergyError(
            msg + " Fix the energy, or pass nonfinite='mask' to give those samples zero weight."
        )
    warnings.warn(msg + " They get zero weight (nonfinite='mask').", RuntimeWarning, stacklevel=2)
    return torch.where(bad, torch.full_like(energies, float("inf")), energies)
