"""2-D toy data sets and an isotropic Gaussian mixture with exact energy tilts.

Every data set lies roughly within ``[−4.5, 4.5]²`` and is sampled by :func:`sample_toy` from
an explicit ``torch.Generator`` (same generator state → same samples).  Two have a known
density (:func:`log_density`): ``8gaussians`` (exactly :func:`eight_gaussians_mixture`) and
``checkerboard`` (uniform on 8 squares).

The :class:`GaussianMixture` tilts are the closed-form targets used by the exactness tests:
for ``q(x) ∝ p(x) · exp(−β E(x))`` with a linear or an isotropic quadratic energy, an
isotropic Gaussian mixture stays an isotropic Gaussian mixture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "TOY_DATASETS",
    "EIGHT_GAUSSIANS_RADIUS",
    "EIGHT_GAUSSIANS_STD",
    "CHECKERBOARD_HALF_WIDTH",
    "GaussianMixture",
    "eight_gaussians_mixture",
    "sample_toy",
    "log_density",
]

TOY_DATASETS = ("8gaussians", "swissroll", "moons", "rings", "checkerboard", "2spirals")

EIGHT_GAUSSIANS_RADIUS = 4.0
EIGHT_GAUSSIANS_STD = 0.5
CHECKERBOARD_HALF_WIDTH = 4.0  # a 4 × 4 board of 2 × 2 cells on [−4, 4]², 8 of them filled

_LOG_2PI = math.log(2.0 * math.pi)

DeviceLike = Optional[Union[str, torch.device]]


def _check_name(name: str) -> None:
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; valid names are {', '.join(TOY_DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Gaussian mixture
# ----------------------------------------------------------------------------------------------
@dataclass
class GaussianMixture:
    """An isotropic Gaussian mixture ``Σ_k π_k N(μ_k, s² I)`` with one shared ``s``.

    Attributes:
        means: ``[K, d]`` component means ``μ_k``.
        std: the shared isotropic standard deviation ``s > 0``.
        log_weights: ``[K]`` log mixture weights ``log π_k``; normalised on construction
            (``logsumexp = 0``).
    """

    means: Tensor
    std: float
    log_weights: Tensor

    def __post_init__(self) -> None:
        if self.means.dim() != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(self.means.shape)}")
        if self.log_weights.shape != (self.means.shape[0],):
            raise ValueError(
                f"log_weights must have shape [{self.means.shape[0]}], got {tuple(self.log_weights.shape)}"
            )
        self.std = float(self.std)
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")
        self.log_weights = (self.log_weights - torch.logsumexp(self.log_weights, 0)).to(self.means)

    @property
    def dim(self) -> int:
        """The dimension ``d``."""
        return self.means.shape[1]

    @property
    def weights(self) -> Tensor:
        """``[K]`` mixture weights ``π_k`` (sum to 1)."""
        return self.log_weights.exp()

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``n`` samples, ``[n, d]``, in the dtype and on the device of ``means``.

        Args:
            n: number of samples.
            generator: source of randomness (on ``means``' device); ``None`` uses the global RNG.
        """
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        return self.means[comp] + self.std * noise

    def log_prob(self, x: Tensor) -> Tensor:
        """``log Σ_k π_k N(x; μ_k, s² I)`` for ``x`` ``[N, d]`` → ``[N]``.

        Computed in the wider of ``x``'s and ``means``' dtypes.
        """
        dtype = torch.promote_types(x.dtype, self.means.dtype)
        x = x.to(dtype)
        means = self.means.to(device=x.device, dtype=dtype)
        sq = torch.cdist(x, means, compute_mode="donot_use_mm_for_euclid_dist").square()  # [N, K]
        log_norm = -0.5 * self.dim * (_LOG_2PI + 2.0 * math.log(self.std))
        comp = -0.5 * sq / self.std**2 + log_norm + self.log_weights.to(device=x.device, dtype=dtype)
        return torch.logsumexp(comp, dim=1)

    def mean(self) -> Tensor:
        """``[d]`` mixture mean ``Σ π_k μ_k``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """``[d, d]`` mixture covariance ``s² I + Σ π_k (μ_k − m)(μ_k − m)ᵀ``."""
        centred = self.means - self.mean()
        between = centred.T @ (self.weights[:, None] * centred)
        return between + self.std**2 * torch.eye(self.dim, dtype=self.means.dtype, device=self.means.device)

    # -- exact tilts: q(x) ∝ p(x) exp(−β E(x)) --------------------------------------------------
    def _linear_terms(self, a: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """New means ``[K, d]`` and per-component log masses ``log ∫ N(x; μ_k, s²) e^{−β a·x} dx``."""
        a = torch.as_tensor(a, dtype=self.means.dtype, device=self.means.device).reshape(-1)
        if a.shape != (self.dim,):
            raise ValueError(f"direction must have shape [{self.dim}], got {tuple(a.shape)}")
        s2 = self.std**2
        beta = float(beta)
        new_means = self.means - beta * s2 * a
        log_mass = -beta * (self.means @ a) + 0.5 * beta**2 * s2 * a.square().sum()
        return new_means, log_mass

    def tilt_linear(self, a: Tensor, beta: float) -> "GaussianMixture":
        """The exact tilt by ``E(x) = a·x``.

        Completing the square, ``N(x; μ, s² I) · exp(−β a·x) = exp(−β a·μ + β² s² |a|² / 2) ·
        N(x; μ − β s² a, s² I)``: each component is shifted by ``−β s² a`` and its log-weight
        gains ``−β a·μ_k + β² s² |a|² / 2`` (then renormalised).

        Args:
            a: ``[d]`` energy direction.
            beta: energy scale β (any real; β = 0 returns the same mixture).

        Returns:
            The tilted mixture (same ``std``).
        """
        new_means, log_mass = self._linear_terms(a, beta)
        return GaussianMixture(new_means, self.std, self.log_weights + log_mass)

    def log_partition_linear(self, a: Tensor, beta: float) -> Tensor:
        """``log Z = log E_p[exp(−β a·x)]`` exactly, a 0-d tensor."""
        _, log_mass = self._linear_terms(a, beta)
        return torch.logsumexp(self.log_weights + log_mass, dim=0)

    def _quadratic_terms(self, center: Tensor, scale: float, beta: float) -> tuple[Tensor, float, Tensor]:
        """New means ``[K, d]``, new std and per-component log masses for the quadratic tilt."""
        c = torch.as_tensor(center, dtype=self.means.dtype, device=self.means.device).reshape(-1)
        if c.shape != (self.dim,):
            raise ValueError(f"center must have shape [{self.dim}], got {tuple(c.shape)}")
        scale, beta = float(scale), float(beta)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if beta < 0:
            raise ValueError(f"tilt_quadratic needs beta >= 0 (a negative beta is not normalisable), got {beta}")
        s2 = self.std**2
        lam = beta / scale**2  # precision added by the energy
        precision = 1.0 / s2 + lam
        new_means = (self.means / s2 + lam * c) / precision
        # ∫ N(x; μ, s² I) exp(−λ|x − c|²/2) dx = (1 + λ s²)^{−d/2} exp(−λ |μ − c|² / (2 (1 + λ s²)))
        one_plus = 1.0 + lam * s2
        log_mass = -0.5 * lam * (self.means - c).square().sum(1) / one_plus - 0.5 * self.dim * math.log(one_plus)
        return new_means, 1.0 / math.sqrt(precision), log_mass

    def tilt_quadratic(self, center: Tensor, scale: float, beta: float) -> "GaussianMixture":
        """The exact tilt by ``E(x) = |x − c|² / (2 scale²)``, for ``β ≥ 0``.

        With ``λ = β / scale²`` the product ``N(x; μ, s² I) · exp(−λ |x − c|² / 2)`` is an
        unnormalised Gaussian with precision ``1/s² + λ`` (the same for every component, so the
        mixture stays isotropic with ``std' = (1/s² + λ)^{−1/2}``) and mean
        ``(μ/s² + λ c) / (1/s² + λ)``.  Its mass is the Gaussian convolution identity

            ∫ N(x; μ, s² I) exp(−λ|x − c|²/2) dx = (2π/λ)^{d/2} N(μ; c, (s² + 1/λ) I)
                = (1 + λ s²)^{−d/2} · exp(−λ |μ − c|² / (2 (1 + λ s²))),

        which is added to each log-weight (then renormalised; :meth:`log_partition_quadratic`
        keeps the constant).

        Args:
            center: ``[d]`` the energy's minimum ``c``.
            scale: the energy's length scale (> 0).
            beta: energy scale β ≥ 0.

        Returns:
            The tilted mixture.
        """
        new_means, new_std, log_mass = self._quadratic_terms(center, scale, beta)
        return GaussianMixture(new_means, new_std, self.log_weights + log_mass)

    def log_partition_quadratic(self, center: Tensor, scale: float, beta: float) -> Tensor:
        """``log Z = log E_p[exp(−β |x − c|² / (2 scale²))]`` exactly, a 0-d tensor."""
        _, _, log_mass = self._quadratic_terms(center, scale, beta)
        return torch.logsumexp(self.log_weights + log_mass, dim=0)


def eight_gaussians_mixture(dtype: torch.dtype = torch.float64, device: DeviceLike = None) -> GaussianMixture:
    """The ``8gaussians`` data distribution as a :class:`GaussianMixture`.

    Eight equal-weight components with means ``EIGHT_GAUSSIANS_RADIUS · (cos kπ/4, sin kπ/4)``,
    ``k = 0..7``, and isotropic std ``EIGHT_GAUSSIANS_STD``.

    Args:
        dtype: dtype of ``means`` and ``log_weights`` (float64 by default, for exact checks).
        device: their device.
    """
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4.0)
    means = EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    log_weights = torch.full((8,), -math.log(8.0), dtype=torch.float64)
    return GaussianMixture(means.to(device=device, dtype=dtype), EIGHT_GAUSSIANS_STD, log_weights.to(device=device, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# Samplers of the data sets (each on the generator's device, in a float dtype)
# ----------------------------------------------------------------------------------------------
def _rand(n: int, g: Optional[torch.Generator], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.rand(n, generator=g, dtype=dtype, device=device)


def _randn(shape: tuple[int, ...], g: Optional[torch.Generator], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=g, dtype=dtype, device=device)


def _swissroll(n, g, dtype, device):
    # Arc parameter t ∈ [1.5π, 4.5π] on the Archimedean spiral r = t, rescaled to radius ≤ 4.
    t = 1.5 * math.pi * (1.0 + 2.0 * _rand(n, g, dtype, device))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) * (4.0 / (4.5 * math.pi))
    return pts + 0.1 * _randn((n, 2), g, dtype, device)


def _moons(n, g, dtype, device):
    # Two interleaved half circles of radius 1 (upper one centred at 0, lower at (1, 0.5)),
    # shifted to the origin and scaled by 2: x ∈ [−3, 3], y ∈ [−1.5, 1.5] before noise.
    theta = math.pi * _rand(n, g, dtype, device)
    lower = _rand(n, g, dtype, device) < 0.5
    x = torch.where(lower, 1.0 - torch.cos(theta), torch.cos(theta))
    y = torch.where(lower, 0.5 - torch.sin(theta), torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
    return pts + 0.1 * _randn((n, 2), g, dtype, device)


def _rings(n, g, dtype, device):
    # Four concentric circles of radii 1, 2, 3, 4, equally likely, uniform in angle.
    radius = 1.0 + torch.randint(0, 4, (n,), generator=g, device=device).to(dtype)
    theta = 2.0 * math.pi * _rand(n, g, dtype, device)
    pts = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return pts + 0.08 * _randn((n, 2), g, dtype, device)


def _checkerboard(n, g, dtype, device):
    # Board [−4, 4]² of 2 × 2 cells (col, row) ∈ {0..3}², filled where col + row is even.
    h = CHECKERBOARD_HALF_WIDTH
    x = (2.0 * _rand(n, g, dtype, device) - 1.0) * h
    col = torch.floor((x + h) / 2.0).clamp(0, 3)
    row = 2.0 * torch.randint(0, 2, (n,), generator=g, device=device).to(dtype) + torch.remainder(col, 2.0)
    y = -h + 2.0 * row + 2.0 * _rand(n, g, dtype, device)
    return torch.stack([x, y], dim=1)


def _two_spirals(n, g, dtype, device):
    # Two opposite Archimedean spirals r ∝ t, t = 3π √u (denser near the centre), radius ≤ 4.
    t = 3.0 * math.pi * torch.sqrt(_rand(n, g, dtype, device))
    sign = torch.where(_rand(n, g, dtype, device) < 0.5, -1.0, 1.0).to(dtype)
    pts = sign[:, None] * torch.stack([-t * torch.cos(t), t * torch.sin(t)], dim=1) * (4.0 / (3.0 * math.pi))
    return pts + 0.1 * _randn((n, 2), g, dtype, device)


def _eight_gaussians(n, g, dtype, device):
    return eight_gaussians_mixture(dtype=dtype, device=device).sample(n, generator=g)


_SAMPLERS = {
    "8gaussians": _eight_gaussians,
    "swissroll": _swissroll,
    "moons": _moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
}


def sample_toy(
    name: str,
    n: int,
    generator: Optional[torch.Generator] = None,
    device: DeviceLike = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` points of the 2-D toy data set ``name``.

    Args:
        name: one of :data:`TOY_DATASETS`.
        n: number of points.
        generator: the source of randomness; the samples are drawn on its device (then moved to
            ``device``), so one generator state always gives the same points.  ``None`` uses
            torch's global RNG.
        device: device of the result (default: the generator's device, else the CPU).
        dtype: floating dtype of the result; randomness is drawn in float64 when ``dtype`` is
            float64 and in float32 otherwise.

    Returns:
        ``[n, 2]`` points, roughly within ``[−4.5, 4.5]²``.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the valid names) or ``n < 0``.
    """
    _check_name(name)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gen_device = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    pts = _SAMPLERS[name](int(n), generator, work, gen_device)
    return pts.to(device=device if device is not None else gen_device, dtype=dtype)


def _checkerboard_log_density(x: Tensor) -> Tensor:
    h = CHECKERBOARD_HALF_WIDTH
    col = torch.floor((x[:, 0] + h) / 2.0)
    row = torch.floor((x[:, 1] + h) / 2.0)
    inside = (col >= 0) & (col <= 3) & (row >= 0) & (row <= 3)
    filled = inside & (torch.remainder(col + row, 2.0) == 0)
    log_val = -math.log(8 * 4.0)  # 8 filled cells of area 4
    return torch.where(filled, torch.full_like(x[:, 0], log_val), torch.full_like(x[:, 0], -math.inf))


def log_density(name: str, x: Tensor) -> Tensor:
    """The exact log density of data set ``name`` at ``x`` ``[N, 2]`` → ``[N]``.

    Known for ``8gaussians`` (the mixture of :func:`eight_gaussians_mixture`) and
    ``checkerboard`` (``log(1/32)`` on the 8 filled cells, ``−inf`` elsewhere).

    Raises:
        ValueError: unknown ``name``.
        NotImplementedError: a data set without a closed-form density (use a histogram of
            samples instead, as :meth:`domains.toy.target.ExactTiltedTarget.density_grid` does).
    """
    _check_name(name)
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape [N, 2], got {tuple(x.shape)}")
    if name == "8gaussians":
        return eight_gaussians_mixture(dtype=torch.float64, device=x.device).log_prob(x).to(
            torch.promote_types(x.dtype, torch.float32)
        )
    if name == "checkerboard":
        return _checkerboard_log_density(x)
    raise NotImplementedError(f"toy data set {name!r} has no closed-form density")
