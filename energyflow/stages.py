"""Resumable pipeline stages with declared outputs, cached by configuration.

A multi-stage algorithm (behaviour model → support set → critic → policy rounds) is a chain of
:class:`Stage` s.  Each stage's *key* is a hash of its own configuration and of the keys of the
stages it consumes, so changing one setting re-runs that stage and everything downstream of it and
nothing upstream: changing QIPO's β retrains neither the behaviour model nor the critic.

Outputs live in ``<root>/<name>-<key>/``; a stage is complete when its ``done.json`` exists
(written last, atomically), so a run killed mid-stage redoes that stage only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

__all__ = ["Stage", "config_key"]


def config_key(config: Any, upstream: Sequence[str] = ()) -> str:
    """A short stable hash of a JSON-serialisable ``config`` and upstream keys."""
    blob = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Stage:
    """One cached step of a pipeline.

    Args:
        name: the stage's name (``behaviour``, ``critic``…).
        config: everything that determines its output (JSON-serialisable).
        root: the cache folder (shared by runs that should share stages).
        upstream: the stages whose outputs it consumes.

    Usage::

        stage = Stage("critic", cfg, cache_dir, upstream=[behaviour])
        if not stage.done:
            train_critic(..., out_dir=stage.path)   # may checkpoint inside stage.path and resume
            stage.finish({"q_mean": ...})
        critic = load(stage.file("critic.pt"))
    """

    name: str
    config: Any
    root: str
    upstream: Sequence["Stage"] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return config_key(self.config, [u.key for u in self.upstream])

    @property
    def path(self) -> str:
        """The stage's output folder (created on first access)."""
        p = os.path.join(self.root, f"{self.name}-{self.key}")
        if not os.path.isdir(p):
            os.makedirs(p, exist_ok=True)
            with open(os.path.join(p, "config.json"), "w", encoding="utf-8") as f:
                json.dump({"name": self.name, "config": self.config,
                           "upstream": {u.name: u.key for u in self.upstream}}, f, indent=2, sort_keys=True, default=str)
        return p

    def file(self, filename: str) -> str:
        return os.path.join(self.path, filename)

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.root, f"{self.name}-{self.key}", "done.json"))

    @property
    def summary(self) -> dict[str, Any]:
        """What :meth:`finish` recorded (empty if not done)."""
        path = os.path.join(self.root, f"{self.name}-{self.key}", "done.json")
        if not os.path.exists(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def finish(self, summary: Optional[dict[str, Any]] = None) -> None:
        """Mark the stage complete (atomically), recording ``summary``."""
        tmp = self.file(".done.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **(summary or {})}, f, indent=2, default=str)
        os.replace(tmp, self.file("done.json"))

    def run(self, fn: Callable[[str], Optional[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``fn(path)`` unless the stage is done; ``fn``'s return value is the summary."""
        if not self.done:
            start = time.perf_counter()
            summary = fn(self.path) or {}
            summary.setdefault("seconds", round(time.perf_counter() - start, 2))
            self.finish(summary)
        return self.summary

    def clear(self) -> None:
        """Delete the stage's outputs."""
        shutil.rmtree(os.path.join(self.root, f"{self.name}-{self.key}"), ignore_errors=True)
