"""Behaviour policies for building offline datasets: SAC training (Stable-Baselines3) and a
dependency-free squashed-Gaussian actor that replays the saved weights.

Checkpoints hold the *actor only* (a few hundred KB): enough to roll out stochastic actions, which
is all dataset generation needs.  Stable-Baselines3 is needed to train, not to roll out.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SquashedGaussianActor", "train_sac", "load_actor"]

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


def load_actor(path: str, map_location: str = "cpu") -> tuple[SquashedGaussianActor, dict]:
    """Load an actor checkpoint written by :func:`train_sac`; returns ``(actor, meta)``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no behaviour-policy checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=False)
    meta = state["meta"]
    actor = SquashedGaussianActor(meta["obs_dim"], meta["act_dim"], meta["hidden"], meta["low"], meta["high"])
    actor.load_state_dict(state["actor"])
    return actor.eval(), meta


def _export_actor(model, path: str, meta: dict) -> None:
    from energyflow.runtime import atomic_torch_save

    sd = {k: v.detach().cpu().clone() for k, v in model.policy.actor.state_dict().items()
          if k.startswith(("latent_pi", "mu", "log_std"))}
    space = model.action_space
    full = {**meta, "low": space.low.tolist(), "high": space.high.tolist()}
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
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            return True

    model.learn(total_timesteps=total_steps, callback=Checkpoint())
    return records
