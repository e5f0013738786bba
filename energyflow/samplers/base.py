"""The sampler interface.

A sampler integrates a :class:`~energyflow.predictor.Predictor` from noise (``t = path.t_min``)
to data (``t = path.t_max``; when ``t_max < 1`` the final state is the model's x̂1 there).
Samplers only integrate: they own no network, optimiser or device, and keep no state between calls.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..predictor import Predictor

__all__ = ["SampleResult", "Sampler", "CountingField"]


@dataclass
class SampleResult:
    """What a sampler returns.

    Attributes:
        x: ``[B, ...]`` the samples (t = 1 side).
        times: ``[K]`` the times of the trajectory's states (``None`` unless requested; adaptive
            solvers report the requested output grid, not their internal steps).
        trajectory: ``[K, B, ...]`` the states at ``times`` (``None`` unless requested); the last
            entry is the state at ``times[-1]``, before any final denoising.
        nfe: the number of network evaluations used.
    """

    x: Tensor
    nfe: int
    times: Optional[Tensor] = None
    trajectory: Optional[Tensor] = None


class Sampler(abc.ABC):
    """Draws samples by integrating a predictor from noise.

    ``sample(predictor, x0, cond)`` takes the initial noise ``x0`` (``[B, ...]``, usually
    ``torch.randn``) explicitly so that runs are reproducible and samplers comparable on the same
    noise; stochastic samplers also take a ``generator`` for their own noise.
    """

    @abc.abstractmethod
    def sample(
        self,
        predictor: Predictor,
        x0: Tensor,
        cond: Any = None,
        return_trajectory: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> SampleResult:
        """Integrate from ``x0`` at ``t_min`` to the data side; see :class:`SampleResult`."""


class CountingField:
    """``f(t, x)`` for ODE solvers: the predictor's velocity at scalar or ``[B]`` time, counting calls."""

    def __init__(self, predictor: Predictor, cond: Any, kind: str = "velocity"):
        self.predictor, self.cond, self.kind, self.nfe = predictor, cond, kind, 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        tb = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if tb.dim() == 0:
            tb = tb.expand(x.shape[0])
        return self.predictor.predict(x, tb, self.cond, self.kind)


def finish(predictor: Predictor, x: Tensor, t_end: float, cond: Any, field: CountingField) -> Tensor:
    """Return x̂1 at ``t_end`` when the path stops short of t = 1, else ``x`` itself."""
    if t_end >= 1.0:
        return x
    field.nfe += 1
    t = torch.full((x.shape[0],), t_end, device=x.device, dtype=x.dtype)
    return predictor.predict(x, t, cond, "x1")
