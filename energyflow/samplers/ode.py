"""ODE samplers: fixed-step Euler, midpoint, Heun, RK4 and adaptive Dormand–Prince, via torchdiffeq."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..predictor import Predictor
from .base import CountingField, SampleResult, Sampler, finish

__all__ = ["ODESampler", "ODE_METHODS"]

# our name -> (torchdiffeq method, order, fixed grid?)
ODE_METHODS: dict[str, tuple[str, int, bool]] = {
    "euler": ("euler", 1, True),
    "midpoint": ("midpoint", 2, True),
    "heun": ("heun2", 2, True),
    "rk4": ("rk4", 4, True),
    "dopri5": ("dopri5", 5, False),
    "dopri8": ("dopri8", 8, False),
}


class ODESampler(Sampler):
    """Integrate the probability-flow ODE dx/dt = v(x, t) from ``t_min`` to ``t_max``.

    Args:
        method: ``"euler"`` (order 1), ``"midpoint"``/``"heun"`` (2), ``"rk4"`` (4), or adaptive
            ``"dopri5"``/``"dopri8"`` (error-controlled by ``rtol``/``atol``).
        steps: number of uniform steps for fixed-grid methods; for adaptive methods, the number of
            intervals of the returned trajectory.
        rtol, atol: tolerances of adaptive methods.

    Cost: ``steps`` × (1, 2, 2, 4) network evaluations for the fixed-grid methods; adaptive
    methods report theirs in ``SampleResult.nfe``.
    """

    def __init__(self, method: str = "euler", steps: int = 50, rtol: float = 1e-5, atol: float = 1e-5):
        if method not in ODE_METHODS:
            raise ValueError(f"unknown ODE method {method!r}; choose one of {sorted(ODE_METHODS)}")
        self.method, self.steps, self.rtol, self.atol = method, int(steps), float(rtol), float(atol)

    def sample(
        self,
        predictor: Predictor,
        x0: Tensor,
        cond: Any = None,
        return_trajectory: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> SampleResult:
        from torchdiffeq import odeint

        path = predictor.path
        grid = path.time_grid(self.steps, device=x0.device, dtype=x0.dtype)
        field = CountingField(predictor, cond)
        name, _, fixed = ODE_METHODS[self.method]
        options = {}
        out_times = grid if return_trajectory else grid[[0, -1]]
        if fixed:
            options = {"grid_constructor": lambda f, y0, t: grid}
        with torch.no_grad():
            kwargs = dict(method=name, options=options)
            if not fixed:
                # step_t: land exactly on t_max, never evaluate the model beyond it.
                kwargs.update(rtol=self.rtol, atol=self.atol, options={"step_t": out_times[-1:]})
            traj = odeint(field, x0, out_times, **kwargs)
            x = finish(predictor, traj[-1], float(grid[-1]), cond, field)
        return SampleResult(
            x=x,
            nfe=field.nfe,
            times=out_times if return_trajectory else None,
            trajectory=traj if return_trajectory else None,
        )

    def __repr__(self) -> str:
        return f"ODESampler(method={self.method!r}, steps={self.steps})"
