"""An E(3)-equivariant velocity field over molecules: EGNN layers on torch-geometric's ``MessagePassing``.

``EGNNField(x, t, cond) -> v`` with ``x`` ``[B, N, 3]`` (padded, centred coordinates in Å), ``t``
``[B]`` and ``cond`` a dict: ``mask`` ``[B, N]`` (1 real atom, 0 padding), ``atoms`` ``[B, N, F]``,
``bonds`` and ``hops`` ``[B, N, N]`` (see :mod:`domains.molecule.features`).  ``v`` is ``[B, N, 3]``,
zero on padding and with zero mean over each molecule's real atoms.

Equivariance (tested to 1e-5): rotating or reflecting ``x`` rotates or reflects ``v``; translating
``x`` leaves ``v`` unchanged; permuting a molecule's atoms (with its features) permutes ``v``.
Because reflections are included, the field cannot tell a stereocentre from its mirror image: the
model generates both hands (as EGNN-based models do); the evaluation's RMSD is unaffected for
achiral molecules.

Each layer (after Satorras, Hoogeboom & Welling, 2021) computes, over the *full* graph of each
molecule (every ordered pair of real atoms; no radius graph, whose compiled kernels are not
installable everywhere):

    m_ij = φ_e(h_i, h_j, rbf(|x_i − x_j|), e_ij)          e_ij: embedding of (bond type, hops)
    x_i ← x_i + (1 / (n − 1)) Σ_j (x_i − x_j) / (|x_i − x_j| + 1) · φ_x(m_ij)
    h_i ← h_i + φ_h(h_i, Σ_j m_ij)

and the velocity is the total displacement ``x_L − x`` projected onto zero centre of mass.
Messages are aggregated by torch-geometric's pure-torch scatter (``aggr="add"``).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

with warnings.catch_warnings():      # torch-geometric's import touches torch.jit.script (deprecated in torch 2.x)
    warnings.simplefilter("ignore", FutureWarning)
    from torch_geometric.nn import MessagePassing

from energyflow.models import register_model
from energyflow.nets import TimeEmbedding
from energyflow.priors import center_of_mass_free

from .features import ATOM_FEATURES, BOND_TYPES, MAX_HOPS

__all__ = ["EGNNField", "EGNNLayer", "full_graph"]


def full_graph(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every ordered pair of distinct real atoms of each molecule of a padded batch.

    Returns ``(edge_index [2, E], b, i, j)``: node ``n = b · N + i`` of the flattened batch; row 0 of
    ``edge_index`` is the source ``j``, row 1 the target ``i`` (torch-geometric's convention)."""
    bsz, n = mask.shape
    real = mask > 0
    pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=mask.device)[None]
    b, i, j = pairs.nonzero(as_tuple=True)
    edge_index = torch.stack([b * n + j, b * n + i])
    return edge_index, b, i, j


class EGNNLayer(MessagePassing):
    """One E(n)-equivariant message-passing layer (see the module docstring)."""

    def __init__(self, hidden: int, edge_dim: int, rbf: int):
        super().__init__(aggr="add")
        # φ_e's first layer on concat(h_i, h_j, rbf, e_ij), split so that the h parts are computed once
        # per atom rather than once per pair (the pairs outnumber the atoms N − 1 to 1)
        self.edge_target = nn.Linear(hidden, hidden)
        self.edge_source = nn.Linear(hidden, hidden, bias=False)
        self.edge_pair = nn.Linear(rbf + edge_dim, hidden, bias=False)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.coord_mlp[-1].weight)
        nn.init.zeros_(self.coord_mlp[-1].bias)
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.register_buffer("centres", torch.linspace(0.0, 8.0, rbf), persistent=False)
        self.width = 8.0 / max(rbf - 1, 1)

    def forward(self, h: Tensor, x: Tensor, edge_index: Tensor, edge_attr: Tensor, inv_degree: Tensor
                ) -> tuple[Tensor, Tensor]:
        out = self.propagate(edge_index, a=self.edge_target(h), b=self.edge_source(h), x=x, edge_attr=edge_attr)
        agg_m, agg_dx = out[:, :-3], out[:, -3:]
        x = x + agg_dx * inv_degree[:, None]
        h = h + self.node_mlp(torch.cat([self.norm(h), agg_m], dim=-1))
        return h, x

    def message(self, a_i: Tensor, b_j: Tensor, x_i: Tensor, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        diff = x_i - x_j
        dist = diff.square().sum(-1, keepdim=True).clamp_min(1e-12).sqrt()
        rbf = torch.exp(-((dist - self.centres) / self.width).square())
        m = self.edge_out(a_i + b_j + self.edge_pair(torch.cat([rbf, edge_attr], dim=-1)))
        dx = diff / (dist + 1.0) * self.coord_mlp(m)
        return torch.cat([m, dx], dim=-1)


@register_model("domains.molecule.EGNNField")
class EGNNField(nn.Module):
    """E(3)-equivariant velocity field ``net(x [B, N, 3], t [B], cond) -> [B, N, 3]`` (module docstring).

    Args:
        hidden: width of node features and messages.
        layers: number of :class:`EGNNLayer` s.
        time_dim: size of the time embedding added to every atom's input.
        edge_dim: size of the learned embedding of a pair's (bond type, topological distance).
        rbf: number of Gaussian radial basis functions of interatomic distance (0–8 Å).
        atom_features: size of ``cond["atoms"]``' last dimension.
    """

    def __init__(self, hidden: int = 64, layers: int = 4, time_dim: int = 32, edge_dim: int = 16, rbf: int = 16,
                 atom_features: int = ATOM_FEATURES):
        super().__init__()
        self.atom_features = int(atom_features)
        self.time = TimeEmbedding(time_dim)
        self.embed = nn.Linear(self.atom_features + time_dim, hidden)
        self.edge_embed = nn.Embedding(BOND_TYPES * (MAX_HOPS + 1), edge_dim)
        self.layers = nn.ModuleList(EGNNLayer(hidden, edge_dim, rbf) for _ in range(layers))

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Any]) -> Tensor:
        if not isinstance(cond, Mapping) or not {"mask", "atoms", "bonds", "hops"} <= set(cond):
            raise ValueError("EGNNField needs cond = {'mask', 'atoms', 'bonds', 'hops'} (domains.molecule.features)")
        mask, atoms = cond["mask"], cond["atoms"]
        bsz, n, _ = x.shape
        edge_index, b, i, j = full_graph(mask)
        code = cond["bonds"][b, i, j] * (MAX_HOPS + 1) + cond["hops"][b, i, j]
        edge_attr = self.edge_embed(code)
        te = self.time(t.reshape(-1).expand(bsz) if t.numel() == 1 else t)
        h = self.embed(torch.cat([atoms, te[:, None, :].expand(bsz, n, -1)], dim=-1)).reshape(bsz * n, -1)
        degree = (mask.sum(1, keepdim=True) - 1.0).clamp_min(1.0).expand(bsz, n).reshape(-1)
        inv_degree = degree.reciprocal().to(x.dtype)
        x0 = x.reshape(bsz * n, 3)
        pos = x0
        for layer in self.layers:
            h, pos = layer(h, pos, edge_index, edge_attr, inv_degree)
        v = (pos - x0).reshape(bsz, n, 3)
        return center_of_mass_free(v, mask)
