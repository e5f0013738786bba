"""In-support softmax Q-learning (QGPO's critic, ALGORITHMS §4.2).

For each next state s′, M support actions â′_j ~ μ(· | s′) are drawn once from the behaviour
policy.  The target is

    y = r + γ (1 − terminal) Σ_j softmax_j(α Q̄(s′, â′_j)) Q̄(s′, â′_j)

with Q̄ the Polyak-averaged target of a twin critic (the min of the pair).  ``alpha`` is the target
temperature on the *raw* Q scale (rewards as scaled by the dataset options): α → 0 is the mean
over the support (SARSA-like), α → ∞ the hard max.  Measured on Walker2d (ALGORITHMS §7): α = 1 on
Q ≈ 100–250 over-estimates and makes QIPO collapse; α = 0.1 is stable.  Time-outs do not cut the
bootstrap: only true terminals do.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from energyflow.losses import LossOutput, Objective

__all__ = ["TwinQ", "InSupportCriticLoss"]


def _mlp(inp: int, hidden: int, depth: int) -> nn.Sequential:
    layers, d = [], inp
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, 1))


class TwinQ(nn.Module):
    """Two Q networks on (normalised state, action); ``forward`` returns both ``[B]`` tensors."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.q1 = _mlp(obs_dim + act_dim, hidden, depth)
        self.q2 = _mlp(obs_dim + act_dim, hidden, depth)

    def forward(self, obs: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, act], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def min_q(self, obs: Tensor, act: Tensor) -> Tensor:
        """min(Q1, Q2) ``[B]``."""
        q1, q2 = self(obs, act)
        return torch.minimum(q1, q2)

    def min_q_groups(self, obs: Tensor, actions: Tensor) -> Tensor:
        """min(Q1, Q2) ``[B, M]`` of M actions per state: ``obs`` [B, o], ``actions`` [B, M, a]."""
        b, m, a = actions.shape
        return self.min_q(obs.repeat_interleave(m, dim=0), actions.reshape(b * m, a)).view(b, m)


class InSupportCriticLoss(Objective):
    """Objective for the trainer: batch keys ``obs`` [B,o] (normalised), ``x1`` (actions, clipped),
    ``reward`` [B], ``next_obs`` [B,o], ``terminal`` [B], ``support`` [B,M,a] (clipped actions of μ at
    s′).  It declares ``uses_target``: the trainer passes its EMA model, the Polyak target, as
    ``target=`` (the EMA decay is 1 − τ).

    Metrics: ``loss``, ``q_mean``, ``target_mean`` and ``support_q_spread`` (mean std of Q̄ over the
    support: with ``alpha`` it tells how close the target is to a hard max).
    """

    uses_target = True

    def __init__(self, gamma: float = 0.99, alpha: float = 0.1):
        self.gamma, self.alpha = float(gamma), float(alpha)

    def __call__(self, critic: nn.Module, batch: dict[str, Any], generator: Optional[torch.Generator] = None, *,
                 target: Optional[nn.Module] = None) -> LossOutput:
        if target is None:
            raise ValueError("InSupportCriticLoss needs target= (the trainer passes its EMA model)")
        obs, act, support = batch["obs"], batch["x1"], batch["support"]
        with torch.no_grad():
            q_next = target.min_q_groups(batch["next_obs"], support)
            w = torch.softmax(self.alpha * q_next, dim=1)
            v_next = (w * q_next).sum(1)
            y = batch["reward"] + self.gamma * (1.0 - batch["terminal"]) * v_next
        q1, q2 = critic(obs, act)
        per = (q1 - y).square() + (q2 - y).square()
        loss = per.mean()
        metrics = {"loss": loss.detach(), "q_mean": torch.minimum(q1, q2).mean().detach(),
                   "target_mean": y.mean(), "support_q_spread": q_next.std(1).mean()}
        return LossOutput(loss=loss, per_sample=per.detach(), metrics=metrics)
