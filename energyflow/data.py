"""Batch sources for the trainer: seeded, reproducible, identical on every data-parallel rank.

A batch source has one method, ``sample(batch_size, generator) -> dict[str, Tensor]`` returning
tensors whose first dimension is ``batch_size`` (at least ``"x1"``; optionally ``"cond"`` and
``"energy"``).  The trainer draws the *global* batch with a generator seeded identically on all
ranks and gives each rank a contiguous slice.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from torch import Tensor

__all__ = ["BatchSource", "TensorBatchSource", "GroupedMembersSource", "FunctionBatchSource", "DatasetBatchSource",
           "TiltedResamplingSource"]


class BatchSource(Protocol):
    """Anything with ``sample(batch_size, generator) -> dict[str, Tensor]``."""

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]: ...


def draw_item_indices(size: int, batch_size: int, group_size: Optional[int], generator: torch.Generator) -> Tensor:
    """The items of one batch: ``batch_size / group_size`` indices uniform in ``[0, size)`` with
    replacement, from ``generator`` (the one rule every batch source follows, so in-memory and
    loader-backed sources give the same batches)."""
    m = group_size or 1
    if batch_size % m:
        raise ValueError(f"batch_size {batch_size} is not a multiple of group_size {m}")
    return torch.randint(size, (batch_size // m,), generator=generator)


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
        device = next(iter(self.tensors.values())).device
        idx = draw_item_indices(self.size, batch_size, self.group_size, generator).to(device)
        out = {}
        for k, v in self.tensors.items():
            v = v[idx]
            out[k] = v.reshape((-1,) + tuple(v.shape[2:])) if self.group_size else v
        return out


def _first_size(tree: Mapping[str, Any]) -> dict[str, int]:
    sizes = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            sizes.update({f"{k}.{kk}": n for kk, n in _first_size(v).items()})
        else:
            sizes[k] = int(v.shape[0])
    return sizes


def _map_tree(fn: Callable[[Tensor], Tensor], tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _map_tree(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


class GroupedMembersSource:
    """Batches of ``G`` items with ``M`` distinct members each: molecules and ``M`` of their ``K``
    conformers, states and ``M`` of their actions.

    Item tensors (``items``: ``[N, ...]``, nested dicts allowed, e.g. a ``cond`` dict of a graph's
    features and its ``mask``) are shared by an item's members; member tensors (``members``:
    ``[N, K, ...]``, e.g. ``x1`` conformers and their ``energy``) hold ``K ≥ M`` members per item.
    A batch of ``B`` samples draws ``G = B / M`` items uniformly with replacement
    (:func:`draw_item_indices`) and, for each, ``M`` distinct members uniformly without
    replacement; members of one item are consecutive, so the batch is ``G`` groups of ``M``
    (:class:`~energyflow.losses.EnergyWeightedLoss` with ``group_size=M`` softmaxes each group:
    an item's own Boltzmann or Q weights).  Item tensors are repeated for each member.

    With ``member_probs`` (``[N, K]``, each row summing to 1) the ``M`` members are drawn *with*
    replacement in proportion to those probabilities instead: e.g. ``softmax(−βE)`` over each item's
    members, which makes every group an exact sample of the item's tilted member distribution
    (the grouped analogue of :class:`TiltedResamplingSource`: train it with the plain loss).

    Args:
        items: tensors indexed by item, first dimension ``N``.
        members: tensors indexed by item and member, ``[N, K, ...]``; must include ``"x1"``.
        group_size: ``M`` (``1 ≤ M ≤ K``).
        member_probs: optional ``[N, K]`` member probabilities (see above).
    """

    def __init__(self, items: Mapping[str, Any], members: Mapping[str, Tensor], group_size: int,
                 member_probs: Optional[Tensor] = None):
        if "x1" not in members:
            raise ValueError("a grouped source needs an 'x1' member tensor (the data)")
        sizes = {**_first_size(items), **{k: int(v.shape[0]) for k, v in members.items()}}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"items and members must share their first dimension, got {sizes}")
        ks = {k: int(v.shape[1]) for k, v in members.items()}
        if len(set(ks.values())) != 1:
            raise ValueError(f"member tensors must share their second dimension (K), got {ks}")
        self.size, self.num_members = next(iter(sizes.values())), next(iter(ks.values()))
        if not 1 <= int(group_size) <= self.num_members:
            raise ValueError(f"group_size must be in [1, {self.num_members}] (members per item), got {group_size}")
        self.items, self.members, self.group_size = dict(items), dict(members), int(group_size)
        if member_probs is not None:
            member_probs = torch.as_tensor(member_probs, dtype=torch.float64)
            if member_probs.shape != (self.size, self.num_members):
                raise ValueError(f"member_probs must have shape ({self.size}, {self.num_members}), "
                                 f"got {tuple(member_probs.shape)}")
            if not bool(torch.isfinite(member_probs).all()) or bool((member_probs < 0).any()) or \
                    not torch.allclose(member_probs.sum(1), torch.ones(self.size, dtype=torch.float64), atol=1e-6):
                raise ValueError("member_probs must be finite, non-negative, and sum to 1 over each item's members")
        self.member_probs = member_probs

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        m = self.group_size
        idx = draw_item_indices(self.size, batch_size, m, generator)
        if self.member_probs is None:
            pick = torch.rand(idx.shape[0], self.num_members, generator=generator).argsort(dim=1)[:, :m]
        else:
            pick = torch.multinomial(self.member_probs[idx], m, replacement=True, generator=generator)
        device = self.members["x1"].device
        idx, pick = idx.to(device), pick.to(device)
        out = _map_tree(lambda v: v[idx].repeat_interleave(m, dim=0), self.items)
        for k, v in self.members.items():
            out[k] = v[idx[:, None], pick].reshape((-1,) + tuple(v.shape[2:]))
        return out


class TiltedResamplingSource:
    """Batches drawn from a finite data set *in proportion to* exp(−β·E): the tilted empirical
    distribution itself, for plain flow matching / denoising.

    Energy-weighted training (:class:`~energyflow.losses.EnergyWeightedLoss`) draws uniform batches
    and weights each sample by softmax(−βE) over the batch; its minimiser is the same tilted
    distribution, but when the tilt is sharp most of a batch gets ~zero weight (the batch's effective
    sample size is small) and the gradient is noisy.  When the data set is finite and its energies
    are known in advance (computed once, as EFM also needs them), sampling the items with
    probabilities ``softmax(−βE)`` over the *whole* data set gives every batch sample unit weight:
    the same target, an unbiased estimator of the tilted loss, and no weight variance within a batch.
    Duplicates replace weights, so the data set's own effective sample size
    (:attr:`dataset_ess`) bounds what the model can learn, exactly as for weighting.

    Indices are drawn with replacement from the trainer's seeded generator (identical on every
    data-parallel rank; exact resume).

    Args:
        tensors: ``{"x1": data, ...}``, each ``[N, ...]``.
        energies: ``[N]`` energies of the items (lower preferred).
        beta: inverse temperature β ≥ 0.
    """

    def __init__(self, tensors: Mapping[str, Tensor], energies: Tensor, beta: float):
        from .weights import energy_weights

        self.source = TensorBatchSource(tensors)
        if energies.shape != (self.source.size,):
            raise ValueError(f"energies must have shape ({self.source.size},), got {tuple(energies.shape)}")
        w = energy_weights(energies.double().cpu(), beta)
        self.probs = w.weights
        self.dataset_ess = float(w.ess)
        self.size = self.source.size

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        idx = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)
        device = next(iter(self.source.tensors.values())).device
        return {k: v[idx.to(device)] for k, v in self.source.tensors.items()}


class FunctionBatchSource:
    """Batches from a function ``fn(batch_size, generator) -> Tensor`` (x1) or ``-> dict``; e.g. a toy sampler."""

    def __init__(self, fn: Callable[[int, torch.Generator], Tensor | dict[str, Tensor]]):
        self.fn = fn

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        out = self.fn(batch_size, generator)
        return out if isinstance(out, dict) else {"x1": out}


class _IndexChunks:
    """A DataLoader batch sampler that yields the current batch's indices in chunks."""

    def __init__(self, chunk: int):
        self.indices: list[int] = []
        self.chunk = chunk

    def __iter__(self):
        for i in range(0, len(self.indices), self.chunk):
            yield self.indices[i:i + self.chunk]

    def __len__(self) -> int:
        return (len(self.indices) + self.chunk - 1) // self.chunk


