"""The experiment interface a recipe instantiates, and helpers shared by all domains.

A recipe (Hydra YAML) has an ``experiment`` node with a ``_target_`` naming an
:class:`Experiment` subclass whose constructor arguments are the node's other keys.
``energyflow run`` builds it and calls :meth:`Experiment.run` with a fresh run directory;
``energyflow sample`` and ``energyflow eval`` rebuild it from the run directory's saved
``config.yaml`` and call :meth:`Experiment.sample` / :meth:`Experiment.evaluate`.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from .files import load_torch, write_json

__all__ = ["Experiment", "SampleRecord", "fit_and_save", "save_model", "load_model_state", "write_json"]


@dataclass
class SampleRecord:
    """What :meth:`Experiment.sample` returns.

    Attributes:
        x: ``[N, ...]`` samples; variable-size samples (sets, graphs) are padded along their set
            dimension and ``mask`` marks the real elements.
        mask: ``[N, n_max]`` (1 for real elements) or ``None`` for fixed-size samples.
        cond: the conditions the samples were drawn for (or ``None``).
        meta: what drew them (model, sampler, seed...).
    """

    x: Tensor
    mask: Optional[Tensor] = None
    cond: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def items(self) -> list[Tensor]:
        """The samples one by one, each cut to its real elements."""
        if self.mask is None:
            return list(self.x)
        return [x[m.bool()] for x, m in zip(self.x, self.mask)]

    def to_file_object(self) -> Any:
        """What ``energyflow sample`` saves: the tensor itself for fixed-size samples, else a dict of
        ``x``, ``mask`` (and ``cond``)."""
        if self.mask is None and self.cond is None:
            return self.x
        return {"x": self.x, "mask": self.mask, "cond": self.cond}


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

    def evaluate(self, run_dir: str, sampler: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Re-evaluate the models saved in ``run_dir`` (``sampler`` overrides the recipe's, see
        :func:`energyflow.sampling.sampler_from_config`)."""
        raise NotImplementedError(f"{type(self).__name__} has no standalone evaluation")

    def sample(self, run_dir: str, num_samples: int, model: Optional[str] = None,
               sampler: Optional[dict[str, Any]] = None, seed: int = 0) -> SampleRecord:
        """Draw ``num_samples`` from the saved model ``model`` of ``run_dir``.  Experiments whose
        samples need a condition also accept ``cond=`` (``energyflow sample --cond``), as text."""
        raise NotImplementedError(f"{type(self).__name__} does not support sampling")

    sample_formats: tuple[str, ...] = ()
    """File suffixes (besides ``.pt`` / ``.npy``) that :meth:`write_samples` writes, e.g. ``(".sdf",)``."""

    def write_samples(self, record: SampleRecord, path: str) -> None:
        """Write a :meth:`sample` record in one of :attr:`sample_formats` (atomically)."""
        raise NotImplementedError(f"{type(self).__name__} writes no sample formats of its own")

    def models(self, run_dir: str) -> list[str]:
        """Names of the models saved in ``run_dir/models``."""
        folder = os.path.join(run_dir, "models")
        return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []


def fit_and_save(net: nn.Module, objective: Any, data: Any, config: Any, out_dir: str, model_file: str, *,
                 path: Any = None, prediction: Optional[str] = None, meta: Optional[dict[str, Any]] = None,
                 name: str = "train") -> dict[str, Any]:
    """Train ``net`` (checkpoints and logs in ``out_dir``) and save its EMA as the self-describing
    model file ``model_file``, atomically, from the main process only; returns the training summary
    (``steps``, ``train_seconds``, ``final_metrics``), which is also stored in the file's meta.

    The one place where a domain turns a training stage into a model file: use it inside
    :meth:`Stage.run <energyflow.stages.Stage.run>` (which locks, resumes and, under torchrun,
    trains on every rank).
    """
    from .models import save_model_file
    from .runtime import is_main_process
    from .trainer import Trainer

    trainer = Trainer(net, objective, data, config, out_dir=out_dir, name=name)
    result = trainer.fit()
    summary = {"steps": result.step, "train_seconds": round(result.seconds, 2), "final_metrics": result.metrics}
    if is_main_process():
        save_model_file(model_file, trainer.ema_module, path=path, prediction=prediction,
                        meta={**(meta or {}), **summary})
    return summary


def save_model(net: nn.Module, run_dir: str, name: str, meta: Optional[dict[str, Any]] = None, *,
               path: Any = None, prediction: Optional[str] = None) -> str:
    """Save ``net`` (atomically) as ``run_dir/models/<name>.pt``: a self-describing model file
    (:mod:`energyflow.models`) that :func:`energyflow.models.load_model` and ``energyflow sample FILE``
    rebuild without the domain's code.  ``path`` (a Path or its name) makes it a sampling model."""
    from .models import save_model_file

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
