"""Iterative EFM on 8 gaussians: a tilt whose target lies outside the data, against one-shot EFM.

The energy is linear, ``E(x) = a·x``, so the exact target ``q ∝ p·exp(−βE)`` is again a Gaussian
mixture in closed form (:meth:`~domains.toy.datasets.GaussianMixture.tilt_linear`: every component
shifts by ``−β s² a`` and is reweighted by ``exp(−β a·μ_k)``).  With ``a = (1, 0)`` and ``β = 10``
the target is (to 1e−5) the single component ``N((−6.5, 0), 0.25 I)``, five data standard
deviations beyond the leftmost mode at ``(−4, 0)``, and one batch of 1024 data points has an ESS of
about 3 (0.3 %) at β = 10: one-shot EFM cannot express it.

Stages (cached in the run directory as ``models/<name>.pt``):

* ``base``: unweighted flow matching on the data (the model of p that iterative EFM starts from);
* ``oneshot``: EFM at the final β on the data, with as many training steps as the base model and
  all rounds together;
* ``iterative``: :func:`energyflow.iterative.iterative_tilt` from ``base``, along a fixed or an
  adaptive β schedule (rounds in ``iterative/round<k>/``, records in ``iterative/rounds.jsonl``).

The evaluation scores every model by the energy distance to exact samples, divided by the expected
distance between two independent exact sets of the same size (the floor; 1 = indistinguishable
from exact samples): one-shot and the base model against ``q_β``, and every round ``k`` against
its own exact ``q_{β_k}``.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from energyflow.data import FunctionBatchSource
from energyflow.errors import InputError
from energyflow.experiment import Experiment, SampleRecord, fit_and_save, write_json
from energyflow.files import read_jsonl, save_figure
from energyflow.models import load_model, save_model_file
from energyflow.sampling import sampler_from_config
from energyflow.stages import Stage
from energyflow.iterative import AdaptiveSchedule, draw_samples, iterative_tilt
from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss
from energyflow.metrics import energy_distance, energy_distance_floor
from energyflow.nets import MLPField
from energyflow.paths import CondOTPath
from energyflow.trainer import TrainerConfig
from energyflow.validation import check_number
from energyflow.weights import energy_weights

from .datasets import GaussianMixture, eight_gaussians_mixture, sample_toy
from .energies import LinearEnergy

__all__ = ["ToyIterativeExperiment", "exact_linear_tilt", "data_batch_ess"]


def exact_linear_tilt(direction: Sequence[float], beta: float) -> GaussianMixture:
    """The exact ``q ∝ p·exp(−β a·x)`` of ``8gaussians`` (float64 closed form)."""
    return eight_gaussians_mixture().tilt_linear(torch.tensor([float(v) for v in direction], dtype=torch.float64), beta)


def data_batch_ess(energy: LinearEnergy, beta: float, batch_size: int, num_batches: int = 50,
                   seed: int = 0) -> dict[str, float]:
    """ESS of ``softmax(−βE)`` over ``num_batches`` data batches of ``batch_size``: mean, min, max
    (in samples) and the mean as a fraction of the batch."""
    x = sample_toy("8gaussians", batch_size * num_batches, torch.Generator().manual_seed(seed))
    e = energy(x.to(torch.float64)).view(num_batches, batch_size)
    ess = torch.stack([energy_weights(row, beta).ess for row in e])
    return {"mean": float(ess.mean()), "min": float(ess.min()), "max": float(ess.max()),
            "fraction": float(ess.mean() / batch_size), "batch_size": int(batch_size)}


class ToyIterativeExperiment(Experiment):
    """One-shot against iterative EFM on ``8gaussians`` tilted by a linear energy.

    Args:
        direction: ``a`` of ``E(x) = a·x`` (mass moves towards ``−a``).
        beta: the final β.
        schedule: increasing β values ending at ``beta`` (round ``k`` tilts by ``β_k − β_{k−1}``),
            or ``None`` for the adaptive schedule.
        adaptive: :class:`~energyflow.iterative.AdaptiveSchedule` fields (``min_ess_fraction``,
            ``max_rounds``) when ``schedule`` is ``None``.
        num_samples: fresh model samples per round.
        net: :class:`~energyflow.nets.MLPField` arguments.
        trainer: :class:`~energyflow.trainer.TrainerConfig` fields shared by every stage.
        base_trainer: overrides of ``trainer`` for the two models fitted on data (base and one-shot).
        base_steps: steps of the base flow-matching model.
        round_steps: steps of each round.
        oneshot_steps: steps of one-shot EFM (``None``: base steps + all rounds' steps, the
            iterative chain's whole training budget).
        sampler: ``{"name", "steps"}`` for drawing samples (rounds and evaluation).
        num_eval_samples: samples per set for the distances.
        eval_repeats: independent sets averaged per distance.
        seed: seeds training, sampling and the exact draws.
        plot: write ``iterative.png``.
    """

    def __init__(self, direction: Sequence[float] = (1.0, 0.0), beta: float = 10.0,
                 schedule: Optional[Sequence[float]] = None, adaptive: Optional[dict] = None,
                 num_samples: int = 20_000, net: Optional[dict] = None, trainer: Optional[dict] = None,
                 base_trainer: Optional[dict] = None,
                 base_steps: int = 2000, round_steps: int = 1000, oneshot_steps: Optional[int] = None,
                 sampler: Optional[dict] = None, num_eval_samples: int = 2000, eval_repeats: int = 8,
                 seed: int = 0, plot: bool = True):
        try:
            self.energy = LinearEnergy(direction)
        except (TypeError, ValueError) as err:
            raise InputError(f"experiment.direction: {err}") from None
        if len(self.energy.direction) != 2:
            raise InputError(f"experiment.direction must have 2 entries, got {list(direction)}")
        self.beta = check_number(beta, "experiment.beta", low=0.0, low_inclusive=False)
        self.schedule = None if schedule is None else [check_number(b, "experiment.schedule", low=0.0, low_inclusive=False) for b in schedule]
        if self.schedule is not None and (not self.schedule or abs(self.schedule[-1] - self.beta) > 1e-12
                                          or any(b >= a for a, b in zip(self.schedule[1:], self.schedule[:-1]))):
            raise InputError(f"experiment.schedule must increase and end at beta={self.beta}, got {self.schedule}")
        self.adaptive = {"min_ess_fraction": 0.5, "max_rounds": 20, **(adaptive or {})}
        self.num_samples = int(num_samples)
        self.net_cfg = {"hidden": 64, "depth": 3, **(net or {})}
        self.trainer_cfg = {"batch_size": 1024, "lr": 3e-3, "ema_decay": 0.99, "lr_schedule": "cosine",
                            "log_every": 100, "progress": False, "tensorboard": False, "device": "cpu",
                            **(trainer or {})}
        self.base_trainer = dict(base_trainer or {})
        self.base_steps, self.round_steps = int(base_steps), int(round_steps)
        self.oneshot_steps = None if oneshot_steps is None else int(oneshot_steps)
        self.sampler_cfg = {"name": "heun", "steps": 50, **(sampler or {})}
        self.num_eval_samples, self.eval_repeats = int(num_eval_samples), int(eval_repeats)
        self.seed, self.plot = int(seed), bool(plot)
        self.path = CondOTPath()
        for key, value in (("num_samples", self.num_samples), ("base_steps", self.base_steps),
                           ("round_steps", self.round_steps), ("num_eval_samples", self.num_eval_samples),
                           ("eval_repeats", self.eval_repeats)):
            if value < 1:
                raise InputError(f"experiment.{key} must be a positive integer, got {value}")
        if self.oneshot_steps is not None and self.oneshot_steps < 1:
            raise InputError(f"experiment.oneshot_steps must be a positive integer or null, got {self.oneshot_steps}")
        # every trainer setting checked now, not after the first stage trained
        TrainerConfig.from_dict({**self.trainer_cfg, "steps": 1}, where="experiment.trainer")
        TrainerConfig.from_dict({**self.trainer_cfg, **self.base_trainer, "steps": 1}, where="experiment.base_trainer")
        try:
            sampler_from_config(self.sampler_cfg)
            self._schedule()
        except (TypeError, ValueError) as err:
            raise InputError(f"experiment.sampler / adaptive: {err}") from None

    # -- building blocks ---------------------------------------------------------------------------
    def _config(self, steps: int, **extra: Any) -> TrainerConfig:
        return TrainerConfig(**{"seed": self.seed, **self.trainer_cfg, "steps": int(steps), **extra})

    def _net(self) -> MLPField:
        return MLPField(2, **self.net_cfg)

    def _stages(self, run_dir: str) -> dict[str, Stage]:
        """One cached stage per model, keyed by every input that changes it."""
        root = os.path.join(run_dir, "stages")
        data = {"dataset": "8gaussians", "net": self.net_cfg, "seed": self.seed}
        base_cfg = {**self.trainer_cfg, **self.base_trainer}
        result_fields = lambda cfg, steps: TrainerConfig.from_dict({**cfg, "steps": steps}).result_fields()
        base = Stage("base", {**data, "trainer": result_fields(base_cfg, self.base_steps)}, root)
        iterative = Stage("iterative", {"energy": repr(self.energy), "schedule": self.schedule,
                                        "adaptive": self.adaptive if self.schedule is None else None,
                                        "num_samples": self.num_samples, "sampler": self.sampler_cfg,
                                        "trainer": result_fields(self.trainer_cfg, self.round_steps)},
                          root, upstream=[base])
        return {"base": base, "iterative": iterative}

    def _oneshot_stage(self, run_dir: str, steps: int) -> Stage:
        base_cfg = {**self.trainer_cfg, **self.base_trainer, "steps": steps}
        return Stage("oneshot", {"dataset": "8gaussians", "net": self.net_cfg, "seed": self.seed,
                                 "energy": repr(self.energy), "beta": self.beta,
                                 "trainer": TrainerConfig.from_dict(base_cfg).result_fields()},
                     os.path.join(run_dir, "stages"))

    def _load(self, run_dir: str, name: str) -> torch.nn.Module:
        stages = self._stages(run_dir)
        stage = stages.get(name) or self._oneshot_stage(run_dir, self._oneshot_steps(run_dir))
        if not stage.done:
            raise InputError(f"model {name!r} of this run's config is not trained (stage {stage.folder}); run "
                             f"'energyflow run <recipe> --run-dir {run_dir}' first")
        return load_model(stage.file("model.pt")).net

    def _oneshot_steps(self, run_dir: str) -> int:
        if self.oneshot_steps:
            return self.oneshot_steps
        rounds = read_jsonl(os.path.join(self._stages(run_dir)["iterative"].folder, "rounds.jsonl"), what="rounds log")
        return self.base_steps + self.round_steps * len(rounds)

    def _schedule(self):
        if self.schedule is not None:
            return self.schedule
        return AdaptiveSchedule(self.beta, **self.adaptive)

    def _fit_on_data(self, stage: Stage, beta: float, steps: int) -> dict[str, Any]:
        def fit(folder: str) -> dict[str, Any]:
            torch.manual_seed(self.seed)
            objective = EnergyWeightedLoss(self.path, beta, self.energy) if beta > 0 else FlowMatchingLoss(self.path)
            data = FunctionBatchSource(lambda n, g: sample_toy("8gaussians", n, g))
            config = TrainerConfig.from_dict({"seed": self.seed, **self.trainer_cfg, **self.base_trainer, "steps": steps})
            return fit_and_save(self._net(), objective, data, config, os.path.join(folder, "train"),
                                os.path.join(folder, "model.pt"), path=self.path, meta={"beta": beta})

        return stage.run(fit)

    # -- the Experiment interface ------------------------------------------------------------------
    def run(self, run_dir: str) -> dict[str, Any]:
        os.makedirs(run_dir, exist_ok=True)
        stages = self._stages(run_dir)
        seconds: dict[str, float] = {"base": self._fit_on_data(stages["base"], 0.0, self.base_steps)["seconds"]}

        def tilt(folder: str) -> dict[str, Any]:
            result = iterative_tilt(self._load(run_dir, "base"), self.path, self.energy, self._schedule(),
                                    self.num_samples, (2,), trainer=self._config(self.round_steps),
                                    sampler=self.sampler_cfg, seed=self.seed, out_dir=folder)
            save_model_file(os.path.join(folder, "model.pt"), result.net, path=self.path,
                            meta={"betas": result.betas})
            return {"betas": result.betas}

        seconds["iterative"] = stages["iterative"].run(tilt)["seconds"]
        oneshot = self._oneshot_stage(run_dir, self._oneshot_steps(run_dir))
        seconds["oneshot"] = self._fit_on_data(oneshot, self.beta, self._oneshot_steps(run_dir))["seconds"]
        results = self.evaluate(run_dir)
        results["stage_seconds"] = seconds
        write_json(results, os.path.join(run_dir, "results.json"))
        return results

    def _draw(self, net: torch.nn.Module, n: int, seed: int, sampler: Optional[dict] = None) -> Tensor:
        smp = sampler_from_config(self.sampler_cfg, sampler)
        return draw_samples(net, self.path, n, (2,), smp, torch.Generator().manual_seed(seed))

    def _score(self, samples: Tensor, beta: float, g: torch.Generator) -> dict[str, float]:
        """Energy distance of ``eval_repeats`` sets to fresh exact sets of ``q_beta``, and the ratio to the floor."""
        n, reps = self.num_eval_samples, self.eval_repeats
        target = exact_linear_tilt(self.energy.direction, beta)
        big = target.sample(5000, g).float()
        floor = 2.0 * (energy_distance_floor(big) * big.shape[0] / 2.0) / n  # (2/n)·E|X − X'|
        ed = sum(energy_distance(x, target.sample(n, g).float()) for x in samples.split(n)[:reps]) / reps
        return {"energy_distance": ed, "floor": floor, "ratio": ed / floor,
                "mean_x0": float(samples[:, 0].mean()), "exact_mean_x0": float(target.mean()[0])}

    def evaluate(self, run_dir: str, sampler: Optional[dict] = None) -> dict[str, Any]:
        """Distance ratios of base, one-shot and every round's model; ESS per round; the figure."""
        n, reps = self.num_eval_samples, self.eval_repeats
        g = torch.Generator().manual_seed(self.seed + 1000)
        rounds = read_jsonl(os.path.join(self._stages(run_dir)["iterative"].folder, "rounds.jsonl"), what="rounds log")
        results: dict[str, Any] = {
            "energy": repr(self.energy), "beta": self.beta, "num_samples": n, "repeats": reps,
            "data_ess_at_beta": data_batch_ess(self.energy, self.beta, int(self.trainer_cfg["batch_size"]),
                                               seed=self.seed + 2000),
        }
        draws = {}
        for name in ("base", "oneshot", "iterative"):
            draws[name] = self._draw(self._load(run_dir, name), n * reps, self.seed + 1, sampler)
            results[name] = self._score(draws[name], self.beta, g)
        table = []
        for rec in rounds:
            net = load_model(os.path.join(self._stages(run_dir)["iterative"].folder, f"round{rec['round']}",
                                          "model.pt")).net
            x = draws["iterative"] if rec["round"] == rounds[-1]["round"] else self._draw(net, n * reps, self.seed + 1, sampler)
            score = self._score(x, rec["beta"], g) if rec["round"] != rounds[-1]["round"] else results["iterative"]
            table.append({"round": rec["round"], "beta": rec["beta"], "delta_beta": rec["delta_beta"],
                          "ess_fraction": rec["ess_fraction"], "mean_energy_before": rec["mean_energy"],
                          "ratio": score["ratio"], "mean_x0": score["mean_x0"], "exact_mean_x0": score["exact_mean_x0"]})
        results["rounds"] = table
        write_json(results, os.path.join(run_dir, "eval.json"))
        if self.plot:
            self._figure(run_dir, draws)
        return results

    def _figure(self, run_dir: str, draws: dict[str, Tensor]) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = self.num_eval_samples
        g = torch.Generator().manual_seed(self.seed + 3000)
        panels = [("data p", sample_toy("8gaussians", n, g)),
                  (f"exact q, β = {self.beta:g}", exact_linear_tilt(self.energy.direction, self.beta).sample(n, g).float()),
                  (f"one-shot EFM, β = {self.beta:g}", draws["oneshot"][:n]),
                  (f"iterative EFM, β = {self.beta:g}", draws["iterative"][:n])]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
        for ax, (title, x) in zip(axes, panels):
            x = x.numpy()
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="C3" if "one-shot" in title else "C0")
            ax.set_title(title, fontsize=9)
            ax.set_xlim(-8, 6)
            ax.set_ylim(-7, 7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
        fig.suptitle(f"8 gaussians, E = {self.energy!r}", fontsize=9)
        fig.tight_layout()
        out = os.path.join(run_dir, "iterative.png")
        save_figure(fig, out, dpi=90)
        plt.close(fig)
        return out

    def sample(self, run_dir: str, num_samples: int, model: Optional[str] = None,
               sampler: Optional[dict[str, Any]] = None, seed: int = 0) -> SampleRecord:
        """``model``: ``iterative`` (default), ``oneshot`` or ``base``."""
        if model not in (None, "iterative", "oneshot", "base"):
            raise InputError(f"model must be 'iterative', 'oneshot' or 'base', got {model!r}")
        x = self._draw(self._load(run_dir, model or "iterative"), num_samples, seed, sampler)
        return SampleRecord(x=x, meta={"model": model or "iterative", "seed": seed, "sampler": sampler})

