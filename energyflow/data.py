"""Batch sources for the trainer: seeded, reproducible, identical on every data-parallel rank.

A batch source has one method, ``sample(batch_size, generator) -> dict[str, Tensor]`` returning
tensors whose first dimension is ``batch_size`` (at least ``"x1"``; optionally ``"cond"`` and
``"energy"``).  The trainer draws the *global* batch with a generator seeded identically on all
ranks and gives each rank a contiguous slice.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol

import torch
from torch import Tensor

__all__ = ["BatchSource", "TensorBatchSource", "FunctionBatchSource"]


class BatchSource(Protocol):
    """Anything with ``sample(batch_size, generator) -> dict[str, Tensor]``."""

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]: ...


class TensorBatchSource:
    """Uniform minibatches (with replacement) from in-memory tensors sharing their first dimension.

    Args:
        tensors: e.g. ``{"x1": data, "cond": states, "energy": precomputed}``; each ``[N, ...]``.
        group_size: if given, each tensor is ``[N, M, ...]`` (``M = group_size`` members per item,
            e.g. the support actions of a state); a batch of ``B`` samples takes ``B / M`` items and
            flattens them to ``[B, ...]``, members of an item consecutive.
    """

    def __init__(self, tensors: Mapping[str, Tensor], group_size: Optional[int] = None):
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must share their first dimension, got {sizes}")
        if "x1" not in tensors:
            raise ValueError("a batch source needs an 'x1' tensor (the data)")
        self.tensors, self.group_size = dict(tensors), group_size
        self.size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        m = self.group_size or 1
        if batch_size % m:
            raise ValueError(f"batch_size {batch_size} is not a multiple of group_size {m}")
        device = next(iter(self.tensors.values())).device
        idx = torch.randint(self.size, (batch_size // m,), generator=generator).to(device)
        out = {}
        for k, v in self.tensors.items():
            v = v[idx]
            out[k] = v.reshape((-1,) + tuple(v.shape[2:])) if self.group_size else v
        return out


class FunctionBatchSource:
    """Batches from a function ``fn(batch_size, generator) -> Tensor`` (x1) or ``-> dict``; e.g. a toy sampler."""

    def __init__(self, fn: Callable[[int, torch.Generator], Tensor | dict[str, Tensor]]):
        self.fn = fn

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        out = self.fn(batch_size, generator)
        return out if isinstance(out, dict) else {"x1": out}
