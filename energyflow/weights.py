"""Self-normalised energy weights w = softmax(−β·E), over the batch or within groups.

All computations happen in log space, and the maximum logit is subtracted *before* the
log-sum-exp: the largest weight's shifted logit is exactly 0, so the weights stay normalised (to
1e-12) whatever the energies' magnitude — ±1e30, or ties at the minimum energy.  The effective sample size ``ESS = 1 / Σ w²`` (per group) is the
diagnostic to watch: ESS near 1 means a single sample carries the batch.

Under ``torch.distributed`` (data-parallel training), whole-batch weights can be normalised over
the *global* batch: each rank contributes its local log-sum-exp, so the weights are the ones a
single process would compute on the concatenated batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .energies import check_energies

__all__ = ["EnergyWeights", "energy_weights", "effective_sample_size"]


@dataclass
class EnergyWeights:
    """Normalised weights and their diagnostics.

    Attributes:
        weights: ``[B]``; they sum to 1 over the batch, or to 1 within each group.
        log_weights: ``[B]``; ``log(weights)`` computed stably (``-inf`` for masked samples).
        ess: mean effective sample size per normalisation set (batch or group), a float tensor.
        ess_fraction: ``ess`` divided by the set size (1 = uniform weights, 1/size = one sample).
        num_groups: number of normalisation sets (1 for whole-batch weights, ``G`` for groups).
    """

    weights: Tensor
    log_weights: Tensor
    ess: Tensor
    ess_fraction: Tensor
    num_groups: int


def effective_sample_size(weights: Tensor, dim: int = -1) -> Tensor:
    """``1 / Σ w²`` along ``dim`` for weights that sum to one along ``dim``."""
    return 1.0 / (weights.square().sum(dim))


def energy_weights(
    energies: Tensor,
    beta: float,
    group_size: Optional[int] = None,
    nonfinite: str = "raise",
    global_batch: bool = False,
) -> EnergyWeights:
    """Weights ``softmax(−β·E)`` over the batch, or within consecutive groups of ``group_size``.

    Args:
        energies: ``[B]`` energies (lower preferred).  For RL pass ``-Q``.
        beta: inverse temperature β ≥ 0 (β = 0 gives uniform weights).
        group_size: if given, ``B`` must be a multiple of it and samples ``[g·M, (g+1)·M)`` form
            group ``g`` (e.g. the ``M`` support actions of one state); weights sum to 1 per group.
        nonfinite: ``"raise"`` or ``"mask"`` (see :func:`energyflow.energies.check_energies`).
            A set whose every member is masked raises.
        global_batch: with whole-batch weights under an initialised process group, normalise over
            the concatenation of all ranks' batches (used by the trainer's data-parallel mode).

    Returns:
        :class:`EnergyWeights`.
    """
    if energies.dim() != 1:
        raise ValueError(f"energies must have shape [B], got {tuple(energies.shape)}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    if nonfinite not in ("raise", "mask"):
        raise ValueError(f"nonfinite must be 'raise' or 'mask', got {nonfinite!r}")
    energies = energies.detach()
    if not bool(torch.isfinite(energies).all()):  # one host sync; details only when something is wrong
        energies = check_energies(energies, nonfinite)
    masked = nonfinite == "mask"
    logits = -float(beta) * energies.to(torch.float64)
    if beta == 0:
        # 0 · inf is NaN: masked samples keep -inf, the others are uniform.
        logits = torch.where(torch.isinf(energies), torch.full_like(logits, -float("inf")), torch.zeros_like(logits))

    if group_size is not None:
        if group_size < 1 or energies.numel() % group_size:
            raise ValueError(f"batch of {energies.numel()} is not a multiple of group_size={group_size}")
        grouped = _shift_by_max(logits.view(-1, group_size), dim=1)
        lse = torch.logsumexp(grouped, dim=1, keepdim=True)
        if masked and bool(torch.isinf(lse).any()):
            raise ValueError(f"{int(torch.isinf(lse).sum())} group(s) have no finite energy: cannot normalise their weights")
        log_w = (grouped - lse).reshape(-1)
        w = log_w.exp()
        ess = effective_sample_size(w.view(-1, group_size)).mean()
        size, groups = group_size, grouped.shape[0]
    else:
        sq_term = None
        distributed = global_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:  # shift by the global maximum, so every rank's logits are on one scale
            top = logits.max()
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            logits = logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        else:
            logits = _shift_by_max(logits, dim=0)
        lse = torch.logsumexp(logits, dim=0)
        size = energies.numel()
        if distributed:
            all_lse = [torch.zeros_like(lse) for _ in range(dist.get_world_size())]
            dist.all_gather(all_lse, lse)
            lse = torch.logsumexp(torch.stack(all_lse), dim=0)
            size = size * dist.get_world_size()
            sq_term = True
        if masked and bool(torch.isinf(lse)):
            raise ValueError("every energy in the batch is masked: cannot normalise the weights")
        log_w = logits - lse
        w = log_w.exp()
        sum_sq = w.square().sum()
        if sq_term:
            dist.all_reduce(sum_sq)
        ess = 1.0 / sum_sq
        groups = 1
    dtype = energies.dtype if energies.is_floating_point() else torch.get_default_dtype()
    return EnergyWeights(
        weights=w.to(dtype),
        log_weights=log_w.to(dtype),
        ess=ess.to(dtype),
        ess_fraction=(ess / size).to(dtype),
        num_groups=groups,
    )


def _shift_by_max(logits: Tensor, dim: int) -> Tensor:
    """``logits − max`` along ``dim`` (rows whose maximum is −inf, i.e. all masked, are left as they are).

    After the shift the largest logit is exactly 0 and ``logsumexp`` is in [0, log n], so
    ``logits − logsumexp`` keeps full precision even for |β·E| of 1e30 and for ties at the maximum.
    """
    top = logits.amax(dim=dim, keepdim=True)
    return logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
