"""The experiment interface a recipe instantiates, and helpers shared by all domains.

A recipe (Hydra YAML) has an ``experiment`` node with a ``_target_`` naming an
:class:`Experiment` subclass whose constructor arguments are the node's other keys.
``energyflow run`` builds it and calls :meth:`Experiment.run` with a fresh run directory;
``energyflow sample`` and ``energyflow eval`` rebuild it from the run directory's saved
``config.yaml`` and call :meth:`Experiment.sample` / :meth:`Experiment.evaluate`.
"""
from __future__ import annotations

import abc
import json
import os
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .files import load_torch, write_json

__all__ = ["Experiment", "save_model", "load_model_state", "write_json"]


class Experiment(abc.ABC):
    """A runnable recipe.

    Subclasses train and evaluate in :meth:`run`, writing everything under ``run_dir``
    (checkpoints, ``metrics.jsonl``, tensorboard logs, figures, ``results.json``).

    Attributes:
        supports_distributed: whether :meth:`run` may be called on every rank of a ``torchrun``
            launch (``torchrun --nproc_per_node K -m energyflow run RECIPE``): the process group is
            initialised before :meth:`run`, stages train data-parallel (see :meth:`Stage.run
            <energyflow.stages.Stage.run>`), only rank 0 writes and evaluates, and the other ranks
            return ``{}``.  Experiments that do not say so are refused under torchrun.
    """

    supports_distributed: bool = False

    @abc.abstractmethod
    def run(self, run_dir: str) -> dict[str, Any]:
        """Train and evaluate; return the headline results (also written to ``results.json``)."""

    def evaluate(self, run_dir: str) -> dict[str, Any]:
        """Re-evaluate the models saved in ``run_dir``."""
        raise NotImplementedError(f"{type(self).__name__} has no standalone evaluation")

    def sample(self, run_dir: str, num_samples: int, model: Optional[str] = None,
               sampler: Optional[dict[str, Any]] = None, seed: int = 0) -> Tensor:
        """Draw ``num_samples`` from the saved model ``model`` of ``run_dir``."""
        raise NotImplementedError(f"{type(self).__name__} does not support sampling")

    def models(self, run_dir: str) -> list[str]:
        """Names of the models saved in ``run_dir/models``."""
        folder = os.path.join(run_dir, "models")
        return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []


def save_model(net: nn.Module, run_dir: str, name: str, meta: Optional[dict[str, Any]] = None, *,
               path: Any = None, prediction: Optional[str] = None) -> str:
    """Save ``net`` (atomically) as ``run_dir/models/<name>.pt``: a self-describing model file
    (:mod:`energyflow.models`) that :func:`energyflow.models.load_model` and ``energyflow sample FILE``
    rebuild without the domain's code.  ``path`` (a Path or its name) makes it a sampling model."""
    from .models import save_model_file
    from .paths import build_path

    if isinstance(path, str):
        path = build_path(path)
    return save_model_file(os.path.join(run_dir, "models", f"{name}.pt"), net, path=path, prediction=prediction,
                           meta=meta)


def load_model_state(run_dir: str, name: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load what :func:`save_model` wrote; a clear error lists the available models."""
    path = os.path.join(run_dir, "models", f"{name}.pt")
    if not os.path.exists(path):
        folder = os.path.join(run_dir, "models")
        have = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
        raise FileNotFoundError(f"no model {name!r} in {run_dir}; available: {have or 'none (did the run finish?)'}")
    return load_torch(path, what="model file", map_location=map_location)
