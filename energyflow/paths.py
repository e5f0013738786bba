"""Probability paths from noise to data: pure mathematics, no parameters to learn.

**Time convention (everywhere in energyflow): ``t ∈ [0, 1]``, ``t = 0`` is noise, ``t = 1`` is data.**
``t`` always has shape ``[B]`` (one time per sample).

Every path here is an *affine Gaussian path*

    x_t = α_t · x1 + σ_t · x0,      x0 ~ N(0, I) (noise),  x1 ~ data,

so a model's prediction of any of the four quantities

* ``"velocity"``  v = α̇_t x̂1 + σ̇_t ε̂   (d/dt of x_t, the flow-matching target),
* ``"epsilon"``   ε̂ = E[x0 | x_t]         (the denoising target),
* ``"x1"``        x̂1 = E[x1 | x_t]        (the clean-data prediction),
* ``"score"``     ∇ log p_t(x_t) = −ε̂ / σ_t

converts to any other (:meth:`Path.convert`), and every sampler works with every model.

Implementations:

* :class:`CondOTPath` — conditional optimal transport / rectified flow: α_t = t, σ_t = 1 − t.
* :class:`VPPath` — variance-preserving diffusion (score-SDE), in diffusion time s = 1 − t,
  with a ``"linear"`` schedule b(s) = b_min + s (b_max − b_min) (b_min = 0.1, b_max = 20) or the
  ``"cosine"`` schedule of Nichol & Dhariwal.  α_t = exp(−½ ∫₀^{1−t} b(r) dr), σ_t = √(1 − α_t²).
  (b is not called ``beta``: in energyflow ``beta`` is always the energy scale.)
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Prediction", "PREDICTIONS", "PathSample", "Coefficients", "Path", "CondOTPath", "VPPath", "build_path"]

Prediction = Literal["velocity", "epsilon", "x1", "score"]
PREDICTIONS: tuple[str, ...] = ("velocity", "epsilon", "x1", "score")


@dataclass
class Coefficients:
    """α_t, σ_t and their time derivatives, each of shape ``[B]``."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


@dataclass
class PathSample:
    """A draw from the conditional path.

    Attributes:
        t: ``[B]`` times.
        x0: ``[B, ...]`` noise.
        x1: ``[B, ...]`` data.
        xt: ``[B, ...]`` the interpolant α_t x1 + σ_t x0.
        velocity: ``[B, ...]`` the conditional velocity d x_t / dt = α̇_t x1 + σ̇_t x0.
    """

    t: Tensor
    x0: Tensor
    x1: Tensor
    xt: Tensor
    velocity: Tensor


