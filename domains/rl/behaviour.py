"""Behaviour policies for building offline datasets: SAC training (Stable-Baselines3) and a
dependency-free squashed-Gaussian actor that replays the saved weights.

Checkpoints hold the *actor only* (a few hundred KB): enough to roll out stochastic actions, which
is all dataset generation needs.  Stable-Baselines3 is needed to train, not to roll out.

A checkpoint is a weights-only torch file ``{"actor": state_dict, "meta": {...}}`` whose meta holds
plain Python values only, so it is read with ``torch.load(weights_only=True)``
(:func:`energyflow.files.load_torch`): loading one never runs code.  The Walker2d-v5 checkpoints
that build the default dataset ship inside the package, in ``domains/rl/behaviour_checkpoints/``
(see its README); :func:`resolve_actor_path` finds them by file name.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from energyflow.errors import CorruptFileError, InputError
from energyflow.files import append_jsonl, atomic_torch_save, load_torch

__all__ = ["SquashedGaussianActor", "train_sac", "load_actor", "CHECKPOINT_DIR", "shipped_checkpoints",
           "resolve_actor_path"]

#: The folder of the behaviour checkpoints shipped with the package (package data, so it exists in
#: wheel installs as well as in the source tree).
CHECKPOINT_DIR: Path = Path(__file__).resolve().parent / "behaviour_checkpoints"

# Where the shipped checkpoints lived before they became package data; configs saved by earlier
# runs name them there, and such paths still resolve to the shipped files.
_LEGACY_DIR = ("assets", "behaviour")

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class SquashedGaussianActor(nn.Module):
    """a = tanh(μ(s) + σ(s)·ε) rescaled to the action box: the SAC actor (same layout as SB3's).

    Args:
        obs_dim, act_dim: observation and action sizes.
        hidden: widths of the hidden layers (ReLU).
        low, high: the action box.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256),
                 low: Optional[Sequence[float]] = None, high: Optional[Sequence[float]] = None):
        super().__init__()
        layers, d = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(d, act_dim)
        self.log_std = nn.Linear(d, act_dim)
        self.register_buffer("low", torch.as_tensor(low if low is not None else [-1.0] * act_dim, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high if high is not None else [1.0] * act_dim, dtype=torch.float32))

    def forward(self, obs: Tensor, deterministic: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """Actions ``[B, act_dim]`` for observations ``[B, obs_dim]``."""
        h = self.latent_pi(obs)
        mu = self.mu(h)
        if not deterministic:
            std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
            mu = mu + std * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        a = torch.tanh(mu)
        return self.low + (a + 1.0) * 0.5 * (self.high - self.low)


def shipped_checkpoints() -> dict[str, Path]:
    """The shipped behaviour checkpoints: file name (``walker2d_sac_020k.pt``) → path."""
    if not CHECKPOINT_DIR.is_dir():  # pragma: no cover - a broken install
        return {}
    return {p.name: p for p in sorted(CHECKPOINT_DIR.glob("*.pt"))}


def resolve_actor_path(spec: str | os.PathLike) -> str:
    """The file an actor reference names.

    ``spec`` is a path to a checkpoint (absolute, or relative to the working directory), or the file
    name of a shipped checkpoint (``walker2d_sac_020k.pt``, see :data:`CHECKPOINT_DIR`), which is how
    recipes name them so that they work from any directory and in wheel installs.  A path into the
    former ``assets/behaviour/`` folder that no longer exists resolves to the shipped file of the
    same name.

    Raises:
        InputError: no such file and no shipped checkpoint of that name.
    """
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    head, name = os.path.split(spec)
    shipped = shipped_checkpoints()
    legacy = tuple(Path(head).parts[-2:]) == _LEGACY_DIR
    if name in shipped and (not head or legacy):
        return str(shipped[name])
    names = ", ".join(shipped) or "none"
    raise InputError(f"behaviour-policy checkpoint not found: {spec} (expected a checkpoint file written by "
                     f"'energyflow data train-behaviour', or the name of a shipped one: {names})")


def _checked_meta(meta, path: str) -> dict:
    """The checkpoint's ``meta`` dict, with every field the actor needs checked (one-line errors)."""
    where = f"behaviour-policy checkpoint {path}"
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{where}: key 'meta' must be a dict of plain values, got {type(meta).__name__}")
    for key in ("obs_dim", "act_dim"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
            raise CorruptFileError(f"{where}: meta[{key!r}] must be a positive integer, got {meta.get(key)!r}")
    hidden = meta.get("hidden")
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise CorruptFileError(f"{where}: meta['hidden'] must be a list of positive layer widths, got {hidden!r}")
    for key in ("low", "high"):
        box = meta.get(key)
        if (not isinstance(box, (list, tuple)) or len(box) != meta["act_dim"]
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in box)):
            raise CorruptFileError(f"{where}: meta[{key!r}] must be {meta['act_dim']} finite numbers (the action "
                                   f"box), got {box!r}")
    return meta


def load_actor(path: str | os.PathLike, map_location: str = "cpu") -> tuple[SquashedGaussianActor, dict]:
    """Load an actor checkpoint written by :func:`train_sac`; returns ``(actor, meta)``.

    ``path`` goes through :func:`resolve_actor_path` (a file, or a shipped checkpoint's name).  The
    file is read weights-only (nothing in it can run code) and checked: a missing, truncated or
    foreign file, a missing ``actor``/``meta`` key, a bad meta field or weights that do not fit the
    meta raise an :class:`~energyflow.errors.InputError` naming the file and the key.
    """
    path = resolve_actor_path(path)
    what = "behaviour-policy checkpoint"
    state = load_torch(path, what=what, map_location=map_location)
    if not isinstance(state, dict) or not {"actor", "meta"} <= set(state):
        have = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CorruptFileError(f"{what} {path} must hold the keys 'actor' (a state dict) and 'meta' (a dict); "
                               f"it has {have}")
    meta = _checked_meta(state["meta"], path)
    weights = state["actor"]
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CorruptFileError(f"{what} {path}: key 'actor' must be a state dict (parameter name → tensor)")
    actor = SquashedGaussianActor(meta["obs_dim"], meta["act_dim"], meta["hidden"], meta["low"], meta["high"])
    try:
        actor.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CorruptFileError(f"{what} {path}: key 'actor' does not fit meta (obs_dim {meta['obs_dim']}, act_dim "
                               f"{meta['act_dim']}, hidden {list(meta['hidden'])}): {detail}") from None
    if not all(torch.isfinite(t).all() for t in actor.state_dict().values()):
        raise CorruptFileError(f"{what} {path}: key 'actor' holds NaN or infinite weights")
    return actor.eval(), meta


def _export_actor(model, path: str, meta: dict) -> None:
    """Save SB3's actor as a weights-only checkpoint (plain state dict + plain-Python meta), atomically."""
    sd = {k: v.detach().cpu().clone() for k, v in model.policy.actor.state_dict().items()
          if k.startswith(("latent_pi", "mu", "log_std"))}
    space = model.action_space
    full = {**meta, "low": [float(v) for v in space.low], "high": [float(v) for v in space.high]}
    actor = SquashedGaussianActor(full["obs_dim"], full["act_dim"], full["hidden"], full["low"], full["high"])
    actor.load_state_dict(sd, strict=False)
    atomic_torch_save({"actor": actor.state_dict(), "meta": full}, path)


def train_sac(env_id: str, total_steps: int, out_dir: str, checkpoint_every: int = 25_000, seed: int = 0,
              eval_episodes: int = 5, learning_starts: int = 10_000, num_threads: int = 1) -> list[dict]:
    """Train SAC (Stable-Baselines3 defaults) on a Gymnasium environment, saving the actor every
    ``checkpoint_every`` steps as ``<out_dir>/actor_<steps>.pt`` with its evaluation return.

    Returns the list of checkpoint records (also written to ``<out_dir>/checkpoints.jsonl``).
    """
    try:
        import gymnasium as gym
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("training behaviour policies needs: pip install 'energyflow[rl]'") from err
    torch.set_num_threads(num_threads)
    os.makedirs(out_dir, exist_ok=True)
    env = gym.make(env_id)
    eval_env = gym.make(env_id)
    model = SAC("MlpPolicy", env, seed=seed, learning_starts=learning_starts, verbose=0, device="cpu")
    hidden = [m.out_features for m in model.policy.actor.latent_pi if isinstance(m, nn.Linear)]
    meta = {"env_id": env_id, "obs_dim": int(env.observation_space.shape[0]),
            "act_dim": int(env.action_space.shape[0]), "hidden": hidden, "seed": seed}
    records: list[dict] = []
    log_path = os.path.join(out_dir, "checkpoints.jsonl")
    start = time.time()

    class Checkpoint(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % checkpoint_every == 0:
                returns = []
                for ep in range(eval_episodes):
                    obs, _ = eval_env.reset(seed=10_000 + ep)
                    done, total = False, 0.0
                    while not done:
                        action, _ = model.predict(obs, deterministic=True)
                        obs, r, term, trunc, _ = eval_env.step(action)
                        total += float(r)
                        done = term or trunc
                    returns.append(total)
                path = os.path.join(out_dir, f"actor_{self.num_timesteps}.pt")
                rec = {"steps": self.num_timesteps, "return_mean": float(np.mean(returns)),
                       "return_std": float(np.std(returns)), "seconds": round(time.time() - start, 1), "path": path}
                _export_actor(model, path, {**meta, "steps": self.num_timesteps, "eval_return": rec["return_mean"]})
                records.append(rec)
                append_jsonl(log_path, rec)
            return True

    model.learn(total_timesteps=total_steps, callback=Checkpoint())
    return records
