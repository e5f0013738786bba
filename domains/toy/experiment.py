"""The 2-D toy experiment: EFM (OT and VP paths) against gradient guidance, scored against the exact target.

For every β it trains

* ``efm_<path>``: energy-weighted flow matching / diffusion on the data, one model per path;

and, as baselines, on the plain data model ``fm_ot`` (unweighted flow matching, itself scored
against the tilted target to show how far p is from q):

* ``guidance``: energy-gradient guidance −β∇E(x̂1) at every step (needs a differentiable energy);
* ``cep``: QGPO's contrastive energy prediction — a time-dependent energy network trained per β,
  whose gradient guides the sampler.

Each method's samples are compared with exact samples of q ∝ p·exp(−βE) (importance resampling
of a 10⁶-point pool) by energy distance and sliced Wasserstein distance; the *floor* is the
distance between two independent exact samples of the same size.

Caching.  Every trained model is one :class:`~energyflow.stages.Stage` under
``<run_dir>/stages/<name>-<key>/``, whose key hashes everything that changes that model: the data
set, the energy (by its ``repr``, which states its parameters), β, the path, the network, the
trainer settings that change the weights (``TrainerConfig.result_fields``, with the per-path and
CEP overrides applied; device, threads, logging and progress are left out), the CEP settings and the seed.  A rerun with the same
configuration trains nothing; a changed setting retrains exactly the models it changes, and
switching back reuses the earlier stages.  Evaluation and sampling read the models of the
*current* configuration's stages only.  ``<run_dir>/models/<name>.pt`` (and
``train/<name>/metrics.jsonl``) are published copies for people and tools, written atomically
after their stage finishes; nothing reads them back.

The CEP energy network is trained on the data alone (not on samples of ``fm_ot``), so its key
does not include the ``fm_ot`` stage; the ``cep`` and ``guidance`` methods combine the current
``fm_ot`` stage with the current CEP stage / the energy at sampling time.
"""
from __future__ import annotations

import contextlib
import filecmp
import os
import re
import time
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from energyflow.data import FunctionBatchSource
from energyflow.energies import Energy
from energyflow.errors import InputError
from energyflow.experiment import Experiment, SampleRecord, fit_and_save, load_model_state, write_json
from energyflow.files import copy_file
from energyflow.guidance import CEPGuidedPredictor, EnergyGuidedPredictor
from energyflow.losses import ContrastiveEnergyLoss, EnergyWeightedLoss, FlowMatchingLoss
from energyflow.metrics import energy_distance, energy_distance_floor, sliced_wasserstein
from energyflow.nets import MLPEnergyNet, MLPField
from energyflow.paths import build_path
from energyflow.predictor import Predictor
from energyflow.runtime import init_distributed, is_main_process, resolve_device
from energyflow.samplers import build_sampler
from energyflow.sampling import initial_noise, sampler_from_config
from energyflow.stages import Stage, config_key
from energyflow.trainer import TrainerConfig
from energyflow.validation import check_integer, check_mapping as _mapping, check_number

from .datasets import TOY_DATASETS, sample_toy
from .energies import SineEnergy
from .target import MIN_POOL_ESS, ExactTiltedTarget

__all__ = ["ToyExperiment", "METHODS", "PATHS", "BASELINES"]

METHODS = ("efm_ot", "efm_vp", "fm_ot", "guidance", "cep")
PATHS = ("ot", "vp")
BASELINES = ("fm", "guidance", "cep")
STAGE_FORMAT = 1  # bump when the training code changes what a stage with the same settings produces

_NAME = re.compile(r"^(?P<method>[a-z_]+?)(?:_beta(?P<beta>[0-9.eE+-]+))?$")
_NET_DEFAULTS = {"hidden": 64, "depth": 3, "time_dim": 64}
_CEP_DEFAULTS = {"group_size": 16, "hidden": 64, "depth": 3, "time_dim": 64}
_CEP_TRAINER_KEYS = ("steps", "lr")


def _beta_tag(beta: float) -> str:
    return f"beta{beta:g}"


# -- input validation (every message names the recipe key) ------------------------------------------
def _names(value: Any, key: str, allowed: Sequence[str]) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"{key} must be a list of names from {list(allowed)}, got {value!r}")
    out = list(value)
    unknown = [v for v in out if v not in allowed]
    if unknown:
        raise InputError(f"{key}: unknown name(s) {unknown}; choose from {list(allowed)}")
    if len(set(out)) != len(out):
        raise InputError(f"{key} lists a name twice: {out}")
    return out