def _bc(c: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[B]`` coefficient to broadcast against ``[B, ...]``."""
    return c.reshape(c.shape + (1,) * (like.dim() - c.dim()))


class Path(abc.ABC):
    """An affine Gaussian path x_t = α_t x1 + σ_t x0 (t = 0 noise, t = 1 data).

    Attributes:
        t_min, t_max: the time range a model is trained and sampled on.  Samplers integrate
            from ``t_min`` to ``t_max`` and, when ``t_max < 1``, return the model's x̂1 at ``t_max``.
        default_prediction: the regression target a model of this path predicts by default.
    """

    t_min: float = 0.0
    t_max: float = 1.0
    default_prediction: Prediction = "velocity"

    @abc.abstractmethod
    def coefficients(self, t: Tensor) -> Coefficients:
        """α_t, σ_t, α̇_t, σ̇_t for times ``t`` of shape ``[B]``."""

    # -- the conditional path ---------------------------------------------------------------
    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """Interpolate noise ``x0`` and data ``x1`` (both ``[B, ...]``) at times ``t`` (``[B]``)."""
        if t.dim() != 1 or t.shape[0] != x1.shape[0]:
            raise ValueError(f"t must have shape [B]=[{x1.shape[0]}], got {tuple(t.shape)}")
        c = self.coefficients(t)
        xt = _bc(c.alpha, x1) * x1 + _bc(c.sigma, x0) * x0
        velocity = _bc(c.d_alpha, x1) * x1 + _bc(c.d_sigma, x0) * x0
        return PathSample(t=t, x0=x0, x1=x1, xt=xt, velocity=velocity)

    def target(self, sample: PathSample, prediction: Prediction | None = None) -> Tensor:
        """The regression target for a model that predicts ``prediction`` (default: the path's)."""
        prediction = prediction or self.default_prediction
        if prediction == "velocity":
            return sample.velocity
        if prediction == "epsilon":
            return sample.x0
        if prediction == "x1":
            return sample.x1
        if prediction == "score":
            return -sample.x0 / _bc(self.coefficients(sample.t).sigma, sample.x0)
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")

    # -- conversions between parameterisations --------------------------------------------------
    def to_x1_epsilon(self, pred: Tensor, xt: Tensor, t: Tensor, kind: Prediction) -> tuple[Tensor, Tensor]:
        """Return (x̂1, ε̂) from a prediction of ``kind`` at ``(xt, t)``."""
        c = self.coefficients(t)
        a, s, da, ds = (_bc(v, xt) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
        if kind == "x1":
            return pred, (xt - a * pred) / s
        if kind == "epsilon":
            return (xt - s * pred) / a, pred
        if kind == "score":
            eps = -s * pred
            return (xt - s * eps) / a, eps
        if kind == "velocity":
            # Solve [a s; da ds] [x1; eps] = [xt; v].
            det = a * ds - s * da
            return (ds * xt - s * pred) / det, (a * pred - da * xt) / det
        raise ValueError(f"unknown prediction {kind!r}; choose one of {PREDICTIONS}")

    def convert(self, pred: Tensor, xt: Tensor, t: Tensor, src: Prediction, dst: Prediction) -> Tensor:
        """Convert a prediction of kind ``src`` at ``(xt, t)`` to kind ``dst``.

        Exact for ``t`` strictly inside the path's support; at an endpoint where a coefficient
        vanishes (α_0 = 0 on the OT path, σ_1 = 0) some conversions divide by zero.
        """
        if src == dst:
            return pred
        if dst not in PREDICTIONS:
            raise ValueError(f"unknown prediction {dst!r}; choose one of {PREDICTIONS}")
        x1, eps = self.to_x1_epsilon(pred, xt, t, src)
        if dst == "x1":
            return x1
        if dst == "epsilon":
            return eps
        c = self.coefficients(t)
        if dst == "score":
            return -eps / _bc(c.sigma, xt)
        return _bc(c.d_alpha, xt) * x1 + _bc(c.d_sigma, xt) * eps

    # -- helpers for samplers -------------------------------------------------------------------
    def time_grid(self, steps: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``steps + 1`` uniformly spaced times from ``t_min`` to ``t_max``."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return torch.linspace(self.t_min, self.t_max, steps + 1, device=device, dtype=dtype)

    def sde_diffusion(self, t: Tensor) -> Tensor:
        """The path's natural diffusion coefficient g(t) for reverse-SDE sampling (``[B]``).

        For any g, dx = [v + ½ g² ∇log p_t] dt + g dW has the path's marginals; paths with a natural
        forward SDE (VP) return theirs, others raise and the sampler needs an explicit ``diffusion``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no natural SDE; pass diffusion=<float or callable> to the SDE sampler"
        )

    def sample_time(self, n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> Tensor:
        """Training times ``[n]`` uniform on ``[t_min, t_max]``."""
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self.t_min + (self.t_max - self.t_min) * u


class CondOTPath(Path):
    """Conditional OT / rectified-flow path: x_t = t·x1 + (1 − t)·x0, target u = x1 − x0."""

    default_prediction: Prediction = "velocity"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        self.t_min, self.t_max = float(t_min), float(t_max)

    def coefficients(self, t: Tensor) -> Coefficients:
        return Coefficients(alpha=t, sigma=1.0 - t, d_alpha=torch.ones_like(t), d_sigma=-torch.ones_like(t))

    def spec(self) -> dict:
        """``build_path(**spec)`` rebuilds this path (stored in model files)."""
        return {"name": "ot", "t_min": self.t_min, "t_max": self.t_max}

    def __repr__(self) -> str:
        return f"CondOTPath(t_min={self.t_min}, t_max={self.t_max})"


class VPPath(Path):
    """Variance-preserving diffusion path (score-SDE VP), expressed in the t = 0 noise → 1 data convention.

    Args:
        schedule: ``"linear"`` (b(s) = b_min + s (b_max − b_min) in diffusion time s = 1 − t) or
            ``"cosine"`` (α = cos(π/2 · (s + c)/(1 + c)) / cos(π/2 · c/(1 + c)), c = 0.008).
        b_min, b_max: the linear schedule's end points (score-SDE / DDPM: 0.1 and 20).
        t_max: the last time used (σ → 0 at t = 1 makes the score singular); default 1 − 1e-3.
        t_min: the first time (the cosine schedule has α = 0 at t = 0, so it starts at 1e-3 by default).
        default_prediction: the training target, ``"epsilon"`` (denoising) by default.
    """

    _COSINE_OFFSET = 0.008

    def __init__(
        self,
        schedule: str = "linear",
        b_min: float = 0.1,
        b_max: float = 20.0,
        t_min: float | None = None,
        t_max: float = 1.0 - 1e-3,
        default_prediction: Prediction = "epsilon",
    ):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.schedule = schedule
        self.b_min, self.b_max = float(b_min), float(b_max)
        self.t_min = float(t_min) if t_min is not None else (0.0 if schedule == "linear" else 1e-3)
        self.t_max = float(t_max)
        self.default_prediction = default_prediction

    def _log_alpha_and_rate(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log α_t and d(log α_t)/dt."""
        s = 1.0 - t
        if self.schedule == "linear":
            integral = self.b_min * s + 0.5 * (self.b_max - self.b_min) * s * s
            b = self.b_min + s * (self.b_max - self.b_min)
            return -0.5 * integral, 0.5 * b
        c = self._COSINE_OFFSET
        scale = 0.5 * math.pi / (1.0 + c)
        u = (s + c) * scale
        log_alpha = torch.log(torch.cos(u)) - math.log(math.cos(c * scale))
        return log_alpha, scale * torch.tan(u)

    def coefficients(self, t: Tensor) -> Coefficients:
        log_alpha, rate = self._log_alpha_and_rate(t)
        log_alpha = log_alpha.clamp_max(0.0)  # rounding gives log α = +1e-20 at t = 1 (cosine): σ would be NaN
        alpha = log_alpha.exp()
        sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha))
        d_alpha = alpha * rate
        d_sigma = -alpha * d_alpha / sigma
        return Coefficients(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)

    def sde_diffusion(self, t: Tensor) -> Tensor:
        """g(t) = √b(s) with b(s) = −2 d(log α)/ds, the VP forward SDE's diffusion."""
        _, rate = self._log_alpha_and_rate(t)
        return torch.sqrt(2.0 * rate)

    def spec(self) -> dict:
        """``build_path(**spec)`` rebuilds this path (stored in model files)."""
        return {"name": "vp", "schedule": self.schedule, "b_min": self.b_min, "b_max": self.b_max,
                "t_min": self.t_min, "t_max": self.t_max, "default_prediction": self.default_prediction}

    def __repr__(self) -> str:
        return (
            f"VPPath(schedule={self.schedule!r}, b_min={self.b_min}, b_max={self.b_max}, "
            f"t_min={self.t_min}, t_max={self.t_max}, default_prediction={self.default_prediction!r})"
        )


def build_path(name: str, **kwargs) -> Path:
    """Build a path by name: ``"ot"`` (alias ``"cond_ot"``) or ``"vp"``."""
    if name in ("ot", "cond_ot", "condot"):
        return CondOTPath(**kwargs)
    if name == "vp":
        return VPPath(**kwargs)
    raise ValueError(f"unknown path {name!r}; choose 'ot' or 'vp'")
