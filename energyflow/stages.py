"""Resumable pipeline stages with declared outputs, cached by configuration.

A multi-stage algorithm (behaviour model → support set → critic → policy rounds) is a chain of
:class:`Stage` s.  Each stage's *key* is a hash of its own configuration and of the keys of the
stages it consumes, so changing one setting re-runs that stage and everything downstream of it and
nothing upstream: changing QIPO's β retrains neither the behaviour model nor the critic.  The
configuration must hold everything that changes the output, including a fingerprint of the data's
*contents* (see :func:`fingerprint`), never just a dataset's name.

Outputs live in ``<root>/<name>-<key>/``; a stage is complete when its ``done.json`` exists
(written last, atomically), so a run killed mid-stage redoes (or resumes) that stage only.
Runs that share a cache take a per-stage file lock while they work on a stage, so two runs never
train the same stage at once: the second waits, then reads the first one's result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import CorruptFileError, InputError
from .files import read_json, write_json

__all__ = ["Stage", "config_key", "fingerprint"]


def _canonical(config: Any, where: str = "config") -> Any:
    """A JSON-ready copy of ``config``; refuses values whose text would not identify them."""
    if isinstance(config, dict):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(config)]
    if isinstance(config, float) and not math.isfinite(config):
        return repr(config)
    if config is None or isinstance(config, (bool, int, float, str)):
        return config
    if hasattr(config, "item") and getattr(config, "ndim", 1) == 0:  # numpy / torch scalars
        return config.item()
    text = repr(config)
    if " at 0x" in text:  # a default object repr: differs between processes, would never hit the cache
        raise InputError(f"{where} of type {type(config).__name__} has no stable description for a cache key "
                         f"(give it a __repr__ that states its parameters)")
    return {"__repr__": text, "__type__": f"{type(config).__module__}.{type(config).__qualname__}"}


def config_key(config: Any, upstream: Sequence[str] = ()) -> str:
    """A short stable hash (16 hex digits) of ``config`` and the upstream keys.

    Dicts are hashed with sorted keys, so their order does not matter; any change of a value
    (or of a nested value) changes the key.
    """
    blob = json.dumps({"config": _canonical(config), "upstream": list(upstream)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(*arrays: Any, chunk: int = 1 << 24) -> str:
    """A content hash of tensors / numpy arrays / bytes (shapes, dtypes and bytes): use it in a
    stage's config so that the same name with other contents never reuses a stale stage."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, (bytes, bytearray)):
            h.update(b"bytes")
            h.update(a)
            continue
        if hasattr(a, "detach"):  # torch tensor
            a = a.detach().cpu().contiguous().numpy()
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        flat = a.reshape(-1).view(np.uint8)
        for i in range(0, flat.size, chunk):
            h.update(flat[i:i + chunk].tobytes())
    return h.hexdigest()[:16]


@dataclass
class Stage:
    """One cached step of a pipeline.

    Args:
        name: the stage's name (``behaviour``, ``critic``…).
        config: everything that determines its output (JSON-serialisable; data by content fingerprint).
        root: the cache folder (shared by runs that should share stages).
        upstream: the stages whose outputs it consumes.

    Usage::

        stage = Stage("critic", cfg, cache_dir, upstream=[behaviour])
        summary = stage.run(lambda out_dir: train_critic(..., out_dir=out_dir))  # locked, once
        critic = load_torch(stage.file("critic.pt"))

    Code that cannot use :meth:`run` (a chain of rounds that may be continued) holds
    ``with stage.lock():`` while it reads and extends the stage's files.
    """

    name: str
    config: Any
    root: str
    upstream: Sequence["Stage"] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return config_key(self.config, [u.key for u in self.upstream])

    @property
    def folder(self) -> str:
        """The stage's output folder (not created)."""
        return os.path.join(self.root, f"{self.name}-{self.key}")

    @property
    def path(self) -> str:
        """The stage's output folder (created, with its ``config.json``, on first access)."""
        p = self.folder
        if not os.path.isfile(os.path.join(p, "config.json")):
            os.makedirs(p, exist_ok=True)
            write_json({"name": self.name, "config": _canonical(self.config),
                        "upstream": {u.name: u.key for u in self.upstream}}, os.path.join(p, "config.json"))
        return p

    def file(self, filename: str) -> str:
        return os.path.join(self.path, filename)

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.folder, "done.json"))

    @property
    def summary(self) -> dict[str, Any]:
        """What :meth:`finish` recorded (empty if not done)."""
        path = os.path.join(self.folder, "done.json")
        if not os.path.exists(path):
            return {}
        try:
            return read_json(path, what=f"stage marker of {self.name}")
        except CorruptFileError as err:
            raise CorruptFileError(f"{err}; delete {self.folder} to redo the stage") from None

    def finish(self, summary: Optional[dict[str, Any]] = None) -> None:
        """Mark the stage complete (atomically), recording ``summary``."""
        write_json({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **(summary or {})}, self.file("done.json"),
                   sort_keys=False, default=str)

    @contextlib.contextmanager
    def lock(self, poll_message_after: float = 1.0) -> Iterator[None]:
        """Hold this stage's file lock (``<root>/.<name>-<key>.lock``); waits for another holder.

        Re-entrant within a process.  The lock file stays (deleting lock files races); it is empty.
        """
        from filelock import FileLock, Timeout

        os.makedirs(self.root, exist_ok=True)
        lock_path = os.path.abspath(os.path.join(self.root, f".{self.name}-{self.key}.lock"))
        lock = _LOCKS.get(lock_path) or _LOCKS.setdefault(lock_path, FileLock(lock_path))
        try:
            lock.acquire(timeout=poll_message_after)
        except Timeout:
            print(f"waiting for another run to finish stage {self.name}-{self.key} …", file=sys.stderr, flush=True)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def run(self, fn: Callable[[str], Optional[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``fn(path)`` under the stage's lock unless the stage is done; ``fn``'s return value is
        the summary.  A run that waited for another one finds the stage done and only reads it.

        Under ``torchrun`` (an initialised process group) every rank calls ``run`` and every rank
        runs ``fn`` (data-parallel training needs them all): rank 0 takes the lock, decides and
        tells the others, and alone writes (``fn`` should write only where
        :func:`energyflow.runtime.is_main_process`); it marks the stage done.
        """
        import torch.distributed as dist

        from .runtime import broadcast_object

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if self.done:
                return self.summary
            with self.lock():
                if not self.done:
                    self._run_and_finish(fn, self.path)
            return self.summary
        main = dist.get_rank() == 0
        with self.lock() if main else contextlib.nullcontext():
            todo = broadcast_object(main and not self.done)
            if todo:
                folder = self.path if main else self.folder
                if main:
                    self._run_and_finish(fn, folder)
                else:
                    fn(folder)
        dist.barrier()
        return self.summary

    def _run_and_finish(self, fn: Callable[[str], Optional[dict[str, Any]]], folder: str) -> None:
        start = time.perf_counter()
        summary = fn(folder) or {}
        summary.setdefault("seconds", round(time.perf_counter() - start, 2))
        self.finish(summary)

    def clear(self) -> None:
        """Delete the stage's outputs."""
        with self.lock():
            shutil.rmtree(self.folder, ignore_errors=True)


_LOCKS: dict[str, Any] = {}
