"""Process-level helpers: device selection, seeding, threads, data-parallel set-up, atomic saving."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .files import atomic_torch_save  # noqa: F401  (re-exported: where it lived before energyflow.files)

__all__ = ["resolve_device", "seed_everything", "set_threads", "auto_threads", "available_cpus", "resolve_workers",
           "DistInfo", "init_distributed",
           "atomic_torch_save", "is_main_process", "broadcast_object"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` (this rank's GPU under torchrun) if available, else ``cpu``."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(value: Any, key: str) -> int:
    """A worker-process count from a setting: ``"auto"`` (the CPUs this process may use) or an
    integer ≥ 1; anything else is an :class:`~energyflow.errors.InputError` naming ``key``."""
    if value == "auto":
        return available_cpus()
    from .validation import check_integer

    return check_integer(value, key, minimum=1)


def auto_threads() -> int:
    """The ``num_threads: auto`` count.

    ``OMP_NUM_THREADS``, when set, is the user's pin and wins.  Otherwise: the CPUs this process
    may use, shared among the data-parallel processes of this machine (``LOCAL_WORLD_SIZE`` under
    torchrun), at least 1.
    """
    pinned = os.environ.get("OMP_NUM_THREADS", "").strip()
    if pinned.isdigit() and int(pinned) > 0:
        return int(pinned)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)) or 1)
    return max(1, available_cpus() // max(local, 1))


def set_threads(num_threads: int | str | None) -> int:
    """Set torch's intra-op threads: an integer, ``"auto"`` (see :func:`auto_threads`) or ``None``
    (leave torch's default).  Returns the count in effect."""
    if num_threads == "auto":
        num_threads = auto_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()


class DistInfo:
    """Rank and world size of this process (1 process when not launched by torchrun)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
