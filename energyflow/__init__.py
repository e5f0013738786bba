"""energyflow: energy-guided generative modelling.

Sample q(x) ∝ p(x)·exp(−β·E(x)) with a model trained by *energy-weighted* flow matching or
diffusion: no energy model of intermediate times, no energy gradient when sampling.

Conventions: t ∈ [0, 1] with t = 0 noise and t = 1 data; lower energy is preferred; ``beta`` is
the energy scale; networks are called ``net(x, t, cond)``.
"""
from .energies import BlackBoxEnergy, Energy, FunctionEnergy, NonFiniteEnergyError, ScaledEnergy, SumEnergy
from .guidance import CEPGuidedPredictor, EnergyGuidedPredictor
from .losses import (ContrastiveEnergyLoss, EnergyWeightedLoss, FlowMatchingLoss, LossOutput,
                     energy_weighted_diffusion, energy_weighted_flow_matching)
from .paths import CondOTPath, Path, PathSample, VPPath, build_path
from .predictor import Predictor
from .samplers import (AncestralSampler, DiffusersSampler, DPMSolverSampler, EulerMaruyamaSampler, ODESampler,
                       SampleResult, Sampler, build_sampler)
from .weights import EnergyWeights, effective_sample_size, energy_weights

__version__ = "0.1.0"

__all__ = [
    "Energy", "FunctionEnergy", "BlackBoxEnergy", "ScaledEnergy", "SumEnergy", "NonFiniteEnergyError",
    "Path", "PathSample", "CondOTPath", "VPPath", "build_path", "Predictor",
    "FlowMatchingLoss", "EnergyWeightedLoss", "ContrastiveEnergyLoss", "LossOutput",
    "energy_weighted_flow_matching", "energy_weighted_diffusion",
    "EnergyWeights", "energy_weights", "effective_sample_size",
    "Sampler", "SampleResult", "ODESampler", "EulerMaruyamaSampler", "AncestralSampler",
    "DiffusersSampler", "DPMSolverSampler", "build_sampler",
    "EnergyGuidedPredictor", "CEPGuidedPredictor",
]
