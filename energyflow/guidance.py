"""Guided sampling: the baselines that energy-weighted training makes unnecessary.

Gradient guidance (:class:`EnergyGuidedPredictor`, :class:`CEPGuidedPredictor`) and
classifier-free guidance (:class:`ClassifierFreeGuidancePredictor`).

Both predictors add a correction Δ(x, t) to the model's score, ∇log q_t ≈ ∇log p_t + Δ, and
convert it to velocity with the path's coefficients:

    v_q = v_p + c(t) · Δ,      c(t) = σ_t (α̇_t σ_t / α_t − σ̇_t)

(c(t) = (1 − t)/t on the OT path).  c diverges where α_t → 0, so it is evaluated at
``max(t, min_time)``.  Each step costs one extra backward pass, through the energy (and the
network when the energy is evaluated at x̂1) or through QGPO's energy network.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .energies import Energy
from .paths import _bc
from .predictor import Predictor

__all__ = ["EnergyGuidedPredictor", "CEPGuidedPredictor", "ClassifierFreeGuidancePredictor"]


class _ScoreCorrectedPredictor(Predictor):
    def __init__(self, base: Predictor, min_time: float = 0.01):
        super().__init__(base.net, base.path, base.prediction)
        self.base, self.min_time = base, float(min_time)

    def correction(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, x: Tensor, t: Tensor, cond: Any = None, kind: str = "velocity") -> Tensor:
        v = self.base.predict(x, t, cond, "velocity")
        c = self.path.coefficients(t.clamp_min(self.min_time))
        coef = c.sigma * (c.d_alpha * c.sigma / c.alpha - c.d_sigma)
        v = v + _bc(coef, x) * self.correction(x, t, cond)
        return self.path.convert(v, x, t, "velocity", kind)


class EnergyGuidedPredictor(_ScoreCorrectedPredictor):
    """Energy-gradient guidance: Δ = −β ∇_x E(·), with E evaluated at x̂1(x_t) or at x_t.

    Args:
        base: the unguided model.
        energy: a *differentiable* energy of data.
        beta: guidance strength (β of the tilted target).
        at: ``"x1"`` (default; the gradient flows through the network's x̂1, as in DPS) or ``"xt"``
            (the energy of the noisy state; cheaper and cruder).
        min_time: the smallest t at which the coefficient c(t) is evaluated.
    """

    def __init__(self, base: Predictor, energy: Energy, beta: float, at: str = "x1", min_time: float = 0.01):
        if not energy.differentiable:
            raise TypeError(f"gradient guidance needs a differentiable energy; {type(energy).__name__} is a black box "
                            "(use energy-weighted training instead)")
        if at not in ("x1", "xt"):
            raise ValueError(f"at must be 'x1' or 'xt', got {at!r}")
        super().__init__(base, min_time)
        self.energy, self.beta, self.at = energy, float(beta), at

    def correction(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            point = self.base.predict(xg, t, cond, "x1") if self.at == "x1" else xg
            (grad,) = torch.autograd.grad(self.energy(point, cond).sum(), xg)
        return -self.beta * grad


class CEPGuidedPredictor(_ScoreCorrectedPredictor):
    """QGPO-style guidance with a learned time-dependent energy f(x_t, t, cond) (see
    :class:`~energyflow.losses.ContrastiveEnergyLoss`): Δ = scale · ∇_x f.

    Args:
        base: the unguided model.
        energy_net: ``f(x, t, cond) -> [B]`` trained with the contrastive loss at the target β.
        scale: guidance scale (1 recovers the tilted target when f is exact).
        min_time: the smallest t at which the coefficient c(t) is evaluated.
    """

    def __init__(self, base: Predictor, energy_net: Callable[..., Tensor], scale: float = 1.0, min_time: float = 0.01):
        super().__init__(base, min_time)
        self.energy_net, self.scale = energy_net, float(scale)

    def correction(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energy_net(xg, t, cond).sum(), xg)
        return self.scale * grad


class ClassifierFreeGuidancePredictor(Predictor):
    """Classifier-free guidance (Ho & Salimans): ``pred = pred_∅ + w · (pred_c − pred_∅)``.

    ``base`` is a conditional model trained with label dropout, so that it also models p(x) under
    the "no condition" input.  On an affine path velocity, ε and score are affine in each other with
    an ``x`` term whose coefficient does not depend on the model, so the combination is the same in
    every parameterisation; it is formed in the model's own one, then converted.

    At ``w = 1`` this is the conditional model p(x | c).  For ``w ≠ 1`` its score at t = 1 is that of
    p(x)·p(c | x)^w, but at intermediate t it is *not* the score of the tilted path q_t (the noised
    tilt is not the tilt of the noised density), so the samples do not follow p(x)·p(c | x)^w: the
    inexactness that energy-weighted training avoids.

    Args:
        base: the conditional model.
        scale: the guidance scale ``w`` (1: no guidance).
        null_cond: ``null_cond(cond)`` gives the "no condition" input for a batch's ``cond``; the
            default replaces every entry of a tensor ``cond`` by ``-1`` (the null label of
            :class:`~energyflow.image_nets.UNetField`).

    A tensor ``cond`` costs one network call per step on a doubled batch; other conditions, two calls.
    """

    def __init__(self, base: Predictor, scale: float, null_cond: Optional[Callable[[Any], Any]] = None):
        super().__init__(base.net, base.path, base.prediction, base.x1_clip)
        self.base, self.scale = base, float(scale)
        self.null_cond = null_cond or (lambda c: torch.full_like(c, -1))

    def raw(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition (e.g. the target labels [B])")
        null = self.null_cond(cond)
        if isinstance(cond, Tensor) and isinstance(null, Tensor):
            both = self.base.raw(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
            pred_c, pred_u = both.chunk(2)
        else:
            pred_c, pred_u = self.base.raw(x, t, cond), self.base.raw(x, t, null)
        return pred_u + self.scale * (pred_c - pred_u)
