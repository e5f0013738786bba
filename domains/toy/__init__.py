"""2-D toy problems: data sets, differentiable energies and the exact tilted target.

Only torch is needed.  ``q(x) ∝ p(x) · exp(−β E(x))`` (lower energy preferred) is available
exactly for every data set and energy through :class:`ExactTiltedTarget`, and in closed form for
``8gaussians`` under linear and quadratic energies (:class:`GaussianMixture` tilts).
"""
from .datasets import (
    CHECKERBOARD_HALF_WIDTH,
    EIGHT_GAUSSIANS_RADIUS,
    EIGHT_GAUSSIANS_STD,
    TOY_DATASETS,
    GaussianMixture,
    eight_gaussians_mixture,
    log_density,
    sample_toy,
)
from .energies import LinearEnergy, QuadraticEnergy, RingEnergy, SineEnergy
from .target import DensityGrid, ExactTiltedTarget

__all__ = [
    "TOY_DATASETS",
    "EIGHT_GAUSSIANS_RADIUS",
    "EIGHT_GAUSSIANS_STD",
    "CHECKERBOARD_HALF_WIDTH",
    "GaussianMixture",
    "eight_gaussians_mixture",
    "sample_toy",
    "log_density",
    "LinearEnergy",
    "QuadraticEnergy",
    "RingEnergy",
    "SineEnergy",
    "ExactTiltedTarget",
    "DensityGrid",
]
