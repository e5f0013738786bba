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

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from energyflow.losses import LossOutput, Objective
from energyflow.models import model_record
from energyflow.nets import MLPEnsemble

from .policy import check_record

__all__ = ["TwinQ", "InSupportCriticLoss"]


class TwinQ(nn.Module):
    """Two Q networks on (normalised state, action); ``forward`` returns both ``[B]`` tensors.

    The network is the core's :class:`energyflow.nets.MLPEnsemble` with two members (``self.body``),
    so a saved critic (:meth:`to_record`) is rebuilt by :func:`energyflow.models.load_model` with no
    RL code: ``body(concat(normalised obs, action))`` is ``[B, 2]``, columns Q1 and Q2.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.body = MLPEnsemble(obs_dim + act_dim, hidden, depth, members=2)

    def forward(self, obs: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        q = self.body(torch.cat([obs, act], dim=-1))
        return q[:, 0], q[:, 1]

    def min_q(self, obs: Tensor, act: Tensor) -> Tensor:
        """min(Q1, Q2) ``[B]``."""
        q1, q2 = self(obs, act)
        return torch.minimum(q1, q2)

    def min_q_groups(self, obs: Tensor, actions: Tensor) -> Tensor:
        """min(Q1, Q2) ``[B, M]`` of M actions per state: ``obs`` [B, o], ``actions`` [B, M, a]."""
        b, m, a = actions.shape
        return self.min_q(obs.repeat_interleave(m, dim=0), actions.reshape(b * m, a)).view(b, m)

    def to_record(self, meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The self-describing model record of ``self.body`` (:func:`energyflow.models.model_record`).

        ``meta`` is merged into the record's meta; the critic's trainer passes the observation
        normalisation (``obs_mean``, ``obs_std``) that its inputs were made with."""
        info = {"role": "twin critic", "input": "concat(normalised observation, action)",
                "output": "[B, 2]: Q1 and Q2 (the critic's value is their minimum)",
                "obs_dim": self.obs_dim, "act_dim": self.act_dim, **(meta or {})}
        return model_record(self.body, meta=info)

    def load_record(self, record: Mapping[str, Any]) -> None:
        """Load the weights of a record written by :meth:`to_record`.

        Raises:
            ValueError: the record holds another network (another class, other constructor
                arguments, or observation / action sizes that differ from this critic's).
        """
        check_record(record, self.body)
        meta = record.get("meta") or {}
        for name in ("obs_dim", "act_dim"):
            if name in meta and meta[name] != getattr(self, name):
                raise ValueError(f"it is a critic with {name}={meta[name]}, this one has {getattr(self, name)}")
        self.body.load_state_dict(record["state_dict"])


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
