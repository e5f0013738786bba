"""energyflow: energy-guided generative modelling.

Sample q(x) ∝ p(x)·exp(−β·E(x)) with a model trained by *energy-weighted* flow matching or
diffusion: no energy model of intermediate times, no energy gradient when sampling.

Conventions: t ∈ [0, 1] with t = 0 noise and t = 1 data; lower energy is preferred; ``beta`` is
the energy scale; networks are called ``net(x, t, cond)``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> submodule.  Imported lazily (PEP 562) so that `energyflow --help` does not load torch.
_EXPORTS = {
    "energies": ["BlackBoxEnergy", "Energy", "FunctionEnergy", "NonFiniteEnergyError", "ScaledEnergy", "SumEnergy"],
    "guidance": ["CEPGuidedPredictor", "EnergyGuidedPredictor"],
    "losses": ["ContrastiveEnergyLoss", "EnergyWeightedLoss", "FlowMatchingLoss", "LossOutput", "Objective",
               "energy_weighted_diffusion", "energy_weighted_flow_matching"],
    "paths": ["CondOTPath", "Path", "PathSample", "VPPath", "build_path"],
    "predictor": ["Predictor"],
    "samplers": ["AncestralSampler", "DiffusersSampler", "DPMSolverSampler", "EulerMaruyamaSampler", "ODESampler",
                 "SampleResult", "Sampler", "build_sampler"],
    "weights": ["EnergyWeights", "effective_sample_size", "energy_weights"],
    "trainer": ["Trainer", "TrainerConfig"],
    "data": ["TensorBatchSource", "FunctionBatchSource", "DatasetBatchSource"],
    "nets": ["MLPField", "MLPEnergyNet", "PointwiseField", "MLPEnsemble"],
    "priors": ["Prior", "GaussianPrior", "CenteredGaussianPrior"],
    "sampling": ["initial_noise", "sampler_from_config"],
    "models": ["load_model", "save_model_file", "register_model", "SavedModel"],
    "stages": ["Stage", "fingerprint"],
    "errors": ["InputError", "CorruptFileError", "UnsafeFileError"],
    "iterative": ["iterative_tilt", "AdaptiveSchedule", "IterativeResult", "RoundRecord"],
    "experiment": ["Experiment", "SampleRecord", "fit_and_save"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # pragma: no cover
    from .energies import BlackBoxEnergy, Energy, FunctionEnergy, NonFiniteEnergyError, ScaledEnergy, SumEnergy
    from .guidance import CEPGuidedPredictor, EnergyGuidedPredictor
    from .losses import (ContrastiveEnergyLoss, EnergyWeightedLoss, FlowMatchingLoss, LossOutput, Objective,
                         energy_weighted_diffusion, energy_weighted_flow_matching)
    from .paths import CondOTPath, Path, PathSample, VPPath, build_path
    from .predictor import Predictor
    from .samplers import (AncestralSampler, DiffusersSampler, DPMSolverSampler, EulerMaruyamaSampler, ODESampler,
                           SampleResult, Sampler, build_sampler)
    from .weights import EnergyWeights, effective_sample_size, energy_weights

    from .trainer import Trainer, TrainerConfig
    from .data import TensorBatchSource, FunctionBatchSource, DatasetBatchSource
    from .nets import MLPField, MLPEnergyNet, PointwiseField, MLPEnsemble
    from .priors import Prior, GaussianPrior, CenteredGaussianPrior
    from .sampling import initial_noise, sampler_from_config
    from .models import load_model, save_model_file, register_model, SavedModel
    from .stages import Stage, fingerprint
    from .errors import InputError, CorruptFileError, UnsafeFileError
    from .iterative import iterative_tilt, AdaptiveSchedule, IterativeResult, RoundRecord
    from .experiment import Experiment, SampleRecord, fit_and_save


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'energyflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))


__version__ = "0.1.0"

__all__ = sorted(_WHERE)
