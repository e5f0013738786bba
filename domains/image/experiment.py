"""Guided image synthesis: EFM against classifier guidance and classifier-free guidance, measured.

The target is q(x) ∝ p(x)·exp(−β·E(x)) for an image distribution p known through data and an
energy E: a classifier's E(x) = −log p(y ∈ S | x) for a target class set S (at β = 1 the target is
exactly p(x | y ∈ S), Bayes' identity), a black-box JPEG size, or their sum.

Methods (``algo``), each evaluated at every β:

* ``efm``: energy-weighted flow matching on the OT path (one UNet per β), trained on the data
  weighted by softmax(−βE) over each batch — no energy gradient, so E may be a black box;
* ``efm_vp``: energy-weighted diffusion (VP path, ε prediction);
* ``efm_resampled``: the same tilted target on the OT path, but the batches are drawn from the data
  set with probabilities softmax(−βE) over the *whole* set (energies computed once) and trained with
  the plain loss (:class:`~energyflow.data.TiltedResamplingSource`): no weight variance within a
  batch, where batch weights leave a sharp tilt's batch a few effective samples;
* ``unguided``: flow matching on the data (β-independent; the base of the next two);
* ``classifier_guidance``: the unguided model plus −β∇E(x̂1) at every step (a backward pass
  through the classifier and the UNet per network call; refuses a black-box energy);
* ``cfg``: classifier-free guidance at scale w = β on a class-conditional UNet trained with label
  dropout (needs a single target class; exact only at β = 1);
* ``iterative``: iterative EFM from the unguided model along the β schedule, using only its own
  samples and the energy (no training data after the base model).

Evaluation, all offline: the target-set rate under an *independent* classifier (another
architecture and seed than the guiding one), the Fréchet distance in that classifier's feature
space to real images of the target set (torchmetrics), the diversity of those features, the mean
energy (and the JPEG size), the sampling time per image at equal NFE, and PNG grids.

Caching: every trained model is a :class:`~energyflow.stages.Stage` keyed by everything that
changes it, including a content fingerprint of the training images; ``cache_dir`` (default
``<run_dir>/stages``) may be shared between runs — a sweep over ``algo`` or ``beta`` then trains
the classifiers and the unguided model once.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from energyflow.data import TensorBatchSource, TiltedResamplingSource
from energyflow.errors import InputError
from energyflow.experiment import Experiment, SampleRecord, fit_and_save, write_json
from energyflow.files import read_jsonl
from energyflow.losses import ClassificationLoss, EnergyWeightedLoss, FlowMatchingLoss
from energyflow.models import load_model
from energyflow.paths import VPPath, build_path
from energyflow.predictor import Predictor
from energyflow.runtime import resolve_device
from energyflow.sampling import initial_noise, sampler_from_config
from energyflow.stages import Stage
from energyflow.trainer import TrainerConfig
from energyflow.validation import check_integer, check_mapping as _mapping, check_number

__all__ = ["ImageExperiment", "ALGOS", "ENERGIES"]

ALGOS = ("efm", "efm_vp", "efm_resampled", "unguided", "classifier_guidance", "cfg", "iterative")
ENERGIES = ("classifier", "jpeg")
STAGE_FORMAT = 1  # bump when the training code changes what a stage with the same settings produces

_TRAINER_DEFAULTS = {"steps": 1500, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.995, "lr_schedule": "cosine",
                     "warmup_steps": 50, "log_every": 100, "grad_clip": 1.0}
_CLASSIFIER_DEFAULTS = {"arch": "conv", "width": 32, "num_features": 128, "steps": 600, "lr": 2e-3,
                        "batch_size": 128, "seed_offset": 0}
_EVALUATOR_DEFAULTS = {"arch": "mlp", "width": 32, "num_features": 64, "steps": 800, "lr": 2e-3,
                       "batch_size": 128, "seed_offset": 1000}
_CFG_DEFAULTS = {"label_dropout": 0.1}
_ITERATIVE_DEFAULTS = {"num_samples": 2000, "steps": 500, "lr": 1e-3, "batch_size": 128}
_GUIDANCE_DEFAULTS = {"at": "x1", "min_time": 0.1}
_JPEG_DEFAULTS = {"quality": 75, "unit": 32.0, "upscale": 4}


def _as_list(value: Any, key: str) -> list:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0:
        return list(value)
    raise InputError(f"{key} must be a value or a non-empty list, got {value!r}")


def _beta_tag(beta: float) -> str:
    return f"beta{beta:g}"


class ImageExperiment(Experiment):
    """Guided image synthesis on an image data set, every method scored by an independent classifier.

    Every input is checked on construction, before any training; a bad one raises
    :class:`~energyflow.errors.InputError` naming its recipe key.

    Args:
        dataset: ``digits`` (scikit-learn, offline), ``mnist8k`` (the shared MNIST split), ``mnist``,
            ``fashion_mnist``, ``cifar10`` (torchvision), ``idx`` or ``folder`` (``data_root``).
        data_root: the folder of ``idx`` / ``folder`` data, or torchvision's root.
        download: let torchvision download (needs a network; offline it fails at once).
        algo: a method of :data:`ALGOS` or a list of them.
        energy: ``classifier``, ``jpeg`` or a sum ``classifier+jpeg``.
        target: the target class (or list of classes) S of the classifier energy.
        betas: β values (≥ 0).
        net: ``{"preset": "cpu"|"gpu", ...UNetField overrides}``.
        trainer: :class:`~energyflow.trainer.TrainerConfig` fields of every UNet.
        classifier: the guiding classifier (``arch``, ``width``, ``num_features``, ``steps``, ``lr``,
            ``batch_size``, ``seed_offset``); its energy defines E.
        evaluator: the independent evaluation classifier (same keys; another arch and seed).
        cfg: ``{"label_dropout": p}`` of the class-conditional model.
        iterative: ``num_samples`` per round and the trainer ``steps``/``lr``/``batch_size`` of each round.
        guidance: ``{"at": "x1"|"xt", "min_time": ...}`` of classifier guidance.
        jpeg: ``{"quality", "unit", "upscale"}`` of the JPEG-size energy.
        sampler: ``{"name", "steps"}`` of every model on the OT path (default Heun, 10 steps: 20 NFE).
        vp_sampler: the sampler of the VP-path models (default DPM-Solver++, 20 steps: the same 20 NFE;
            a 10-step Heun ODE on the VP path is far too coarse near the noise end).
        x1_clip: bound on |x̂1| when sampling (images lie in [−1, 1]).
        num_eval_samples: samples per method and β.
        reference: also train a model on the target-class images alone and report it (β = 1 check).
        cache_dir: where stages live (default ``<run_dir>/stages``); may be shared between runs.
        seed: seeds data splits, training and sampling.
    """

    supports_distributed = False

    def __init__(self, dataset: str = "digits", data_root: Optional[str] = None, download: bool = False,
                 algo: Any = "efm", energy: str = "classifier", target: Any = 3,
                 betas: Any = (1.0, 3.0, 10.0), net: Optional[dict] = None, trainer: Optional[dict] = None,
                 classifier: Optional[dict] = None, evaluator: Optional[dict] = None, cfg: Optional[dict] = None,
                 iterative: Optional[dict] = None, guidance: Optional[dict] = None, jpeg: Optional[dict] = None,
                 sampler: Optional[dict] = None, vp_sampler: Optional[dict] = None, x1_clip: Optional[float] = 1.0, num_eval_samples: int = 500,
                 grid_samples: int = 64, reference: bool = True, cache_dir: Optional[str] = None, seed: int = 0):
        from .datasets import DATASETS

        if dataset not in DATASETS:
            raise InputError(f"experiment.dataset: unknown image data set {dataset!r}; choose one of {list(DATASETS)}")
        self.dataset, self.data_root, self.download = dataset, data_root, bool(download)
        self.algos = [str(a) for a in _as_list(algo, "algo")]
        unknown = [a for a in self.algos if a not in ALGOS]
        if unknown:
            raise InputError(f"algo: unknown method(s) {unknown}; choose from {list(ALGOS)}")
        if not isinstance(energy, str) or not energy:
            raise InputError(f"energy must be a name like 'classifier', 'jpeg' or 'classifier+jpeg', got {energy!r}")
        self.energy_terms = [e.strip() for e in energy.split("+")]
        bad = [e for e in self.energy_terms if e not in ENERGIES]
        if bad or len(set(self.energy_terms)) != len(self.energy_terms):
            raise InputError(f"energy: {energy!r} is not a sum of distinct energies from {list(ENERGIES)}")
        self.energy_name = "+".join(self.energy_terms)
        self.targets = sorted({check_integer(t, "target", minimum=0) for t in _as_list(target, "target")})
        self.betas = sorted({check_number(b, "beta", low=0.0) for b in _as_list(betas, "beta")})
        if "jpeg" in self.energy_terms:
            for a in ("classifier_guidance", "cfg"):
                if a in self.algos:
                    raise InputError(f"algo={a} needs a differentiable classifier energy, but energy={energy!r} "
                                     f"includes the black-box JPEG size (no gradient exists): use efm, efm_vp or "
                                     f"iterative")
        if "cfg" in self.algos and (self.energy_terms != ["classifier"] or len(self.targets) != 1):
            raise InputError("algo=cfg conditions on one class: it needs energy=classifier and a single target "
                             f"class, got energy={energy!r}, target={self.targets}")
        net = _mapping(net, "experiment.net", ("preset", "block_out_channels", "layers_per_block", "attention",
                                               "norm_num_groups", "dropout"))
        self.preset = net.pop("preset", "cpu")
        if self.preset not in ("cpu", "gpu"):
            raise InputError(f"experiment.net.preset must be 'cpu' or 'gpu', got {self.preset!r}")
        self.net_overrides = net
        self.trainer_cfg = {**_TRAINER_DEFAULTS, **_mapping(trainer, "experiment.trainer",
                                                            [f for f in TrainerConfig.__dataclass_fields__])}
        self._trainer = TrainerConfig.from_dict({"seed": 0, **self.trainer_cfg}, "experiment.trainer")
        self.classifier_cfg = {**_CLASSIFIER_DEFAULTS, **_mapping(classifier, "experiment.classifier",
                                                                  _CLASSIFIER_DEFAULTS)}
        self.evaluator_cfg = {**_EVALUATOR_DEFAULTS, **_mapping(evaluator, "experiment.evaluator", _EVALUATOR_DEFAULTS)}
        for key, c in (("classifier", self.classifier_cfg), ("evaluator", self.evaluator_cfg)):
            if c["arch"] not in ("conv", "mlp"):
                raise InputError(f"experiment.{key}.arch must be 'conv' or 'mlp', got {c['arch']!r}")
            for k in ("width", "num_features", "steps", "batch_size"):
                c[k] = check_integer(c[k], f"experiment.{key}.{k}", minimum=1)
            c["seed_offset"] = check_integer(c["seed_offset"], f"experiment.{key}.seed_offset", minimum=0)
            c["lr"] = check_number(c["lr"], f"experiment.{key}.lr", low=0.0, low_inclusive=False)
        if (self.classifier_cfg["arch"], self.classifier_cfg["seed_offset"]) == \
                (self.evaluator_cfg["arch"], self.evaluator_cfg["seed_offset"]):
            raise InputError("experiment.evaluator must differ from experiment.classifier in arch or seed_offset "
                             "(the evaluator is the independent judge of the guided samples)")
        self.cfg_cfg = {**_CFG_DEFAULTS, **_mapping(cfg, "experiment.cfg", _CFG_DEFAULTS)}
        self.cfg_cfg["label_dropout"] = check_number(self.cfg_cfg["label_dropout"], "experiment.cfg.label_dropout",
                                                     low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.iterative_cfg = {**_ITERATIVE_DEFAULTS, **_mapping(iterative, "experiment.iterative", _ITERATIVE_DEFAULTS)}
        for k in ("num_samples", "steps", "batch_size"):
            self.iterative_cfg[k] = check_integer(self.iterative_cfg[k], f"experiment.iterative.{k}", minimum=1)
        self.guidance_cfg = {**_GUIDANCE_DEFAULTS, **_mapping(guidance, "experiment.guidance", _GUIDANCE_DEFAULTS)}
        if self.guidance_cfg["at"] not in ("x1", "xt"):
            raise InputError(f"experiment.guidance.at must be 'x1' or 'xt', got {self.guidance_cfg['at']!r}")
        self.guidance_cfg["min_time"] = check_number(self.guidance_cfg["min_time"], "experiment.guidance.min_time",
                                                     low=0.0, high=1.0, low_inclusive=False)
        self.jpeg_cfg = {**_JPEG_DEFAULTS, **_mapping(jpeg, "experiment.jpeg", _JPEG_DEFAULTS)}
        self.jpeg_cfg["quality"] = check_integer(self.jpeg_cfg["quality"], "experiment.jpeg.quality", minimum=1,
                                                 maximum=95)
        self.jpeg_cfg["upscale"] = check_integer(self.jpeg_cfg["upscale"], "experiment.jpeg.upscale", minimum=1)
        self.jpeg_cfg["unit"] = check_number(self.jpeg_cfg["unit"], "experiment.jpeg.unit", low=0.0,
                                             low_inclusive=False)
        if sampler is not None and not isinstance(sampler, dict):
            raise InputError(f"experiment.sampler must be a mapping like {{name: heun, steps: 10}}, got {sampler!r}")
        self.sampler_cfg = {"name": "heun", "steps": 10, **(sampler or {})}
        if vp_sampler is not None and not isinstance(vp_sampler, dict):
            raise InputError(f"experiment.vp_sampler must be a mapping like {{name: dpm, steps: 20}}, got {vp_sampler!r}")
        self.vp_sampler_cfg = {"name": "dpm", "steps": 20, **(vp_sampler or {})}
        for key, cfg in (("experiment.sampler", self.sampler_cfg), ("experiment.vp_sampler", self.vp_sampler_cfg)):
            try:
                sampler_from_config(cfg)
            except (TypeError, ValueError, ImportError) as err:
                raise InputError(f"{key}: {err}") from None
        self.x1_clip = None if x1_clip is None else check_number(x1_clip, "experiment.x1_clip", low=0.0,
                                                                 low_inclusive=False)
        self.num_eval_samples = check_integer(num_eval_samples, "experiment.num_eval_samples", minimum=2)
        self.grid_samples = check_integer(grid_samples, "experiment.grid_samples", minimum=1)
        if not isinstance(reference, bool):
            raise InputError(f"experiment.reference must be true or false, got {reference!r}")
        self.reference = reference and "classifier" in self.energy_terms
        self.cache_dir = cache_dir
        self.seed = check_integer(seed, "experiment.seed", minimum=0)
        self._data: dict[str, Any] = {}
        self._check_targets(self.data("train").num_classes)  # loads the data: a missing data set fails here

    # -- data ------------------------------------------------------------------------------------
    def data(self, split: str):
        """The ``split`` (``train``, ``test`` or ``all``) of the data set (loaded once)."""
        if split not in self._data:
            from .datasets import load_image_data

            self._data[split] = load_image_data(self.dataset, split=split, root=self.data_root, seed=self.seed,
                                                download=self.download)
        return self._data[split]

    def _check_targets(self, num_classes: int) -> None:
        bad = [t for t in self.targets if t >= num_classes]
        if bad:
            raise InputError(f"target: class(es) {bad} do not exist in {self.dataset} ({num_classes} classes: "
                             f"0..{num_classes - 1})")

    # -- stages ------------------------------------------------------------------------------------
    def _root(self, run_dir: str) -> str:
        return self.cache_dir or os.path.join(run_dir, "stages")

    def _trainer_fields(self, **override: Any) -> dict[str, Any]:
        return TrainerConfig.from_dict({**self.trainer_cfg, "seed": self.seed, **override}).result_fields()

    def _unet_kwargs(self, num_classes: int = 0) -> dict[str, Any]:
        from energyflow.image_nets import unet_preset

        return {**unet_preset(self.preset, list(self.data("train").image_shape), num_classes), **self.net_overrides}

    def _classifier_stage(self, run_dir: str, role: str) -> Stage:
        c = self.classifier_cfg if role == "classifier" else self.evaluator_cfg
        train = self.data("train")
        spec = {"format": STAGE_FORMAT, "role": role, "data": train.fingerprint(), "net": {k: c[k] for k in (
            "arch", "width", "num_features")}, "trainer": self._trainer_fields(
            steps=c["steps"], lr=c["lr"], batch_size=c["batch_size"], seed=self.seed + c["seed_offset"],
            warmup_steps=0)}
        return Stage(role, spec, self._root(run_dir))

    def _energy_spec(self, run_dir: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"terms": self.energy_terms}
        if "classifier" in self.energy_terms:
            spec["classifier"] = self._classifier_stage(run_dir, "classifier").key
            spec["targets"] = self.targets
        if "jpeg" in self.energy_terms:
            spec["jpeg"] = self.jpeg_cfg
        return spec

    def _model_specs(self, run_dir: str) -> dict[str, dict[str, Any]]:
        """name → stage config of every generative model this configuration needs."""
        common = {"format": STAGE_FORMAT, "data": self.data("train").fingerprint(), "seed": self.seed,
                  "preset": self.preset, "net": self.net_overrides, "trainer": self._trainer_fields()}
        specs: dict[str, dict[str, Any]] = {}
        if {"unguided", "classifier_guidance", "iterative"} & set(self.algos):
            specs["unguided"] = {**common, "kind": "fm", "path": "ot"}
        for algo, path, kind in (("efm", "ot", "efm"), ("efm_vp", "vp", "efm"), ("efm_resampled", "ot", "resampled")):
            if algo in self.algos:
                for b in self.betas:
                    specs[f"{algo}_{_beta_tag(b)}"] = {**common, "kind": kind, "path": path, "beta": b,
                                                      "energy": self._energy_spec(run_dir)}
        if "cfg" in self.algos:
            specs["cfg"] = {**common, "kind": "cfg", "path": "ot", **self.cfg_cfg}
        if self.reference:
            specs["class_only"] = {**common, "kind": "fm", "path": "ot", "classes": self.targets}
        if "iterative" in self.algos:
            specs["iterative"] = {**common, "kind": "iterative", "path": "ot", "schedule": self.betas,
                                  "energy": self._energy_spec(run_dir), "rounds": self.iterative_cfg,
                                  "sampler": self.sampler_cfg, "x1_clip": self.x1_clip}
        return specs

    def stages(self, run_dir: str) -> dict[str, Stage]:
        """Every stage of this configuration, in training order."""
        root = self._root(run_dir)
        out = {"classifier": self._classifier_stage(run_dir, "classifier"),
               "evaluator": self._classifier_stage(run_dir, "evaluator")}
        specs = self._model_specs(run_dir)
        for name, spec in specs.items():
            upstream = [out["unguided"]] if name == "iterative" else []
            out[name] = Stage(name, spec, root, upstream=upstream)
        return out

    # -- training ----------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return resolve_device(self.trainer_cfg.get("device", "auto"))

    def _train_classifier(self, stage: Stage, role: str) -> dict[str, Any]:
        from energyflow.image_nets import ConvClassifier

        c = self.classifier_cfg if role == "classifier" else self.evaluator_cfg
        train = self.data("train")
        seed = self.seed + c["seed_offset"]

        def fit(folder: str) -> dict[str, Any]:
            torch.manual_seed(seed)
            net = ConvClassifier(list(train.image_shape), train.num_classes, arch=c["arch"], width=c["width"],
                                 num_features=c["num_features"])
            config = TrainerConfig.from_dict({**self.trainer_cfg, "steps": c["steps"], "lr": c["lr"],
                                              "batch_size": c["batch_size"], "seed": seed, "warmup_steps": 0},
                                             f"experiment.{role}")
            source = TensorBatchSource({"x1": train.images, "cond": train.labels})
            summary = fit_and_save(net, ClassificationLoss(), source, config, os.path.join(folder, "train"),
                                   os.path.join(folder, "model.pt"), meta={"role": role}, name=role)
            test = self.data("test")
            model = load_model(os.path.join(folder, "model.pt")).net
            with torch.no_grad():
                acc = float((model(test.images).argmax(1) == test.labels).float().mean())
            return {**summary, "test_accuracy": acc}

        return stage.run(fit)

    def _classifier(self, run_dir: str, role: str, device: torch.device):
        stage = self._classifier_stage(run_dir, role)
        return load_model(stage.file("model.pt"), map_location=device).net.to(device).eval()

    def energy(self, run_dir: str, device: Optional[torch.device] = None):
        """The energy E of this configuration (needs the guiding classifier's stage done)."""
        from .energies import ClassifierEnergy, JPEGSizeEnergy

        device = device or self._device()
        terms = []
        if "classifier" in self.energy_terms:
            terms.append(ClassifierEnergy(self._classifier(run_dir, "classifier", device), self.targets))
        if "jpeg" in self.energy_terms:
            terms.append(JPEGSizeEnergy(**self.jpeg_cfg))
        energy = terms[0]
        for e in terms[1:]:
            energy = energy + e
        return energy

    @torch.no_grad()
    def _data_energies(self, run_dir: str, images: Tensor) -> Tensor:
        energy, out = self.energy(run_dir, torch.device("cpu")), []
        for i in range(0, images.shape[0], 1000):
            out.append(energy(images[i:i + 1000]).float())
        return torch.cat(out)

    def _train_model(self, run_dir: str, name: str, stage: Stage) -> dict[str, Any]:
        from energyflow.image_nets import UNetField

        spec = stage.config
        train = self.data("train")
        config = TrainerConfig.from_dict({**self.trainer_cfg, "seed": self.seed}, "experiment.trainer")
        path = build_path(spec["path"])

        def fit(folder: str) -> dict[str, Any]:
            torch.manual_seed(self.seed)
            num_classes = train.num_classes if spec["kind"] == "cfg" else 0
            net = UNetField(**self._unet_kwargs(num_classes))
            images, labels = train.images, train.labels
            if "classes" in spec:
                keep = torch.isin(labels, torch.tensor(spec["classes"]))
                images, labels = images[keep], labels[keep]
            if spec["kind"] == "efm":
                energies = self._data_energies(run_dir, images)
                source = TensorBatchSource({"x1": images, "energy": energies})
                objective = EnergyWeightedLoss(path, spec["beta"])
            elif spec["kind"] == "resampled":
                source = TiltedResamplingSource({"x1": images}, self._data_energies(run_dir, images), spec["beta"])
                objective = FlowMatchingLoss(path)
            elif spec["kind"] == "cfg":
                source = _LabelDropout(TensorBatchSource({"x1": images, "cond": labels}), spec["label_dropout"])
                objective = FlowMatchingLoss(path)
            else:
                source = TensorBatchSource({"x1": images})
                objective = FlowMatchingLoss(path)
            return fit_and_save(net, objective, source, config, os.path.join(folder, "train"),
                                os.path.join(folder, "model.pt"), path=path,
                                meta={"name": name, "kind": spec["kind"], "beta": spec.get("beta", 0.0),
                                      "sampler": self.sampler_cfg}, name=name)

        return stage.run(fit)

    def _run_iterative(self, run_dir: str, stage: Stage, base: Stage) -> dict[str, Any]:
        from energyflow.iterative import iterative_tilt

        device = self._device()
        it = self.iterative_cfg

        def fit(folder: str) -> dict[str, Any]:
            start = load_model(base.file("model.pt"), map_location=device)
            trainer = {**self.trainer_cfg, "steps": it["steps"], "lr": it["lr"], "batch_size": it["batch_size"],
                       "warmup_steps": 0, "seed": self.seed, "progress": self.trainer_cfg.get("progress", True)}
            trainer.pop("resume", None)
            result = iterative_tilt(start.net.to(device), start.path, self.energy(run_dir, device), self.betas,
                                    it["num_samples"], self.data("train").image_shape, trainer=trainer,
                                    sampler=self.sampler_cfg, seed=self.seed, out_dir=folder)
            return {"rounds": [{"beta": r.beta, "delta_beta": r.delta_beta, "ess_fraction": r.ess_fraction,
                                "train_ess_fraction": r.train_ess_fraction, "train_seconds": r.train_seconds}
                               for r in result.records]}

        return stage.run(fit)

    # -- sampling ------------------------------------------------------------------------------------
    def _model(self, stage: Stage, file: str, device: torch.device):
        if not stage.done:
            raise InputError(f"model {stage.name!r} of this configuration is not trained (stage {stage.folder} is "
                             f"missing or unfinished): run 'energyflow run' with this config first")
        return load_model(stage.file(file), map_location=device)

    def predictor(self, run_dir: str, algo: str, beta: float, device: torch.device) -> tuple[Predictor, Any]:
        """The sampling predictor of ``algo`` at ``beta`` and the ``cond`` it samples with (labels or None)."""
        from energyflow.guidance import ClassifierFreeGuidancePredictor, EnergyGuidedPredictor

        stages = self.stages(run_dir)
        if algo in ("efm", "efm_vp", "efm_resampled"):
            m = self._model(stages[f"{algo}_{_beta_tag(beta)}"], "model.pt", device)
        elif algo == "iterative":
            records = read_jsonl(stages["iterative"].file("rounds.jsonl"), what="iterative rounds log") \
                if stages["iterative"].done else []
            rounds = [r["round"] for r in records if abs(r["beta"] - beta) < 1e-9]
            if not rounds:
                raise InputError(f"the iterative stage holds no round at beta={beta:g}")
            m = self._model(stages["iterative"], f"round{rounds[0]}/model.pt", device)
        elif algo in ("unguided", "classifier_guidance", "class_only"):
            m = self._model(stages["class_only" if algo == "class_only" else "unguided"], "model.pt", device)
        elif algo == "cfg":
            m = self._model(stages["cfg"], "model.pt", device)
        else:
            raise InputError(f"unknown method {algo!r}; choose one of {list(ALGOS)}")
        base = Predictor(m.net.to(device).eval(), m.path, m.prediction, x1_clip=self.x1_clip)
        if algo == "classifier_guidance":
            return EnergyGuidedPredictor(base, self.energy(run_dir, device), beta, at=self.guidance_cfg["at"],
                                         min_time=self.guidance_cfg["min_time"]), None
        if algo == "cfg":
            return ClassifierFreeGuidancePredictor(base, scale=beta), self.targets[0]
        return base, None

    def draw(self, run_dir: str, algo: str, beta: float, num: int, seed: int,
             sampler: Optional[dict] = None) -> tuple[Tensor, float, int]:
        """``num`` samples of ``algo`` at ``beta`` (clamped to [−1, 1]), the seconds per image, the NFE."""
        device = self._device()
        predictor, label = self.predictor(run_dir, algo, beta, device)
        base = self.vp_sampler_cfg if isinstance(predictor.path, VPPath) else self.sampler_cfg
        smp = sampler_from_config(base, sampler)
        x0 = initial_noise(num, self.data("train").image_shape, seed=seed, device=device)
        cond = None if label is None else torch.full((num,), label, dtype=torch.long, device=device)
        smp.sample(predictor, x0[:2], None if cond is None else cond[:2])  # warm-up: not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = []
        for i in range(0, num, 500):
            c = None if cond is None else cond[i:i + 500]
            res = smp.sample(predictor, x0[i:i + 500], c)
            out.append(res.x.clamp(-1.0, 1.0).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return torch.cat(out), (time.perf_counter() - start) / num, res.nfe

    # -- the Experiment interface --------------------------------------------------------------------
    def run(self, run_dir: str) -> dict[str, Any]:
        os.makedirs(run_dir, exist_ok=True)
        stages = self.stages(run_dir)
        training: dict[str, Any] = {}
        for name, stage in stages.items():
            t0 = time.perf_counter()
            if name in ("classifier", "evaluator"):
                summary = self._train_classifier(stage, name)
            elif name == "iterative":
                summary = self._run_iterative(run_dir, stage, stages["unguided"])
            else:
                summary = self._train_model(run_dir, name, stage)
            final = summary.get("final_metrics") or {}
            training[name] = {"stage": os.path.relpath(stage.folder, run_dir), "seconds": round(time.perf_counter() - t0, 2),
                              "ess_fraction": final.get(f"{name}/ess_fraction"),
                              "test_accuracy": summary.get("test_accuracy"), "rounds": summary.get("rounds")}
        results = self.evaluate(run_dir)
        results["training"] = training
        write_json(results, os.path.join(run_dir, "results.json"))
        return results

    def evaluate(self, run_dir: str, sampler: Optional[dict] = None) -> dict[str, Any]:
        """Score every method at every β (see the module docstring); writes ``eval.json``, grids in
        ``grids/`` and ``beta_sweep.png``; returns the rows."""
        from energyflow.figures import save_image_grid

        from .energies import JPEGSizeEnergy
        from .evaluate import beta_sweep_figure, diversity, frechet_distance, target_rate

        device = self._device()
        evaluator = self._classifier(run_dir, "evaluator", device)
        n = self.num_eval_samples
        everything = self.data("all")
        real = everything.of_classes(self.targets) if "classifier" in self.energy_terms else everything
        real_images = real.images.to(device)
        energy = self.energy(run_dir, device)
        jpeg = JPEGSizeEnergy(**self.jpeg_cfg)

        def score(x: Tensor) -> dict[str, Any]:
            x = x.to(device)
            with torch.no_grad():
                row = {"energy": float(energy(x).mean()), "jpeg_size": float(jpeg(x).mean()),
                       "frechet": frechet_distance(evaluator, real_images, x),
                       "diversity": diversity(evaluator, x)}
            if "classifier" in self.energy_terms:
                row["target_rate"] = target_rate(evaluator, x, self.targets)
            return row

        grids = os.path.join(run_dir, "grids")
        rows: list[dict[str, Any]] = []
        reference: dict[str, Any] = {"real": {**score(real_images), "count": len(real)}}
        if self.reference:
            x, sec, nfe = self.draw(run_dir, "class_only", 1.0, n, self.seed + 1, sampler)
            reference["class_only"] = {**score(x), "seconds_per_image": sec, "nfe": nfe}
            save_image_grid(x[:self.grid_samples], os.path.join(grids, "class_only.png"))
        cache: dict[str, tuple[Tensor, float, int]] = {}
        for beta in self.betas:
            for algo in self.algos:
                if algo == "unguided":
                    cache.setdefault(algo, self.draw(run_dir, algo, beta, n, self.seed + 1, sampler))
                    x, sec, nfe = cache[algo]
                else:
                    x, sec, nfe = self.draw(run_dir, algo, beta, n, self.seed + 1, sampler)
                rows.append({"method": algo, "beta": beta, **score(x), "seconds_per_image": sec, "nfe": nfe})
                save_image_grid(x[:self.grid_samples], os.path.join(grids, f"{algo}_{_beta_tag(beta)}.png"))
        metrics = [m for m in ("target_rate", "frechet", "jpeg_size") if m in rows[0]]
        beta_sweep_figure(rows, os.path.join(run_dir, "beta_sweep.png"), metrics=tuple(metrics))
        results = {"dataset": self.dataset, "energy": self.energy_name, "targets": self.targets,
                   "num_samples": n, "sampler": {**self.sampler_cfg, **(sampler or {})},
                   "vp_sampler": {**self.vp_sampler_cfg, **(sampler or {})}, "rows": rows,
                   "reference": reference}
        write_json(results, os.path.join(run_dir, "eval.json"))
        return results

    @staticmethod
    def headline(results: dict[str, Any]) -> dict[str, float]:
        """A sweep's summary row: every method's target rate, Fréchet distance and mean JPEG size per β."""
        row: dict[str, float] = {}
        for r in results.get("rows", []):
            for m in ("target_rate", "frechet", "jpeg_size"):
                if r.get(m) is not None:
                    row[f"{r['method']}/{_beta_tag(r['beta'])}/{m}"] = float(r[m])
        return row

    def sample(self, run_dir: str, num_samples: int, model: Optional[str] = None,
               sampler: Optional[dict[str, Any]] = None, seed: int = 0) -> SampleRecord:
        """``model`` is ``<algo>_beta<β>`` (e.g. ``efm_beta10``, ``cfg_beta3``) or ``unguided``; default:
        the first algo at the largest β."""
        import re

        if model is None:
            model = f"{self.algos[0]}_{_beta_tag(self.betas[-1])}"
        m = re.match(r"^(?P<algo>[a-z_]+?)(?:_beta(?P<beta>[0-9.eE+-]+))?$", model)
        if not m or m["algo"] not in (*ALGOS, "class_only"):
            raise InputError(f"model must look like '<algo>_beta<β>' with algo in {list(ALGOS)}, got {model!r}")
        try:
            beta = float(m["beta"]) if m["beta"] else 0.0
        except ValueError:
            raise InputError(f"model {model!r}: cannot read β from {m['beta']!r}") from None
        x, _, _ = self.draw(run_dir, m["algo"], beta, num_samples, seed, sampler)
        return SampleRecord(x=x, meta={"model": model, "seed": seed, "sampler": sampler})


class _LabelDropout:
    """A batch source whose labels (``cond``) are replaced by −1 ("no label") with probability ``p``,
    drawn from the trainer's generator (so runs stay reproducible and resumable): the
    classifier-free-guidance model learns p(x) and p(x | y) at once."""

    def __init__(self, source: TensorBatchSource, p: float):
        self.source, self.p = source, float(p)

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        batch = self.source.sample(batch_size, generator)
        drop = torch.rand(batch_size, generator=generator) < self.p
        batch["cond"] = torch.where(drop.to(batch["cond"].device), torch.full_like(batch["cond"], -1), batch["cond"])
        return batch
