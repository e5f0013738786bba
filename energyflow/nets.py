"""Small networks with the energyflow signature ``net(x, t, cond)``.

``x: [B, dim]``, ``t: [B]`` in [0, 1] (t = 0 noise, t = 1 data), ``cond: [B, cond_dim]`` or ``None``.
Besides these fields: :class:`MLPEnsemble` (critics, ``net(x)``) and :class:`SquashedGaussianActor`
(a SAC-style stochastic policy, ``net(obs)``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .models import register_model

__all__ = ["TimeEmbedding", "MLPField", "BoundMLPField", "MLPEnergyNet", "PointwiseField", "MLPEnsemble", "SquashedGaussianActor"]


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t (scaled by ``max_period``-style frequencies) followed by an MLP."""

    def __init__(self, dim: int = 64, scale: float = 1000.0):
        super().__init__()
        if dim % 2:
            raise ValueError("time embedding dim must be even")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        args = (t.to(self.freqs.dtype) * self.scale)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([args.sin(), args.cos()], dim=-1).to(t.dtype))


class _ResidualBlock(nn.Module):
    def __init__(self, hidden: int, emb: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        # e is [B, emb] or [1, emb] (shared by the batch): the projection broadcasts.
        z = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(e)
        return h + self.fc2(nn.functional.silu(z))


@register_model("energyflow.MLPField")
class MLPField(nn.Module):
    """Residual MLP ``net(x, t, cond) -> [B, out_dim]`` (``out_dim`` defaults to ``dim``).

    Args:
        dim: data dimension.
        hidden: width of the residual blocks.
        depth: number of residual blocks.
        cond_dim: dimension of the conditioning vector (0 = unconditional).
        time_dim: size of the time embedding.
        out_dim: output size (``dim`` for a vector field, 1 for a scalar energy head).
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, cond_dim: int = 0,
                 time_dim: int = 64, out_dim: Optional[int] = None):
        super().__init__()
        self.dim, self.cond_dim = dim, cond_dim
        self.time = TimeEmbedding(time_dim)
        emb = time_dim + (time_dim if cond_dim else 0)
        self.cond = nn.Sequential(nn.Linear(cond_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)) if cond_dim else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, emb) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim or dim))

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if t.shape[0] > 1 and bool((t == t[:1]).all()):
            # One time for the whole batch (samplers): embed it once and broadcast.
            e = self.time(t[:1])
        else:
            e = self.time(t)
        if self.cond is not None:
            if cond is None:
                raise ValueError("this network is conditional (cond_dim > 0) but cond is None")
            c = self.cond(cond)
            e = torch.cat([e.expand(c.shape[0], -1), c], dim=-1)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        return self.out(h)

    @torch.no_grad()
    def bind(self, cond: Tensor, repeats: int = 1) -> "BoundMLPField":
        """This field with its condition fixed, for sampling ``repeats`` samples per condition.

        ``cond`` is ``[S, cond_dim]``; the result is a field ``f(x, t, cond=None)`` on ``x`` of
        ``[S · repeats, dim]`` (sample ``j`` of condition ``i`` at row ``i · repeats + j``, the
        order of ``cond.repeat_interleave(repeats)``) that equals ``self(x, t,
        cond.repeat_interleave(repeats, 0))`` up to float rounding.  The condition's embedding and
        each block's projection of it are computed once per condition, not once per sample and
        per solver step: about a third of this field's work when it samples many actions per
        state.  The bound weights are a snapshot (train, then bind); no gradients flow through it.
        """
        if self.cond is None:
            raise ValueError("bind() needs a conditional field (cond_dim > 0)")
        return BoundMLPField(self, cond, repeats)


class BoundMLPField(nn.Module):
    """An :class:`MLPField` with a fixed condition (see :meth:`MLPField.bind`): each block's
    ``emb`` Linear, on ``cat(time embedding, cond embedding)``, is split into its time columns
    (applied per call) and its condition columns (applied once per condition, bias included)."""

    def __init__(self, field: MLPField, cond: Tensor, repeats: int):
        super().__init__()
        if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        self.field, self.repeats = field, int(repeats)
        time_dim = field.time.mlp[-1].out_features
        c = field.cond(cond)  # [S, time_dim]
        self.num_conditions = c.shape[0]
        # per block: the condition's projection plus the bias [S, 1, hidden]; the time columns' weight
        self.cond_terms = [(c @ b.emb.weight[:, time_dim:].T + b.emb.bias).unsqueeze(1) for b in field.blocks]
        self.time_weights = [b.emb.weight[:, :time_dim] for b in field.blocks]

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        f, s, m = self.field, self.num_conditions, self.repeats
        if x.shape[0] != s * m:
            raise ValueError(f"x has {x.shape[0]} rows; this bound field samples {m} per condition for {s} "
                             f"conditions ({s * m} rows)")
        shared = t.shape[0] > 1 and bool((t == t[:1]).all())
        e = f.time(t[:1] if shared else t)  # [1 or B, time_dim]
        h = f.inp(x)
        for block, cond_term, w_t in zip(f.blocks, self.cond_terms, self.time_weights):
            z = block.fc1(nn.functional.silu(block.norm(h))).view(s, m, -1)
            z = z + cond_term + (e @ w_t.T).view(1 if shared else s, 1 if shared else m, -1)
            h = h + block.fc2(nn.functional.silu(z.view(s * m, -1)))
        return f.out(h)


@register_model("energyflow.MLPEnergyNet")
class MLPEnergyNet(nn.Module):
    """A time-dependent scalar network ``f(x, t, cond) -> [B]`` (QGPO's intermediate energy)."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, cond_dim: int = 0, time_dim: int = 64):
        super().__init__()
        self.body = MLPField(dim, hidden, depth, cond_dim, time_dim, out_dim=1)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.body(x, t, cond).squeeze(-1)


@register_model("energyflow.PointwiseField")
class PointwiseField(nn.Module):
    """An :class:`MLPField` applied to every element of a set independently: ``x: [B, N, dim]``,
    ``t: [B]`` → ``[B, N, dim]``.  The field of i.i.d. elements (and a baseline for set models);
    ``cond`` may be a dict holding the batch's ``"mask"`` (padded elements are computed, then
    ignored by the loss and zeroed by the predictor).

    Args: as :class:`MLPField` (``cond_dim`` 0: the elements are unconditional).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 64):
        super().__init__()
        self.element_dim = dim
        self.field = MLPField(dim, hidden, depth, 0, time_dim)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[object] = None) -> Tensor:
        b, n = x.shape[0], x.shape[1]
        return self.field(x.reshape(b * n, -1), t.repeat_interleave(n)).reshape(x.shape)


@register_model("energyflow.MLPEnsemble")
class MLPEnsemble(nn.Module):
    """``members`` independent MLPs on the same input: ``x: [B, in_dim] -> [B, members, out_dim]``
    (``[B, members]`` when ``out_dim`` is 1).  Each member is ``depth`` × (Linear → LayerNorm →
    ReLU) then Linear; members are built one after the other, so a seeded ensemble equals the same
    members built separately.  Twin critics (``members=2``) and value ensembles use it.
    """

    def __init__(self, in_dim: int, hidden: int = 256, depth: int = 2, members: int = 2, out_dim: int = 1):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim

        def member() -> nn.Sequential:
            layers: list[nn.Module] = []
            d = in_dim
            for _ in range(depth):
                layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU()]
                d = hidden
            return nn.Sequential(*layers, nn.Linear(d, out_dim))

        self.members = nn.ModuleList(member() for _ in range(members))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.stack([m(x) for m in self.members], dim=1)
        return out.squeeze(-1) if self.out_dim == 1 else out


@register_model("energyflow.SquashedGaussianActor")
class SquashedGaussianActor(nn.Module):
    """A tanh-squashed Gaussian MLP policy (the SAC actor): ``obs: [B, obs_dim] -> action: [B, act_dim]``.

    ``h = latent_pi(obs)`` (``len(hidden)`` × Linear → ReLU), ``u = mu(h) + σ·ε`` with
    ``σ = exp(clamp(log_std(h), -20, 2))`` and ``ε ~ N(0, I)`` (``ε = 0`` when ``deterministic``),
    then ``a = low + (tanh(u) + 1) / 2 · (high − low)``: every action lies in the box ``[low, high]``.
    Parameter names and layout are Stable-Baselines3's (``latent_pi``, ``mu``, ``log_std``), so an SB3
    SAC actor's weights load as they are; the box is held in the buffers ``low`` and ``high``
    (``[act_dim]`` each, saved with the weights).

    Args:
        obs_dim, act_dim: observation and action sizes.
        hidden: widths of the hidden layers, e.g. ``[256, 256]``.
        low, high: the action box, ``act_dim`` floats each (default ``[-1, 1]`` in every dimension).
    """

    LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256),
                 low: Optional[Sequence[float]] = None, high: Optional[Sequence[float]] = None):
        super().__init__()
        layers: list[nn.Module] = []
        d = obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(d, act_dim)
        self.log_std = nn.Linear(d, act_dim)
        for name, box, default in (("low", low, -1.0), ("high", high, 1.0)):
            values = box if box is not None else [default] * act_dim
            self.register_buffer(name, torch.as_tensor(values, dtype=torch.float32))

    def forward(self, obs: Tensor, deterministic: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """Actions ``[B, act_dim]`` for observations ``[B, obs_dim]``: the squashed mean when
        ``deterministic``, else one draw (noise from ``generator`` when given)."""
        h = self.latent_pi(obs)
        mu = self.mu(h)
        if not deterministic:
            std = self.log_std(h).clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp()
            mu = mu + std * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        a = torch.tanh(mu)
        return self.low + (a + 1.0) * 0.5 * (self.high - self.low)
