"""State-conditioned generative policies: a flow (OT path) or diffusion (VP path) model of a | s.

The network is :class:`energyflow.nets.MLPField` with ``cond = normalised state``; sampling uses the
engine's samplers, so the policy samples *unclipped* actions (what QIPO trains on, see
ALGORITHMS §7) and clips only when acting in the environment or querying the critic.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor, nn

from energyflow.errors import CorruptFileError
from energyflow.files import load_torch
from energyflow.nets import MLPField
from energyflow.paths import build_path
from energyflow.predictor import Predictor
from energyflow.samplers import build_sampler

__all__ = ["GenerativePolicy", "load_weights"]


def load_weights(module: nn.Module, path: str | os.PathLike, what: str, map_location: Any = "cpu") -> nn.Module:
    """Load a ``state_dict`` saved with :func:`energyflow.files.atomic_torch_save` into ``module``.

    The file is read with ``weights_only=True`` (:func:`energyflow.files.load_torch`): a pickle that
    would need code to load is refused and nothing in it runs.

    Raises:
        InputError: ``path`` is missing.
        CorruptFileError: empty, truncated, not a state dict, or weights that do not fit ``module``
            (a file of another network); the message names ``what`` and ``path`` on one line.
        UnsafeFileError: the file holds Python objects beyond tensors and containers.
    """
    state = load_torch(path, what=what, map_location=map_location)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CorruptFileError(f"{what} {os.fspath(path)} holds a {type(state).__name__}, not a state dict of tensors")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise CorruptFileError(f"{what} {os.fspath(path)} does not fit the configured network ({reason})") from None
    return module


class GenerativePolicy(nn.Module):
    """π(a | s) as a conditional flow (``path="ot"``) or diffusion (``path="vp"``) model.

    Args:
        obs_dim, act_dim: sizes.
        path: ``"ot"`` (QIPO-OT) or ``"vp"`` (QIPO-Diff).
        hidden, depth: the MLP.
        sampler: ``{"name": ..., "steps": ...}`` used by :meth:`sample` (default Euler, 10 steps for OT;
            DPM-Solver, 15 steps for VP).
        action_low, action_high: the action box (used by :meth:`act` to clip).
        obs_mean, obs_std: observation normalisation (the network sees normalised states).
        x1_clip: bound on the predicted clean action x̂1 while sampling (see
            :class:`~energyflow.predictor.Predictor`): loose (3× the action box by default) so the
            samples QIPO trains on stay unclipped in the box's neighbourhood, but a VP model's rare
            far outliers (ε̂ errors amplified by 1/α near t = 0) cannot occur.
    """

    def __init__(self, obs_dim: int, act_dim: int, path: str = "ot", hidden: int = 256, depth: int = 3,
                 sampler: Optional[dict] = None, action_low: float = -1.0, action_high: float = 1.0,
                 obs_mean: Optional[Tensor] = None, obs_std: Optional[Tensor] = None,
                 x1_clip: Optional[float] = 3.0):
        super().__init__()
        self.x1_clip = None if x1_clip is None else float(x1_clip) * max(abs(float(action_low)), abs(float(action_high)))
        self.obs_dim, self.act_dim, self.path_name = obs_dim, act_dim, path
        self.net = MLPField(act_dim, hidden=hidden, depth=depth, cond_dim=obs_dim)
        self.path = build_path(path)
        default = {"name": "euler", "steps": 10} if path == "ot" else {"name": "dpm", "steps": 15}
        self.sampler_cfg = {**default, **(sampler or {})}
        self.action_low, self.action_high = float(action_low), float(action_high)
        self.register_buffer("obs_mean", torch.zeros(obs_dim) if obs_mean is None else torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.ones(obs_dim) if obs_std is None else torch.as_tensor(obs_std, dtype=torch.float32))

    def normalize(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The network on actions ``x`` [B, act_dim] at times ``t`` [B] given *normalised* states."""
        return self.net(x, t, cond)

    def predictor(self) -> Predictor:
        return Predictor(self, self.path, x1_clip=self.x1_clip)

    @torch.no_grad()
    def sample(self, obs: Tensor, num: int = 1, generator: Optional[torch.Generator] = None,
               sampler: Optional[dict] = None, predictor: Optional[Predictor] = None) -> Tensor:
        """Unclipped actions ``[B, num, act_dim]`` for raw states ``obs`` [B, obs_dim] (one batched solve).

        ``predictor`` replaces the policy's own (e.g. a gradient-guided one for QGPO)."""
        cfg = {**self.sampler_cfg, **(sampler or {})}
        smp = build_sampler(cfg.pop("name"), **cfg)
        cond = self.normalize(obs).repeat_interleave(num, dim=0)
        x0 = torch.randn(cond.shape[0], self.act_dim, generator=generator,
                         device=generator.device if generator is not None else "cpu").to(obs.device)
        return smp.sample(predictor or self.predictor(), x0, cond).x.view(obs.shape[0], num, self.act_dim)

    def clip(self, actions: Tensor) -> Tensor:
        return actions.clamp(self.action_low, self.action_high)

    @torch.no_grad()
    def act(self, obs: Tensor, generator: Optional[torch.Generator] = None,
            predictor: Optional[Predictor] = None, sampler: Optional[dict] = None) -> Tensor:
        """Clipped actions ``[B, act_dim]`` to execute (``sampler`` overrides the policy's, e.g. fewer steps)."""
        return self.clip(self.sample(obs, 1, generator, sampler=sampler, predictor=predictor)[:, 0])

    def config(self) -> dict[str, Any]:
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "path": self.path_name,
                "hidden": self.net.inp.out_features, "depth": len(self.net.blocks), "sampler": self.sampler_cfg,
                "action_low": self.action_low, "action_high": self.action_high}