class ToyExperiment(Experiment):
    """Energy-weighted flow matching on a 2-D toy data set, against the exact tilted target.

    Runs data-parallel under ``torchrun --nproc_per_node K -m energyflow run recipes/toy_8gaussians.yaml``.

    Every input is validated on construction, before anything is trained; a bad one raises
    :class:`~energyflow.errors.InputError` naming its recipe key (``experiment.betas`` …).

    Args:
        dataset: a name from :data:`~domains.toy.datasets.TOY_DATASETS`.
        energy: the energy E(x) (lower preferred); default ``SineEnergy(0.3, 1.0, 0.1)``.  Its
            ``repr`` identifies it in the stage keys, so it must state its parameters (the toy
            energies' reprs are their constructor calls).
        betas: the inverse temperatures to fit: finite, ≥ 0, and within the range where the exact
            target is trustworthy (the pool's effective sample size at β must be at least
            :data:`~domains.toy.target.MIN_POOL_ESS`; see
            :meth:`~domains.toy.target.ExactTiltedTarget.max_supported_beta`).
        paths: ``"ot"`` and/or ``"vp"``: one EFM model per path and β.
        baselines: any of ``"fm"`` (unweighted flow matching), ``"guidance"`` (energy gradient at x̂1
            on the FM model) and ``"cep"`` (QGPO's contrastive energy guidance on the FM model).
        net: :class:`~energyflow.nets.MLPField` arguments (``hidden``, ``depth``, ``time_dim``).
        trainer: :class:`~energyflow.trainer.TrainerConfig` fields for every model.
        path_trainer: per-path overrides of ``trainer``, e.g. ``{"vp": {"steps": 3000}}`` (ε-prediction
            on the VP path needs about twice the steps of the OT path for the same accuracy).
        sampler: ``{"name": ..., "steps": ...}`` for EFM and FM models (see ``build_sampler``).
        guidance_steps: Euler steps of the gradient-guided samplers.
        guidance_min_time: ``min_time`` of :class:`~energyflow.guidance.EnergyGuidedPredictor` (the
            guidance coefficient (1 − t)/t is evaluated at max(t, min_time); 0.3 was the best of
            {0.01, 0.1, 0.3, 0.5} on 8 gaussians); in (0, 1].
        cep: ``{"group_size": M, "steps": ..., "lr": ..., "hidden": ..., "depth": ..., "time_dim": ...}``
            for the CEP energy nets (``M`` ≥ 2 must divide the trainer's batch size).
        x1_clip: bound (> 0) on |x̂1| when sampling (see :class:`~energyflow.predictor.Predictor`); removes
            the rare far outliers of VP models whose ε̂ error is amplified by 1/α_t near t = 0.
        num_eval_samples: samples per set for the distances (and the figure), ≥ 2.
        eval_repeats: independent sets averaged per distance.
        pool_size: size of the exact target's importance-resampling pool (≥ ``MIN_POOL_ESS``).
        seed: seeds training, sampling and the target draws.
        plot: write ``<dataset>.png`` with data / exact target / each method for every β.
    """

    supports_distributed = True

    def __init__(self, dataset: str = "8gaussians", energy: Optional[Energy] = None,
                 betas: Sequence[float] = (1.0, 3.0, 10.0), paths: Sequence[str] = ("ot", "vp"),
                 baselines: Sequence[str] = ("fm", "guidance", "cep"), net: Optional[dict] = None,
                 trainer: Optional[dict] = None, path_trainer: Optional[dict] = None,
                 sampler: Optional[dict] = None, guidance_steps: int = 50, guidance_min_time: float = 0.3,
                 cep: Optional[dict] = None, x1_clip: Optional[float] = None, num_eval_samples: int = 2000,
                 eval_repeats: int = 8, pool_size: int = 1_000_000, seed: int = 0, plot: bool = True):
        # -- plain values ---------------------------------------------------------------------------
        if dataset not in TOY_DATASETS:
            raise InputError(f"experiment.dataset: unknown toy dataset {dataset!r}; choose one of {list(TOY_DATASETS)}")
        self.dataset = dataset
        self.energy = energy if energy is not None else SineEnergy(0.3, 1.0, 0.1)
        if not callable(self.energy):
            raise InputError(f"experiment.energy must be an energy (a callable E(x) -> [B]), got {self.energy!r}")
        try:
            config_key({"energy": self.energy})
        except InputError:
            raise InputError(f"experiment.energy: {type(self.energy).__name__} has no stable description for the "
                             "stage cache key (give it a __repr__ that states its parameters)") from None
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or not betas:
            raise InputError(f"experiment.betas must be a non-empty list of numbers, got {betas!r}")
        self.betas = [check_number(b, f"experiment.betas[{i}]", low=0.0) for i, b in enumerate(betas)]
        tags = [_beta_tag(b) for b in self.betas]
        if len(set(tags)) != len(tags):
            raise InputError(f"experiment.betas {self.betas} has values with the same model name "
                             f"({tags}): list each β once (names use 6 significant digits)")
        self.paths = _names(paths, "experiment.paths", PATHS)
        self.baselines = _names(baselines, "experiment.baselines", BASELINES)
        if not self.paths and not self._needs_fm():
            raise InputError("experiment.paths and experiment.baselines are both empty: nothing to train")
        if "guidance" in self.baselines and not getattr(self.energy, "differentiable", False):
            raise InputError("experiment.baselines: 'guidance' needs a differentiable energy "
                             f"({self.energy!r} has differentiable=False); drop it or use a torch energy")
        self.net_cfg = {**_NET_DEFAULTS, **_mapping(net, "experiment.net", tuple(_NET_DEFAULTS))}
        for k in _NET_DEFAULTS:
            self.net_cfg[k] = check_integer(self.net_cfg[k], f"experiment.net.{k}", minimum=1)
        self.sampler_cfg = self._sampler_config(sampler, "experiment.sampler")
        self.guidance_steps = check_integer(guidance_steps, "experiment.guidance_steps", minimum=1)
        self.guidance_min_time = check_number(guidance_min_time, "experiment.guidance_min_time", low=0.0, high=1.0,
                                              low_inclusive=False, high_inclusive=True)
        cep_given = _mapping(cep, "experiment.cep", (*_CEP_DEFAULTS, *_CEP_TRAINER_KEYS))
        self.cep_cfg = {**_CEP_DEFAULTS, **cep_given}
        self.cep_cfg["group_size"] = check_integer(self.cep_cfg["group_size"], "experiment.cep.group_size", minimum=2)
        for k in ("hidden", "depth", "time_dim"):
            self.cep_cfg[k] = check_integer(self.cep_cfg[k], f"experiment.cep.{k}", minimum=1)
        self.x1_clip = None if x1_clip is None else check_number(x1_clip, "experiment.x1_clip", low=0.0, low_inclusive=False)
        self.num_eval_samples = check_integer(num_eval_samples, "experiment.num_eval_samples", minimum=2)
        self.eval_repeats = check_integer(eval_repeats, "experiment.eval_repeats", minimum=1)
        self.pool_size = check_integer(pool_size, "experiment.pool_size", minimum=int(MIN_POOL_ESS))
        self.seed = check_integer(seed, "experiment.seed", minimum=0)
        if not isinstance(plot, bool):
            raise InputError(f"experiment.plot must be true or false, got {plot!r}")
        self.plot = plot

        # -- trainer settings: the base, per path, and for the CEP nets -----------------------------
        self.trainer_cfg = {"steps": 1500, "batch_size": 1024, "lr": 3e-3, "ema_decay": 0.99,
                            "lr_schedule": "cosine", "log_every": 100,
                            **_mapping(trainer, "experiment.trainer", None)}
        base = {"seed": self.seed, **self.trainer_cfg}
        TrainerConfig.from_dict(base, "experiment.trainer")
        if path_trainer is not None and not isinstance(path_trainer, dict):
            raise InputError(f"experiment.path_trainer must map a path name to trainer settings, got {path_trainer!r}")
        self.path_trainer = {}
        for p, fields in (path_trainer or {}).items():
            if p not in PATHS:
                raise InputError(f"experiment.path_trainer: unknown path {p!r}; choose from {list(PATHS)}")
            self.path_trainer[p] = _mapping(fields, f"experiment.path_trainer.{p}", None)
        self._trainer_configs = {p: TrainerConfig.from_dict({**base, **self.path_trainer.get(p, {})},
                                                            f"experiment.path_trainer.{p}") for p in PATHS}
        cep_trainer = TrainerConfig.from_dict(
            {**base, **{k: self.cep_cfg[k] for k in _CEP_TRAINER_KEYS if k in self.cep_cfg}}, "experiment.cep")
        if "cep" in self.baselines and cep_trainer.batch_size % self.cep_cfg["group_size"]:
            raise InputError(f"experiment.cep.group_size ({self.cep_cfg['group_size']}) must divide the trainer's "
                             f"batch_size ({cep_trainer.batch_size})")
        self._trainer_configs["cep"] = cep_trainer

        # -- the stages: one per model, keyed by everything that changes it -------------------------
        common = {"format": STAGE_FORMAT, "dataset": self.dataset, "seed": self.seed}
        self._specs: dict[str, dict[str, Any]] = {}
        for p in self.paths:
            for b in self.betas:
                self._specs[f"efm_{p}_{_beta_tag(b)}"] = {
                    **common, "kind": "efm", "path": p, "beta": b, "energy": self.energy, "net": self.net_cfg,
                    "trainer": self._trainer_configs[p].result_fields()}
        if self._needs_fm():
            self._specs["fm_ot"] = {**common, "kind": "fm", "path": "ot", "net": self.net_cfg,
                                    "trainer": self._trainer_configs["ot"].result_fields()}
        if "cep" in self.baselines:
            net = {k: self.cep_cfg[k] for k in ("group_size", "hidden", "depth", "time_dim")}
            for b in self.betas:
                self._specs[f"cep_{_beta_tag(b)}"] = {
                    **common, "kind": "cep", "path": "ot", "beta": b, "energy": self.energy, "cep": net,
                    "trainer": cep_trainer.result_fields()}

        # -- the exact targets: refuse a β at which importance resampling cannot represent q --------
        self._targets = {b: self._checked_target(b) for b in self.betas}

    def _checked_target(self, beta: float) -> ExactTiltedTarget:
        target = ExactTiltedTarget(self.dataset, self.energy, beta, pool_size=self.pool_size, seed=self.seed)
        try:
            with warnings.catch_warnings():  # a low ESS is refused below, with the reason
                warnings.simplefilter("ignore", RuntimeWarning)
                ess = target.pool_ess
        except (ValueError, TypeError, RuntimeError) as err:  # the energy fails, or is NaN / -inf, on the data
            raise InputError(f"experiment.energy cannot weight the {self.dataset} pool: {err}") from None
        if not ess >= MIN_POOL_ESS:
            limit = target.max_supported_beta(MIN_POOL_ESS)
            raise InputError(
                f"experiment.betas: beta={beta:g} is outside the range where the exact target can be computed for "
                f"this dataset, energy and pool_size: q concentrates where the {self.pool_size}-point data pool has "
                f"almost no points (importance-resampling effective sample size {ess:.1f} < {MIN_POOL_ESS:.0f}); "
                f"supported: 0 <= beta <= {limit:.4g} (a larger experiment.pool_size extends it)")
        return target

    @staticmethod
    def _sampler_config(sampler: Optional[dict], key: str, base: Optional[dict] = None) -> dict[str, Any]:
        """``{"name", "steps", ...}`` merged over ``base``; the sampler is built once to check it."""
        if sampler is not None and not isinstance(sampler, dict):
            raise InputError(f"{key} must be a mapping like {{name: heun, steps: 50}}, got {sampler!r}")
        cfg = {**(base or {"name": "heun", "steps": 50}), **(sampler or {})}
        if not isinstance(cfg.get("name"), str):
            raise InputError(f"{key}.name must be a sampler name, got {cfg.get('name')!r}")
        cfg["steps"] = check_integer(cfg.get("steps"), f"{key}.steps", minimum=1)
        rest = dict(cfg)
        try:
            build_sampler(rest.pop("name"), **rest)
        except (TypeError, ValueError, ImportError) as err:
            raise InputError(f"{key}: {err}") from None
        return cfg

    # -- building blocks ---------------------------------------------------------------------------
    def _data(self) -> FunctionBatchSource:
        return FunctionBatchSource(lambda n, g: sample_toy(self.dataset, n, g))

    def _needs_fm(self) -> bool:
        return bool({"fm", "guidance", "cep"} & set(self.baselines))

    def stage_names(self) -> list[str]:
        """The models this configuration trains, in training order."""
        return list(self._specs)

    def stages(self, run_dir: str) -> dict[str, Stage]:
        """This configuration's training stages by model name, in training order, cached in
        ``<run_dir>/stages/`` (see the module docstring for what their keys hold)."""
        root = os.path.join(run_dir, "stages")
        return {name: Stage(name, spec, root) for name, spec in self._specs.items()}

    def _stage(self, run_dir: str, name: str) -> Stage:
        if name not in self._specs:
            raise InputError(f"no model {name!r} in {run_dir}: this run's config trains {self.stage_names()}")
        return Stage(name, self._specs[name], os.path.join(run_dir, "stages"))

    def _new_net(self, name: str) -> torch.nn.Module:
        kind = self._specs[name]["kind"]
        if kind == "cep":
            return MLPEnergyNet(2, hidden=self.cep_cfg["hidden"], depth=self.cep_cfg["depth"],
                                time_dim=self.cep_cfg["time_dim"])
        return MLPField(2, **self.net_cfg)

    def _train_model(self, name: str, stage: Stage, folder: str, main: bool = True) -> dict[str, Any]:
        """Train model ``name`` into ``folder`` (its stage's folder); ``main``: this process saves it."""
        spec = self._specs[name]
        torch.manual_seed(self.seed)
        net = self._new_net(name)
        path = build_path(spec["path"])
        beta = spec.get("beta", 0.0)
        if spec["kind"] == "cep":
            objective = ContrastiveEnergyLoss(path, beta, self.cep_cfg["group_size"], self.energy)
            config = self._trainer_configs["cep"]
        else:
            objective = EnergyWeightedLoss(path, beta, self.energy) if spec["kind"] == "efm" else FlowMatchingLoss(path)
            config = self._trainer_configs[spec["path"]]
        meta = {"kind": spec["kind"], "path": spec["path"], "beta": beta, "stage": os.path.basename(stage.folder)}
        summary = fit_and_save(net, objective, self._data(), config, os.path.join(folder, "train"),
                               os.path.join(folder, "models", f"{name}.pt"),
                               path=None if spec["kind"] == "cep" else spec["path"], meta=meta)
        return summary

    def _run_stage(self, name: str, stage: Stage) -> tuple[dict[str, Any], bool]:
        """Train ``name`` unless its stage is done (:meth:`Stage.run`: locked, so runs sharing the folder
        train it once; under ``torchrun`` every rank trains and rank 0 writes); returns the stage
        summary and whether it trained now."""
        trained: list[bool] = []

        def fn(folder: str) -> dict[str, Any]:
            trained.append(True)
            return self._train_model(name, stage, folder, is_main_process())

        return stage.run(fn), bool(trained)

    @staticmethod
    def _publish(run_dir: str, name: str, stage: Stage) -> None:
        """Copy the stage's model (and training log) to ``models/<name>.pt`` (``train/<name>/metrics.jsonl``),
        atomically, unless the copy there is already identical (its time stamp then stays)."""
        pairs = [(os.path.join(stage.folder, "models", f"{name}.pt"), os.path.join(run_dir, "models", f"{name}.pt")),
                 (os.path.join(stage.folder, "train", "metrics.jsonl"),
                  os.path.join(run_dir, "train", name, "metrics.jsonl"))]
        for src, dst in pairs:
            if os.path.isfile(src) and not (os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False)):
                copy_file(src, dst)

    def _unpublish_stale(self, run_dir: str) -> None:
        """Remove published ``models/<name>.pt`` of toy models that this configuration does not train
        (their stages stay in ``stages/``, so a config that trains them again reuses them)."""
        folder = os.path.join(run_dir, "models")
        if not os.path.isdir(folder):
            return
        for f in os.listdir(folder):
            m = _NAME.match(f[:-3]) if f.endswith(".pt") else None
            if m and m["method"] in METHODS and f[:-3] not in self._specs:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, f))

    def _load_field(self, run_dir: str, name: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
        """The trained network ``name`` of this configuration's stage (never a published copy)."""
        stage = self._stage(run_dir, name)
        if not stage.done:
            published = os.path.exists(os.path.join(run_dir, "models", f"{name}.pt"))
            raise InputError(
                f"model {name!r} of this run's config is not trained: its stage {os.path.relpath(stage.folder, run_dir)} "
                f"in {run_dir} is missing or unfinished"
                + (" (models/ holds a copy from another config or an older version, which is not used)" if published else "")
                + f"; run 'energyflow run <recipe> --run-dir {run_dir}' with this config to train it")
        state = load_model_state(stage.folder, name, map_location=device)
        net = self._new_net(name)
        net.load_state_dict(state["state_dict"])
        return net.to(device).eval(), state["meta"]

    def predictor(self, run_dir: str, method: str, beta: float, device: torch.device) -> Predictor:
        """The sampling model of ``method`` (one of :data:`METHODS`) at ``beta``."""
        if method in ("efm_ot", "efm_vp"):
            net, meta = self._load_field(run_dir, f"{method}_{_beta_tag(beta)}", device)
            return Predictor(net, build_path(meta["path"]), x1_clip=self.x1_clip)
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {METHODS}")
        base_net, _ = self._load_field(run_dir, "fm_ot", device)
        base = Predictor(base_net, build_path("ot"), x1_clip=self.x1_clip)
        if method == "fm_ot":
            return base
        if method == "guidance":
            return EnergyGuidedPredictor(base, self.energy, beta, at="x1", min_time=self.guidance_min_time)
        energy_net, _ = self._load_field(run_dir, f"cep_{_beta_tag(beta)}", device)
        return CEPGuidedPredictor(base, energy_net, scale=1.0)

    def methods(self) -> list[str]:
        out = [f"efm_{p}" for p in self.paths]
        if self._needs_fm():
            out.append("fm_ot")
        out += [b for b in ("guidance", "cep") if b in self.baselines]
        return out

    def _sample_method(self, run_dir: str, method: str, beta: float, n: int, seed: int,
                       sampler: Optional[dict] = None) -> Tensor:
        device = resolve_device(self.trainer_cfg.get("device", "auto"))
        predictor = self.predictor(run_dir, method, beta, device)
        if method in ("guidance", "cep"):
            smp = sampler_from_config({"name": "euler", "steps": self.guidance_steps})
        else:
            smp = sampler_from_config(self._sampler_config(sampler, "sampler", base=self.sampler_cfg) if sampler
                                      else self.sampler_cfg)
        x0 = initial_noise(n, (2,), seed=seed, device=device)
        return smp.sample(predictor, x0).x.cpu()

    # -- the Experiment interface ------------------------------------------------------------------
    def run(self, run_dir: str) -> dict[str, Any]:
        os.makedirs(run_dir, exist_ok=True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun outside the CLI: join the group first
            init_distributed(resolve_device(self.trainer_cfg.get("device", "auto")))
        main = is_main_process()
        stage_seconds, training = {}, {}
        for name, stage in self.stages(run_dir).items():
            t0 = time.perf_counter()
            summary, trained_now = self._run_stage(name, stage)
            stage_seconds[name] = round(time.perf_counter() - t0, 2)
            final = summary.get("final_metrics") or {}
            training[name] = {"stage": os.path.relpath(stage.folder, run_dir), "trained_now": trained_now,
                              "steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"),
                              "ess_fraction": final.get("train/ess_fraction")}
            if main:
                self._publish(run_dir, name, stage)
        if not main:  # torchrun: the other ranks only train
            return {}
        self._unpublish_stale(run_dir)
        results = self.evaluate(run_dir)
        results["stage_seconds"] = stage_seconds
        results["training"] = training
        write_json(results, os.path.join(run_dir, "results.json"))
        return results

    @staticmethod
    def headline(results: dict[str, Any]) -> dict[str, float]:
        """A sweep's summary row: each method's energy-distance ratio per β and the training ESS
        fraction of each energy-weighted model (the batch's effective sample size / batch size)."""
        row = {f"{method}/{tag}/ratio": float(m["energy_distance_ratio"])
               for method, per_beta in results.get("methods", {}).items() for tag, m in per_beta.items()}
        row.update({f"{name}/ess_fraction": float(t["ess_fraction"])
                    for name, t in results.get("training", {}).items() if t.get("ess_fraction") is not None})
        return row

    def evaluate(self, run_dir: str, sampler: Optional[dict] = None) -> dict[str, Any]:
        """Distances of every method's samples to exact target samples, and the floor, per β.

        For each method, ``eval_repeats`` independent sets of ``num_eval_samples`` are drawn (one
        batched sampler call) and each is compared with an independent exact set of the same size;
        the reported distance is the mean.  The floor is the *expected* energy distance between two
        independent exact sets of that size, (2/n)·E|X − X'|, with E|X − X'| from 5000 exact
        samples: it is far less noisy than a measured floor (the V-statistic of 1000 points of a
        multi-modal target fluctuates by ±50 %).  ``energy_distance_ratio`` = distance / floor: ≈ 1
        means indistinguishable from exact samples at this size.

        The models are those of this configuration's stages (``results["stages"]``); a model that is
        not trained yet raises :class:`~energyflow.errors.InputError`.  ``results["target"]`` gives
        the exact target's pool size and effective sample size per β.
        """
        n, reps = self.num_eval_samples, self.eval_repeats
        results: dict[str, Any] = {"num_samples": n, "repeats": reps, "floor": {}, "methods": {}, "target": {},
                                   "stages": {name: os.path.relpath(stage.folder, run_dir)
                                              for name, stage in self.stages(run_dir).items()}}
        figure_rows = []
        for beta in self.betas:
            target = self._targets[beta]
            tag = _beta_tag(beta)
            results["target"][tag] = {"pool_size": self.pool_size, "pool_ess": target.pool_ess}
            g = torch.Generator().manual_seed(self.seed + 1000)
            big = target.sample(5000, g)
            mean_pair_distance = energy_distance_floor(big) * big.shape[0] / 2.0
            refs = [target.sample(n, g) for _ in range(reps + 1)]
            floor = {
                "energy_distance": 2.0 * mean_pair_distance / n,
                "sliced_wasserstein": sum(sliced_wasserstein(refs[i], refs[i + 1], generator=g) for i in range(reps)) / reps,
            }
            if not floor["energy_distance"] > 0:  # excluded by the ESS check on construction
                raise InputError(f"experiment.betas: the exact target at beta={beta:g} is a single point "
                                 f"(pool effective sample size {target.pool_ess:.1f}): no distance ratio exists")
            results["floor"][tag] = floor
            samples = {}
            for method in self.methods():
                draws = self._sample_method(run_dir, method, beta, n * reps, self.seed, sampler).split(n)
                ed = sum(energy_distance(x, refs[i]) for i, x in enumerate(draws)) / reps
                sw = sum(sliced_wasserstein(x, refs[i], generator=g) for i, x in enumerate(draws)) / reps
                results["methods"].setdefault(method, {})[tag] = {
                    "energy_distance": ed, "sliced_wasserstein": sw,
                    "energy_distance_ratio": ed / floor["energy_distance"],
                }
                samples[method] = draws[0]
            figure_rows.append((beta, target, refs[0], samples))
        write_json(results, os.path.join(run_dir, "eval.json"))
        if self.plot:
            from .plots import plot_toy_grid

            plot_toy_grid(figure_rows, sample_toy(self.dataset, n, torch.Generator().manual_seed(self.seed)),
                          os.path.join(run_dir, f"{self.dataset}.png"), title=f"{self.dataset}, E = {self.energy!r}")
        return results

    def sample(self, run_dir: str, num_samples: int, model: Optional[str] = None,
               sampler: Optional[dict[str, Any]] = None, seed: int = 0) -> SampleRecord:
        """``model`` is ``<method>_beta<β>`` (e.g. ``efm_ot_beta10``) or ``fm_ot``."""
        if model is None:
            model = f"efm_{self.paths[0]}_{_beta_tag(self.betas[-1])}" if self.paths else "fm_ot"
        m = _NAME.match(model)
        if not m or m["method"] not in METHODS or (m["beta"] is None and m["method"] != "fm_ot"):
            raise InputError(f"model must look like '<method>_beta<β>' with method in {METHODS}, got {model!r}")
        try:
            beta = check_number(float(m["beta"]), "model's beta", low=0.0) if m["beta"] else 0.0
        except ValueError:
            raise InputError(f"model {model!r}: cannot read β from {m['beta']!r}") from None
        x = self._sample_method(run_dir, m["method"], beta, num_samples, seed, sampler)
        return SampleRecord(x=x, meta={"model": model, "seed": seed, "sampler": sampler})
