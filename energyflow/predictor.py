"""A network bound to a path: query any parameterisation of a trained model.

A network has the one signature used throughout energyflow, ``net(x, t, cond) -> Tensor`` with
``x: [B, ...]``, ``t: [B]`` (t = 0 noise, t = 1 data) and ``cond`` anything whose first dimension
is ``B`` (or ``None``).  It predicts one quantity (``"velocity"``, ``"epsilon"``, ``"x1"`` or
``"score"``); :class:`Predictor` converts it through the path to whatever a sampler needs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .paths import PREDICTIONS, Path, Prediction
from .priors import expand_mask

__all__ = ["Predictor"]


class Predictor:
    """``net`` + ``path`` + what ``net`` predicts.

    Args:
        net: ``net(x, t, cond) -> Tensor`` shaped like ``x``.
        path: the path the net was trained on.
        prediction: what ``net`` outputs; defaults to ``path.default_prediction``.
        x1_clip: if set, clamp the clean-data prediction x̂1 to ``[-x1_clip, x1_clip]`` (elementwise)
            and re-derive ε̂ from it before converting, like DDPM's clipped denoising.  On the VP
            path α_t is tiny near t = 0 (0.0066 for the linear schedule), so a small ε̂ error on
            rarely-trained noise becomes a huge x̂1 error; a bound on the data range removes those
            outliers.  ``None`` (default): no clipping.

    Samplers call :meth:`predict` with ``t`` of shape ``[B]``; subclasses (guidance) override
    :meth:`predict_x1_epsilon` to modify the prediction.
    """

    def __init__(self, net: Callable[..., Tensor], path: Path, prediction: Optional[Prediction] = None,
                 x1_clip: Optional[float] = None):
        self.net = net
        self.path = path
        self.prediction: Prediction = prediction or path.default_prediction
        self.x1_clip = x1_clip
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}")

    def raw(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The network's own output at ``(x, t)``."""
        return self.net(x, t, cond)

    def predict(self, x: Tensor, t: Tensor, cond: Any = None, kind: Prediction = "velocity") -> Tensor:
        """The model's prediction of ``kind`` at ``(x, t)``; zero on padding when ``cond`` carries a
        ``"mask"`` (padded sets: see :mod:`energyflow.losses`)."""
        out = self._predict(x, t, cond, kind)
        mask = cond.get("mask") if isinstance(cond, dict) else None
        return out * expand_mask(mask, out) if mask is not None else out

    def _predict(self, x: Tensor, t: Tensor, cond: Any, kind: Prediction) -> Tensor:
        if self.x1_clip is None:
            return self.path.convert(self.raw(x, t, cond), x, t, self.prediction, kind)
        raw = self.raw(x, t, cond)
        x1, _ = self.path.to_x1_epsilon(raw, x, t, self.prediction)
        clipped = self.path.convert(x1.clamp(-self.x1_clip, self.x1_clip), x, t, "x1", kind)
        # Where σ_t = 0 (t = 1) ε̂ cannot be re-derived from x̂1; there x_t is the data itself: no clipping.
        noisy = self.path.coefficients(t).sigma > 1e-6
        if bool(noisy.all()):
            return clipped
        plain = self.path.convert(raw, x, t, self.prediction, kind)
        return torch.where(noisy.reshape((-1,) + (1,) * (x.dim() - 1)), clipped, plain)

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.predict(x, t, cond, "velocity")

    def epsilon(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.predict(x, t, cond, "epsilon")

    def x1(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.predict(x, t, cond, "x1")

    def score(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.predict(x, t, cond, "score")


def as_batch_time(t: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A scalar or ``[B]`` time as a ``[B]`` tensor on ``like``'s device and dtype."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    return t.expand(batch) if t.dim() == 0 else t
