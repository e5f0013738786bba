"""The exact tilted target ``q(x) ∝ p(x) · exp(−β E(x))`` of a 2-D toy data set.

``p`` is known through samples (a large seeded pool from :func:`~domains.toy.datasets.sample_toy`)
and, for ``8gaussians`` and ``checkerboard``, also in closed form.  :class:`ExactTiltedTarget`
gives reference samples by importance resampling of the pool and a reference density on a grid,
for any energy (linear, non-linear, black box) and any finite β ≥ 0.

Importance resampling is only as good as the pool's *effective sample size* (ESS, reported by
:attr:`ExactTiltedTarget.pool_ess`).  At large β the tilted target concentrates where the pool
has few or no points (for ``8gaussians`` and a linear term in the energy, q's mass moves
``β · std² · slope`` away from the data), so the ESS collapses towards 1 and "exact" samples
become copies of the pool's lowest-energy point.  :meth:`ExactTiltedTarget.max_supported_beta`
gives the largest β at which the ESS stays above a threshold (:data:`MIN_POOL_ESS` by default).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from energyflow.energies import Energy
from energyflow.weights import energy_weights

from .datasets import TOY_DATASETS, log_density, sample_toy

__all__ = ["ExactTiltedTarget", "DensityGrid", "MIN_POOL_ESS"]

MIN_POOL_ESS = 1000.0  # below this the resampled target is dominated by a few pool points


class DensityGrid(NamedTuple):
    """A density on a regular 2-D grid of cell centres.

    Attributes:
        xs: ``[R]`` cell centres along ``x_0``.
        ys: ``[R]`` cell centres along ``x_1``.
        density: ``[R, R]`` float64, ``density[j, i]`` is the density at ``(xs[i], ys[j])`` (rows
            index ``x_1``, as ``plt.pcolormesh(xs, ys, density)`` expects); it integrates to 1
            over the grid: ``density.sum() · cell_area == 1``.
    """

    xs: Tensor
    ys: Tensor
    density: Tensor

    @property
    def cell_area(self) -> float:
        """Area of one grid cell."""
        return float((self.xs[1] - self.xs[0]) * (self.ys[1] - self.ys[0])) if len(self.xs) > 1 else 1.0


@functools.lru_cache(maxsize=4)
def _cached_pool(dataset: str, pool_size: int, seed: int) -> Tensor:
    """A seeded ``[pool_size, 2]`` float32 CPU sample of ``dataset``, shared between targets."""
    gen = torch.Generator().manual_seed(seed)
    pool = sample_toy(dataset, pool_size, generator=gen)
    pool.requires_grad_(False)
    return pool


class ExactTiltedTarget:
    """Samples and density of ``q(x) ∝ p(x) · exp(−β E(x))`` for a toy data set ``p``.

    The pool (``pool_size`` points of ``sample_toy(dataset, ·)`` from a generator seeded with
    ``seed``) and its normalised weights ``softmax(−β E)`` (float64, via
    :func:`energyflow.weights.energy_weights`) are computed lazily on first use; the pool itself
    is cached per ``(dataset, pool_size, seed)`` so targets that differ only in energy or β share
    it.  Everything lives on the CPU.

    Resampling is exact as ``pool_size → ∞``; at finite size its quality is measured by
    :attr:`pool_ess` (a ``RuntimeWarning`` is raised when it falls below ``MIN_POOL_ESS``).

    Args:
        dataset: one of :data:`~domains.toy.datasets.TOY_DATASETS`.
        energy: any batched energy ``[B, 2] → [B]`` (lower preferred); it is evaluated in float64
            without gradients.
        beta: energy scale, finite and ≥ 0 (β = 0 gives the data distribution).
        pool_size: number of data points in the pool.
        seed: seed of the pool's generator.
    """

    def __init__(self, dataset: str, energy: Energy, beta: float, pool_size: int = 1_000_000, seed: int = 0):
        if dataset not in TOY_DATASETS:
            raise ValueError(f"unknown toy data set {dataset!r}; valid names are {', '.join(TOY_DATASETS)}")
        if not (beta >= 0 and math.isfinite(beta)):  # also refuses NaN
            raise ValueError(f"beta must be finite and >= 0, got {beta}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.dataset = dataset
        self.energy = energy
        self.beta = float(beta)
        self.pool_size = int(pool_size)
        self.seed = int(seed)
        self._log_weights: Optional[Tensor] = None
        self._weights: Optional[Tensor] = None
        self._ess: Optional[float] = None
        self._energies: Optional[Tensor] = None

    def __repr__(self) -> str:
        return (
            f"ExactTiltedTarget(dataset={self.dataset!r}, energy={self.energy!r}, beta={self.beta}, "
            f"pool_size={self.pool_size}, seed={self.seed})"
        )

    # -- the pool -------------------------------------------------------------------------------
    @property
    def pool(self) -> Tensor:
        """``[pool_size, 2]`` float32 data points (shared; do not modify in place)."""
        return _cached_pool(self.dataset, self.pool_size, self.seed)

    @property
    def pool_energies(self) -> Tensor:
        """``[pool_size]`` float64 energies of the pool points (computed once)."""
        if self._energies is None:
            with torch.no_grad():
                self._energies = self.energy(self.pool.to(torch.float64)).to(torch.float64)
        return self._energies

    def _build(self) -> None:
        # energy_weights works in log space with the maximum logit subtracted, so the weights stay
        # exact for any finite β·E (no overflow at β = 1e6); it refuses NaN / -inf energies.
        ew = energy_weights(self.pool_energies, self.beta)
        self._log_weights = ew.log_weights
        self._weights = ew.weights
        self._ess = float(ew.ess)
        if self._ess < MIN_POOL_ESS:
            warnings.warn(
                f"{self!r}: the pool's effective sample size is {self._ess:.0f} < {MIN_POOL_ESS:.0f}; "
                "samples from this target repeat few pool points. Increase pool_size or lower beta.",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def log_weights(self) -> Tensor:
        """``[pool_size]`` float64 normalised log-weights ``−β E − logsumexp(−β E)``."""
        if self._log_weights is None:
            self._build()
        return self._log_weights

    @property
    def weights(self) -> Tensor:
        """``[pool_size]`` float64 normalised weights (sum to 1)."""
        if self._weights is None:
            self._build()
        return self._weights

    @property
    def pool_ess(self) -> float:
        """Effective sample size ``1 / Σ w²`` of the pool weights (``pool_size`` when β = 0)."""
        if self._ess is None:
            self._build()
        return self._ess

    def ess_at(self, beta: float) -> float:
        """The pool's effective sample size if the target had inverse temperature ``beta``."""
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be finite and >= 0, got {beta}")
        return float(energy_weights(self.pool_energies, float(beta)).ess)

    def max_supported_beta(self, min_ess: float = MIN_POOL_ESS, upper: float = 1e6, rtol: float = 1e-3) -> float:
        """The largest β at which the pool's effective sample size is still ``>= min_ess``.

        Found by bisection on ``[0, upper]`` in log β (the ESS falls as β grows); returns ``0.0``
        when even β = 0 is below ``min_ess`` (a pool smaller than ``min_ess``) and ``upper`` when
        ``upper`` itself is fine.  Beyond this β the resampled target is not a trustworthy
        stand-in for q: grow ``pool_size`` to extend the range.

        Args:
            min_ess: the required effective sample size.
            upper: the largest β tried.
            rtol: relative precision of the answer.
        """
        if self.ess_at(0.0) < min_ess:
            return 0.0
        if self.ess_at(upper) >= min_ess:
            return float(upper)
        lo, hi = 1e-12, float(upper)
        if self.ess_at(lo) < min_ess:
            return 0.0
        while hi / lo > 1.0 + rtol:
            mid = math.sqrt(lo * hi)
            if self.ess_at(mid) >= min_ess:
                lo = mid
            else:
                hi = mid
        return lo

    @property
    def log_partition(self) -> float:
        """Monte Carlo estimate of ``log Z = log E_p[exp(−β E)]`` from the pool."""
        energies = self.pool_energies
        return float(torch.logsumexp(-self.beta * energies, 0) - math.log(self.pool_size)) if self.beta else 0.0

    # -- samples and density -------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples of ``q``, ``[n, 2]`` float32 on the CPU, by importance resampling.

        Draws pool indices with replacement with probabilities equal to the weights.

        Args:
            n: number of samples.
            generator: a CPU generator; ``None`` uses torch's global RNG.
        """
        idx = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        return self.pool[idx]

    def density_grid(self, extent: float = 4.5, resolution: int = 200, method: str = "auto") -> DensityGrid:
        """The density of ``q`` on the cell centres of a ``resolution²`` grid over ``[−extent, extent]²``.

        Args:
            extent: half-width of the square.
            resolution: cells per side ``R``.
            method: ``"exact"`` evaluates ``p · exp(−β E)`` at the cell centres (needs
                :func:`~domains.toy.datasets.log_density`); ``"histogram"`` bins the weighted
                pool; ``"auto"`` (default) is exact when the data set has a known density.

        Returns:
            :class:`DensityGrid` whose density integrates to 1 over the grid (mass outside the
            square is dropped and the rest renormalised).
        """
        if method not in ("auto", "exact", "histogram"):
            raise ValueError(f"method must be 'auto', 'exact' or 'histogram', got {method!r}")
        if resolution < 1 or extent <= 0:
            raise ValueError(f"need resolution >= 1 and extent > 0, got {resolution} and {extent}")
        h = 2.0 * extent / resolution
        centres = -extent + h * (torch.arange(resolution, dtype=torch.float64) + 0.5)

        if method in ("auto", "exact"):
            gy, gx = torch.meshgrid(centres, centres, indexing="ij")  # [R, R]; row = x_1
            pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
            try:
                log_p = log_density(self.dataset, pts).to(torch.float64)
            except NotImplementedError:
                if method == "exact":
                    raise
            else:
                log_q = log_p
                if self.beta:
                    with torch.no_grad():
                        log_q = log_p - self.beta * self.energy(pts).to(torch.float64)
                if torch.isneginf(log_q.max()):
                    raise ValueError("the target has no mass on the grid")
                density = torch.softmax(log_q, dim=0) / (h * h)
                return DensityGrid(centres, centres.clone(), density.reshape(resolution, resolution))

        pool = self.pool.to(torch.float64)
        idx = torch.floor((pool + extent) / h).long()
        inside = ((idx >= 0) & (idx < resolution)).all(dim=1)
        flat = idx[inside, 1] * resolution + idx[inside, 0]
        mass = torch.bincount(flat, weights=self.weights[inside], minlength=resolution * resolution)
        total = mass.sum()
        if total <= 0:
            raise ValueError("the weighted pool has no mass on the grid")
        density = mass / (total * h * h)
        return DensityGrid(centres, centres.clone(), density.reshape(resolution, resolution))
