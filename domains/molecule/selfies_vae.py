"""A small variational autoencoder over SELFIES token sequences, whose latent space the de novo flow models.

``SelfiesVAE`` maps token indices ``[B, L]`` (:class:`~domains.molecule.selfies_codec.SelfiesCodec`)
to a Gaussian posterior over ``z`` ``[B, latent]`` with a GRU encoder, and decodes ``z`` back to
tokens with an autoregressive GRU decoder (teacher forcing in training, greedy argmax at sampling).
An autoregressive decoder learns SELFIES' grammar (a token's meaning depends on those before it:
branch and ring tokens consume the next ones as sizes), which a model predicting all positions at
once could not; every decoded sequence is still a valid molecule, because every SELFIES string is.

Training (:class:`VAEObjective`): the reconstruction cross-entropy, summed over the L positions, plus
``kl_weight`` × the KL divergence of the posterior from N(0, I), summed over the latent dimensions
(a β-VAE with β < 1 keeps reconstructions exact on a small molecule set while the KL term keeps
the latent space smooth).  The posterior noise is drawn in :meth:`VAEObjective.prepare`, so runs
are deterministic under the trainer's seeded generator.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from energyflow.losses import LossOutput, Objective
from energyflow.models import register_model

__all__ = ["SelfiesVAE", "VAEObjective"]


@register_model("domains.molecule.SelfiesVAE")
class SelfiesVAE(nn.Module):
    """GRU encoder / autoregressive GRU decoder over token sequences (module docstring).

    Args:
        vocab_size: ``V`` tokens; index 0 is ``[nop]`` (padding).
        max_len: ``L`` positions.
        embed: token embedding size.
        hidden: GRU width (encoder and decoder).
        latent: size of ``z``.
    """

    def __init__(self, vocab_size: int, max_len: int, embed: int = 64, hidden: int = 192, latent: int = 32):
        super().__init__()
        self.vocab_size, self.max_len, self.latent = int(vocab_size), int(max_len), int(latent)
        self.embedding = nn.Embedding(self.vocab_size + 1, embed)   # + a start token, index V
        self.encoder = nn.GRU(embed, hidden, batch_first=True)
        self.to_posterior = nn.Linear(hidden, 2 * self.latent)
        self.to_h0 = nn.Linear(self.latent, hidden)
        self.decoder = nn.GRU(embed + self.latent, hidden, batch_first=True)
        self.head = nn.Linear(hidden, self.vocab_size)

    def encode(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance ``[B, latent]`` each, of tokens ``[B, L]``."""
        _, h = self.encoder(self.embedding(tokens))
        mu, logvar = self.to_posterior(h[-1]).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)

    def _start(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return torch.full((z.shape[0], 1), self.vocab_size, dtype=torch.long, device=z.device), \
            torch.tanh(self.to_h0(z))[None]

    def decode_logits(self, z: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, L, V]`` of ``tokens`` ``[B, L]`` given ``z`` ``[B, latent]``."""
        start, h0 = self._start(z)
        prev = torch.cat([start, tokens[:, :-1]], dim=1)
        inp = torch.cat([self.embedding(prev), z[:, None, :].expand(-1, tokens.shape[1], -1)], dim=-1)
        out, _ = self.decoder(inp, h0)
        return self.head(out)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Greedy (argmax) tokens ``[B, L]`` of latents ``z`` ``[B, latent]``, the whole batch at once."""
        tok, h = self._start(z)
        out = []
        for _ in range(self.max_len):
            step, h = self.decoder(torch.cat([self.embedding(tok), z[:, None, :]], dim=-1), h)
            tok = self.head(step).argmax(-1)
            out.append(tok)
        return torch.cat(out, dim=1)

    def forward(self, tokens: Tensor, eps: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [B, L, V], mu, logvar)``; ``z = mu + exp(logvar / 2)·eps`` (``eps=None``: z = mu)."""
        mu, logvar = self.encode(tokens)
        z = mu if eps is None else mu + (0.5 * logvar).exp() * eps
        return self.decode_logits(z, tokens), mu, logvar


class VAEObjective(Objective):
    """Reconstruction cross-entropy (summed over positions) + ``kl_weight``·KL (summed over dimensions),
    averaged over the batch of token indices ``batch["x1"]`` ``[B, L]`` (the data).  Metrics: ``loss``, ``recon``, ``kl`` and
    ``token_accuracy`` (teacher-forced)."""

    def __init__(self, latent: int, kl_weight: float = 0.1):
        self.latent, self.kl_weight = int(latent), float(kl_weight)

    def prepare(self, batch: dict[str, Any], generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        if "eps" in batch:
            return batch
        tokens = batch["x1"]
        eps = torch.randn(tokens.shape[0], self.latent, generator=generator, device=tokens.device)
        return {**batch, "eps": eps}

    def __call__(self, net: Any, batch: dict[str, Any], generator: Optional[torch.Generator] = None,
                 *, target: Any = None) -> LossOutput:
        tokens = batch["x1"]
        eps = batch["eps"] if "eps" in batch else torch.randn(tokens.shape[0], self.latent, generator=generator)
        logits, mu, logvar = net(tokens, eps.to(tokens.device))
        recon = nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").sum(1)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)
        per = recon + self.kl_weight * kl
        loss = per.mean()
        accuracy = (logits.argmax(-1) == tokens).float().mean()
        return LossOutput(loss=loss, per_sample=per.detach(),
                          metrics={"loss": loss.detach(), "recon": recon.mean().detach(), "kl": kl.mean().detach(),
                                   "token_accuracy": accuracy.detach()})
