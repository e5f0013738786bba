"""A transformer velocity field over continuous SELFIES sequences (:mod:`domains.molecule.selfies_codec`).

``SequenceField(x, t, cond) -> v`` with ``x`` and ``v`` ``[B, L, V]`` (L token positions, V
vocabulary entries) and ``t`` ``[B]``.  Each position's V values are projected to ``hidden``, a
learned position embedding and the time embedding are added, and a pre-norm transformer encoder
(bidirectional self-attention over the L positions) maps them back to V values per position.  The
output layer starts at zero.

``output`` says what the V values are:

* ``"velocity"``: the flow's velocity itself (the model is trained with the ``velocity`` target);
* ``"x1"``: the clean-data prediction x̂1 = scale·(2·softmax(logits) − 1), the expected one-hot
  under the predicted token probabilities, in the codec's ±scale units (train and sample it with
  ``prediction="x1"``).  Because the minimiser of the squared error is E[x1 | x_t], which for
  one-hot data is exactly such a mixture, this parameterisation loses nothing, keeps every
  prediction on the simplex, and learns far faster than an unconstrained velocity: the
  velocity head spent its capacity on the mixture's geometry and collapsed to the commonest
  token (docs/molecules_denovo.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from energyflow.models import register_model
from energyflow.nets import TimeEmbedding

__all__ = ["SequenceField"]


@register_model("domains.molecule.SequenceField")
class SequenceField(nn.Module):
    """Transformer velocity field ``net(x [B, L, V], t [B], cond=None) -> [B, L, V]`` (module docstring).

    Args:
        vocab_size: ``V``, the size of each position's last dimension.
        max_len: ``L``, the number of positions (the position embedding is ``[L, hidden]``).
        hidden: the transformer's width.
        layers: number of transformer encoder layers.
        heads: attention heads per layer (must divide ``hidden``).
        ff: width of each layer's feed-forward block.
        time_dim: size of the sinusoidal time embedding (even), projected to ``hidden`` by an MLP.
        dropout: dropout inside the transformer layers.
        output: ``"velocity"`` or ``"x1"`` (the simplex parameterisation; module docstring).
        scale: the codec's scale (``"x1"`` only).
    """

    def __init__(self, vocab_size: int, max_len: int, hidden: int = 128, layers: int = 3, heads: int = 4,
                 ff: int = 256, time_dim: int = 64, dropout: float = 0.0, output: str = "velocity",
                 scale: float = 1.0):
        super().__init__()
        if output not in ("velocity", "x1"):
            raise ValueError(f"output must be 'velocity' or 'x1', got {output!r}")
        self.output, self.scale = output, float(scale)
        if hidden % heads:
            raise ValueError(f"heads ({heads}) must divide hidden ({hidden})")
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.sample_shape = (self.max_len, self.vocab_size)  # recorded in model files
        self.inp = nn.Linear(self.vocab_size, hidden)
        self.pos = nn.Parameter(torch.randn(self.max_len, hidden) * 0.02)
        self.time = TimeEmbedding(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=ff, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.vocab_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[object] = None) -> Tensor:
        """Velocity at ``x``.

        Args:
            x: ``[B, L, V]``.
            t: ``[B]`` (or ``[1]`` / a scalar: one time for the whole batch).
            cond: ignored (the field is unconditional); accepted for the trainer's call signature.

        Returns:
            ``[B, L, V]``.
        """
        if x.dim() != 3 or x.shape[1:] != self.sample_shape:
            raise ValueError(f"SequenceField expects x of shape [B, {self.max_len}, {self.vocab_size}], "
                             f"got {list(x.shape)}")
        bsz = x.shape[0]
        t = t.reshape(-1)
        if t.shape[0] > 1 and bool((t == t[:1]).all()):
            t = t[:1]  # one time for the whole batch (samplers): embed it once
        e = self.time_mlp(self.time(t.to(x.dtype)))  # [B or 1, hidden]
        if e.shape[0] not in (1, bsz):
            raise ValueError(f"t has {e.shape[0]} entries for a batch of {bsz}")
        h = self.inp(x) + self.pos[None] + e[:, None, :]  # [B, L, hidden]
        h = self.encoder(h)
        out = self.out(self.norm(h))
        if self.output == "x1":
            return self.scale * (2.0 * torch.softmax(out, dim=-1) - 1.0)
        return out
