"""DPM-Solver (and other diffusers schedulers) for VP-path models.

diffusers' schedulers are discrete-time.  We hand them ``trained_betas`` derived from *our*
continuous VP schedule, so that their ``alphas_cumprod[k]`` equals α(t_k)² exactly at
t_k = 1 − (k + 1)/N, and we evaluate the model at that t_k.  Any model (velocity, ε, x1, score)
works: its prediction is converted to ε for the scheduler.  A new scheduler is built per call, so
the sampler itself stays stateless.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor

from ..paths import VPPath
from ..predictor import Predictor
from .base import CountingField, SampleResult, Sampler

__all__ = ["DiffusersSampler", "DPMSolverSampler"]


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DPM-Solver sampling uses diffusers' schedulers: pip install 'energyflow[diffusion]' (or diffusers)"
        ) from err
    return diffusers


class DiffusersSampler(Sampler):
    """Sample a VP-path model with a diffusers scheduler (``DPMSolverMultistepScheduler`` by default).

    Args:
        scheduler: the diffusers scheduler class name, e.g. ``"DPMSolverMultistepScheduler"``,
            ``"DDIMScheduler"``, ``"UniPCMultistepScheduler"``.
        steps: number of solver steps (DPM-Solver++(2M) needs ~10–25).
        num_train_timesteps: resolution N of the discretisation of the continuous schedule.
        scheduler_kwargs: passed to the scheduler (e.g. ``{"algorithm_type": "dpmsolver++", "solver_order": 2}``).
    """

    def __init__(self, scheduler: str = "DPMSolverMultistepScheduler", steps: int = 20,
                 num_train_timesteps: int = 1000, scheduler_kwargs: Optional[dict] = None):
        self.scheduler_name, self.steps = scheduler, int(steps)
        self.num_train_timesteps = int(num_train_timesteps)
        self.scheduler_kwargs = dict(scheduler_kwargs or {})

    def build_scheduler(self, path: VPPath):
        diffusers = _require_diffusers()
        n = self.num_train_timesteps
        t_k = 1.0 - torch.arange(1, n + 1, dtype=torch.float64) / n
        t_k = t_k.clamp(min=path.t_min, max=path.t_max)
        abar = path.coefficients(t_k).alpha.square()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        betas = (1.0 - abar / prev).clamp(1e-8, 0.999)
        cls = getattr(diffusers, self.scheduler_name)
        kwargs = dict(num_train_timesteps=n, trained_betas=betas.tolist(), prediction_type="epsilon")
        if "clip_sample" in inspect.signature(cls.__init__).parameters:
            kwargs["clip_sample"] = False  # DDIM/DDPM default to clipping x̂1 to [-1, 1] (an image convention)
        kwargs.update(self.scheduler_kwargs)
        return cls(**kwargs), t_k

    def sample(self, predictor: Predictor, x0: Tensor, cond: Any = None, return_trajectory: bool = False,
               generator: Optional[torch.Generator] = None) -> SampleResult:
        path = predictor.path
        if not isinstance(path, VPPath):
            raise TypeError(f"{self.scheduler_name} needs a VPPath model, got {type(path).__name__}")
        scheduler, t_k = self.build_scheduler(path)
        scheduler.set_timesteps(self.steps, device=x0.device)
        field = CountingField(predictor, cond, kind="epsilon")
        # Only stochastic schedulers (DDPM, DPM-Solver SDE…) take a generator; UniPC's step() rejects it.
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = x0 * scheduler.init_noise_sigma
        traj, times = ([x], []) if return_trajectory else (None, None)
        with torch.no_grad():
            for k in scheduler.timesteps:
                t = float(t_k[int(k)])
                if times is not None:
                    times.append(t)
                eps = field(torch.tensor(t, device=x.device, dtype=x.dtype), scheduler.scale_model_input(x, k))
                x = scheduler.step(eps, k, x, **step_kwargs).prev_sample
                if traj is not None:
                    traj.append(x)
        if times is not None:
            times.append(1.0)
        return SampleResult(x=x, nfe=field.nfe,
                            times=torch.tensor(times, dtype=x.dtype) if times is not None else None,
                            trajectory=torch.stack(traj) if traj is not None else None)

    def __repr__(self) -> str:
        return f"DiffusersSampler(scheduler={self.scheduler_name!r}, steps={self.steps})"


class DPMSolverSampler(DiffusersSampler):
    """DPM-Solver++(2M) (diffusers' ``DPMSolverMultistepScheduler``) for VP models."""

    def __init__(self, steps: int = 20, num_train_timesteps: int = 1000, scheduler_kwargs: Optional[dict] = None):
        super().__init__("DPMSolverMultistepScheduler", steps, num_train_timesteps, scheduler_kwargs)
