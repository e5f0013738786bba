"""Stochastic samplers: reverse-SDE Euler–Maruyama (any path) and ancestral (DDPM posterior) sampling."""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from ..paths import _bc
from ..predictor import Predictor
from .base import CountingField, SampleResult, Sampler, finish

__all__ = ["EulerMaruyamaSampler", "AncestralSampler"]


class _StochasticGridSampler(Sampler):
    """Shared loop of the stochastic samplers: ``steps`` uniform steps, one network call each,
    fresh noise on every step but the last, then x̂1 if ``t_max < 1``."""

    steps: int

    def _mean_and_std(self, predictor: Predictor, x: Tensor, t: Tensor, t_next: Tensor,
                      cond: Any) -> tuple[Tensor, Tensor]:
        """The step's Gaussian transition: its mean ``[B, ...]`` and std (broadcastable)."""
        raise NotImplementedError

    def sample(self, predictor: Predictor, x0: Tensor, cond: Any = None, return_trajectory: bool = False,
               generator: Optional[torch.Generator] = None) -> SampleResult:
        grid = predictor.path.time_grid(self.steps, device=x0.device, dtype=x0.dtype)
        field = CountingField(predictor, cond)
        x, traj = x0, [x0] if return_trajectory else None
        with torch.no_grad():
            for i in range(self.steps):
                field.nfe += 1
                x, std = self._mean_and_std(predictor, x, grid[i].expand(x.shape[0]), grid[i + 1].expand(x.shape[0]), cond)
                if i < self.steps - 1:
                    x = x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                if traj is not None:
                    traj.append(x)
            out = finish(predictor, x, float(grid[-1]), cond, field)
        return SampleResult(x=out, nfe=field.nfe, times=grid if return_trajectory else None,
                            trajectory=torch.stack(traj) if traj is not None else None)


class EulerMaruyamaSampler(_StochasticGridSampler):
    """Euler–Maruyama on the reverse SDE  dx = [v + ½ g(t)² ∇log p_t(x)] dt + g(t) dW.

    For every g this SDE has the same marginals as the probability-flow ODE; ``diffusion=None``
    uses the path's natural g (VP: g = √b(1 − t)); a float ``c`` gives g(t) = c·σ_t (noise that
    vanishes with σ_t, which keeps the step stable near the data for any path, e.g. OT); a callable
    ``g(t: [B]) -> [B]`` is used as is.  The last step returns the mean (no noise), then x̂1 if ``t_max < 1``.

    Args:
        steps: number of uniform steps (one network evaluation each).
        diffusion: ``None``, a float ``c`` (g = c·σ_t), or a callable of ``t``.
    """

    def __init__(self, steps: int = 500, diffusion: Union[None, float, Callable[[Tensor], Tensor]] = None):
        self.steps, self.diffusion = int(steps), diffusion

    def _g(self, predictor: Predictor, t: Tensor) -> Tensor:
        if self.diffusion is None:
            return predictor.path.sde_diffusion(t)
        if callable(self.diffusion):
            return self.diffusion(t)
        return float(self.diffusion) * predictor.path.coefficients(t).sigma

    def _mean_and_std(self, predictor, x, t, t_next, cond):
        h = t_next[0] - t[0]
        v = predictor.predict(x, t, cond, "velocity")
        score = predictor.path.convert(v, x, t, "velocity", "score")
        g = _bc(self._g(predictor, t), x)
        return x + h * (v + 0.5 * g * g * score), g * h.sqrt()

    def __repr__(self) -> str:
        return f"EulerMaruyamaSampler(steps={self.steps}, diffusion={self.diffusion!r})"


class AncestralSampler(_StochasticGridSampler):
    """Ancestral sampling with the Gaussian posterior q(x_t' | x_t, x̂1) of the path (DDPM for VP).

    For t < t' (t' closer to data): with α_{t|t'} = α_t/α_t' and σ²_{t|t'} = σ_t² − α²_{t|t'} σ_t'²,
    x_t' ~ N(α_{t|t'} σ_t'²/σ_t² · x_t + α_t' σ²_{t|t'}/σ_t² · x̂1,  σ²_{t|t'} σ_t'²/σ_t²).
    Valid for every affine Gaussian path (OT and VP).  One network evaluation per step.
    """

    def __init__(self, steps: int = 100):
        self.steps = int(steps)

    def _mean_and_std(self, predictor, x, t, t_next, cond):
        x1_hat = predictor.predict(x, t, cond, "x1")
        c, cn = predictor.path.coefficients(t[:1]), predictor.path.coefficients(t_next[:1])
        a_ts = c.alpha / cn.alpha
        var_ts = c.sigma ** 2 - a_ts ** 2 * cn.sigma ** 2
        mean = (a_ts * cn.sigma ** 2 / c.sigma ** 2) * x + (cn.alpha * var_ts / c.sigma ** 2) * x1_hat
        return mean, (var_ts.clamp_min(0) * cn.sigma ** 2 / c.sigma ** 2).sqrt()

    def __repr__(self) -> str:
        return f"AncestralSampler(steps={self.steps})"
