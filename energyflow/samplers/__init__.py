"""Samplers: ODE (Euler, midpoint, Heun, RK4, adaptive), SDE (Euler–Maruyama, ancestral), DPM-Solver."""
from .base import SampleResult, Sampler
from .dpm import DiffusersSampler, DPMSolverSampler
from .ode import ODE_METHODS, ODESampler
from .sde import AncestralSampler, EulerMaruyamaSampler

__all__ = [
    "SampleResult", "Sampler", "ODESampler", "ODE_METHODS", "EulerMaruyamaSampler",
    "AncestralSampler", "DiffusersSampler", "DPMSolverSampler", "build_sampler",
]


def build_sampler(name: str = "euler", steps: int = 50, **kwargs) -> Sampler:
    """Build a sampler by name: an ODE method (``euler``, ``midpoint``, ``heun``, ``rk4``, ``dopri5``,
    ``dopri8``), ``em`` (Euler–Maruyama), ``ancestral``, or ``dpm`` (DPM-Solver++ via diffusers)."""
    if name in ODE_METHODS:
        return ODESampler(name, steps, **kwargs)
    if name in ("em", "euler_maruyama"):
        return EulerMaruyamaSampler(steps, **kwargs)
    if name == "ancestral":
        return AncestralSampler(steps, **kwargs)
    if name in ("dpm", "dpm_solver"):
        return DPMSolverSampler(steps, **kwargs)
    raise ValueError(f"unknown sampler {name!r}; choose an ODE method {sorted(ODE_METHODS)}, 'em', 'ancestral' or 'dpm'")
