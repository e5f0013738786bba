"""Policy evaluation in vectorised Gymnasium environments (the CORL protocol, ALGORITHMS §6).

``episodes`` environments run in lock-step, seeded ``seed, seed+1, …``; each contributes its first
episode's return.  Actions come from one batched policy call per step.  The D4RL normalised score
is 100·(R − R_random)/(R_expert − R_random).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from energyflow.errors import InputError

__all__ = ["EvalResult", "evaluate_policy"]


@dataclass
class EvalResult:
    """Per-episode ``returns`` and ``normalized`` scores (numpy), their means and stds, and ``lengths``."""

    returns: np.ndarray
    normalized: np.ndarray
    lengths: np.ndarray

    @property
    def score_mean(self) -> float:
        return float(self.normalized.mean())

    @property
    def score_std(self) -> float:
        return float(self.normalized.std())

    def as_dict(self) -> dict[str, float]:
        return {"normalized_score": self.score_mean, "normalized_score_std": self.score_std,
                "return_mean": float(self.returns.mean()), "return_std": float(self.returns.std()),
                "episode_length": float(self.lengths.mean())}


def evaluate_policy(act: Callable[[torch.Tensor], torch.Tensor], env_id: str, episodes: int = 10, seed: int = 0,
                    ref_min: Optional[float] = None, ref_max: Optional[float] = None,
                    device: str | torch.device = "cpu", max_steps: Optional[int] = None) -> EvalResult:
    """Run ``episodes`` episodes of ``act`` (``[B, obs] -> [B, act]`` tensors, already clipped).

    Args:
        act: the batched policy.
        env_id: a Gymnasium id, e.g. ``"Walker2d-v5"``.
        episodes: number of episodes (= parallel environments).
        seed: episode ``i`` resets with ``seed + i``.
        ref_min, ref_max: reference returns for the normalised score (default: D4RL's for the env).
        max_steps: optional cap on steps per episode (tests).
    """
    import gymnasium as gym

    from .datasets import ref_scores_for

    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise InputError(f"evaluation episodes must be an integer >= 1, got {episodes!r}")
    if ref_min is None or ref_max is None:
        try:
            ref_min, ref_max = ref_scores_for(env_id)
        except KeyError:
            raise InputError(f"no reference scores for {env_id} (the dataset stores none and D4RL has none): "
                             f"normalised scores need ref_min_score and ref_max_score in the dataset") from None
    if not (math.isfinite(ref_min) and math.isfinite(ref_max)) or ref_max == ref_min:
        raise InputError(f"reference scores of {env_id} must be two different finite returns (random, expert), "
                         f"got {ref_min!r} and {ref_max!r}")
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(episodes)])
    obs, _ = envs.reset(seed=[seed + i for i in range(episodes)])
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    active = np.ones(episodes, dtype=bool)
    steps = 0
    while active.any() and (max_steps is None or steps < max_steps):
        with torch.no_grad():
            action = act(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        obs, reward, term, trunc, _ = envs.step(action)
        returns += reward * active
        lengths += active
        active &= ~(term | trunc)
        steps += 1
    envs.close()
    normalized = 100.0 * (returns - ref_min) / (ref_max - ref_min)
    return EvalResult(returns=returns, normalized=normalized, lengths=lengths)