class DatasetBatchSource:
    """Batches from a ``torch.utils.data.Dataset`` (random access; it may be larger than memory),
    loaded by a ``DataLoader`` with worker processes.

    The indices of a batch are drawn exactly as :class:`TensorBatchSource` draws them (uniform,
    with replacement, from the trainer's seeded generator), so batches are identical on every
    data-parallel rank, a resumed run continues exactly, and the same data gives the same batches
    as a :class:`TensorBatchSource` of it.  Workers load the items of each batch in parallel
    (``chunk`` items per task, in order); they persist between batches.

    Args:
        dataset: ``dataset[i]`` returns a dict of tensors (at least ``"x1"``), or a tensor (``x1``).
        num_workers: loader processes (0: load in this process).
        chunk: items per worker task (default: an even share of the batch per worker).
        collate_fn: how to stack items (default: ``torch.utils.data.default_collate``); padded sets
            need a collate that pads and returns a ``"mask"``.
        group_size: as for :class:`TensorBatchSource` (each item then holds ``M`` members).
        loader_kwargs: more ``DataLoader`` arguments (``pin_memory``, ``multiprocessing_context``...).
    """

    def __init__(self, dataset, num_workers: int = 0, chunk: Optional[int] = None,
                 collate_fn: Optional[Callable] = None, group_size: Optional[int] = None, **loader_kwargs):
        from torch.utils.data import DataLoader, default_collate

        if not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError("DatasetBatchSource needs a non-empty map-style dataset (with __len__ and __getitem__)")
        self.dataset, self.group_size, self.num_workers = dataset, group_size, int(num_workers)
        self.size = len(dataset)
        self._chunks = _IndexChunks(chunk or 0)
        self._chunk = chunk
        self._loader = DataLoader(dataset, batch_sampler=self._chunks, num_workers=self.num_workers,
                                  collate_fn=collate_fn or default_collate,
                                  persistent_workers=self.num_workers > 0, **loader_kwargs)

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        idx = draw_item_indices(self.size, batch_size, self.group_size, generator)
        items = idx.shape[0]
        self._chunks.indices = idx.tolist()
        self._chunks.chunk = self._chunk or max(1, -(-items // max(self.num_workers, 1)))
        parts = [p if isinstance(p, dict) else {"x1": p} for p in self._loader]
        out = _concat(parts)
        if "x1" not in out:
            raise ValueError("dataset items must hold an 'x1' entry (the data)")
        if self.group_size:
            out = {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in out.items()}
        return out


def _concat(parts: list) -> Any:
    """Concatenate collated chunks along the batch dimension (dicts of tensors, nested)."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    return torch.cat(parts)
