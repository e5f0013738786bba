"""De novo molecules steered by RDKit properties, with no property predictor.

p(m) is the distribution of a molecule set (RDKit's NCI set offline, or any SMILES / CSV / SDF
file), known only through its members, and E(m) a property energy computed by RDKit
(:mod:`domains.molecule.properties`: −QED, |logP − target|, the SA score, …).  The target is

    q(m) ∝ p(m) · exp(−β E(m))

**Representation** (``representation``; docs/molecules_denovo.md).  Molecules are SELFIES token
sequences (:class:`~domains.molecule.selfies_codec.SelfiesCodec`): every token sequence decodes to a
molecule that obeys valence rules, so the energies of the model's own samples are always defined.

* ``latent`` (default): a β-VAE over the tokens (:class:`~domains.molecule.selfies_vae.SelfiesVAE`,
  GRU encoder, autoregressive GRU decoder) and a flow (:class:`~energyflow.nets.MLPField`) over the
  molecules' standardised posterior means; samples are decoded greedily;
* ``tokens``: a flow over ``2·onehot − 1`` ``[L, V]`` with a transformer that predicts the clean
  tokens on the simplex (:class:`~domains.molecule.sequence_nets.SequenceField`), decoded by argmax.

**Models** (``models``), all flows on the conditional-OT path:

* ``unguided``: flow matching on the molecule set, the baseline;
* ``efm``: energy-weighted flow matching: each batch's loss weighted by softmax(−βE) of its
  molecules' RDKit scores, computed once from the training molecules (no network predicts them,
  no gradient of E is taken);
* ``iterative``: iterative EFM (:func:`energyflow.iterative.iterative_tilt`) from the unguided
  model: each round samples from the current model, scores the *decoded* molecules with RDKit
  and refits by EFM at Δβ = β, so after K rounds the target is p·exp(−Kβ E) and the chain
  reaches molecules the data's single batch cannot weight.

β: a number, or ``auto``: the β at which softmax(−βE) over a training batch keeps a mean
effective sample size of ``beta_auto_ess`` of the batch (a scale-free choice made on the
training molecules alone, never on generated samples).

**Evaluation** (``evaluation.num_samples`` molecules per model): validity, uniqueness, novelty
against the training set, internal diversity, the property distributions (mean, quantiles,
histograms), the fraction meeting the energy's target, a drawn grid, and the sampling time per
molecule; beside them the training set itself and its best-k (the ``num_samples`` lowest-energy
training molecules: what a chemist would do without a model).

Every stage (the molecule set with its scores, each model, the iterative rounds) is cached under
``cache_dir`` with a key covering its inputs, including the content hash of the input file.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from energyflow.errors import InputError
from energyflow.experiment import Experiment, SampleRecord, fit_and_save, write_json
from energyflow.files import atomic_open, atomic_torch_save, load_torch, write_text
from energyflow.models import load_model
from energyflow.runtime import resolve_device, resolve_workers
from energyflow.sampling import initial_noise, sampler_from_config
from energyflow.stages import Stage, fingerprint
from energyflow.trainer import TrainerConfig
from energyflow.validation import check_integer, check_mapping, check_number

__all__ = ["DeNovoExperiment", "MODELS", "DeNovoData"]

MODELS = ("unguided", "efm", "iterative")
REPRESENTATIONS = ("latent", "tokens")
DATA_KEYS = ("min_heavy", "max_heavy", "max_len", "max_molecules", "elements", "workers")
NET_KEYS = {"latent": ("hidden", "depth", "time_dim"), "tokens": ("hidden", "layers", "heads", "ff", "time_dim", "dropout")}
NET_DEFAULTS = {"latent": {"hidden": 256, "depth": 3}, "tokens": {"hidden": 64, "layers": 2, "heads": 4, "ff": 128}}
VAE_KEYS = ("embed", "hidden", "latent", "kl_weight", "steps", "batch_size", "lr", "grad_clip")
ITERATIVE_KEYS = ("rounds", "num_samples", "steps", "lr")
EVAL_KEYS = ("num_samples", "grid", "workers", "batch_size")


class DeNovoData:
    """The molecule set of a run: canonical SMILES, SELFIES tokens ``[N, L]``, the codec, and the
    RDKit properties of every molecule (``props[name]`` float64 ``[N]``)."""

    def __init__(self, record: dict[str, Any]):
        from .selfies_codec import SelfiesCodec

        self.smiles: list[str] = list(record["smiles"])
        self.tokens: Tensor = record["tokens"]
        self.codec = SelfiesCodec.from_dict(record["codec"])
        self.props: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float64) for k, v in record["props"].items()}
        self.skips: dict[str, int] = dict(record.get("skips") or {})

    def __len__(self) -> int:
        return len(self.smiles)


class DeNovoExperiment(Experiment):
    """Molecules from a flow over SELFIES tokens, tilted by exp(−β E_RDKit) (module docstring).

    Args:
        dataset: ``nci`` (RDKit's bundled NCI set, offline) or a ``.smi`` / ``.txt`` / ``.csv`` / ``.sdf`` file
            (ZINC, MOSES or ChEMBL exports work as SMILES lists).
        energy: ``qed`` | ``logp`` | ``sa`` | ``tpsa`` | ``mw`` | ``combo``, or a mapping
            ``{property: weight}`` for a weighted sum (:func:`~domains.molecule.properties.build_property_energy`).
        target: the target of a single-property energy (``None``: its default).
        beta: β ≥ 0, or ``auto`` (see the module docstring).
        beta_auto_ess: the batch ESS fraction that ``beta: auto`` keeps.
        models: any of ``unguided``, ``efm``, ``iterative`` (``iterative`` starts from ``unguided``).
        seed: seeds training and sampling.
        data: ``min_heavy`` / ``max_heavy`` heavy atoms, ``max_len`` SELFIES tokens, ``max_molecules``
            (a seeded subset, 0 = all), ``elements``, ``workers`` scoring the set (``auto``: all CPUs).
        representation: ``latent`` (a flow in the latent space of a SELFIES autoencoder, the default) or
            ``tokens`` (a flow over one-hot SELFIES tokens); see docs/molecules_denovo.md.
        efm_scores: with ``latent``, what EFM's weights score: ``decoded``, the molecule each training
            latent code decodes to (exact for the model's decoded distribution, whose codes do not all
            reconstruct their molecules), or ``data``, the training molecule itself.
        vae: the autoencoder of ``latent`` (:class:`~domains.molecule.selfies_vae.SelfiesVAE` sizes
            ``embed`` / ``hidden`` / ``latent``, ``kl_weight``, and its training: ``steps``, ``batch_size``,
            ``lr``, ``grad_clip``).
        net: the flow's network: :class:`~energyflow.nets.MLPField` arguments (``latent``) or
            :class:`~domains.molecule.sequence_nets.SequenceField` arguments (``tokens``).
        trainer: :class:`~energyflow.trainer.TrainerConfig` settings of the two trained models.
        sampler: the ODE sampler (``name``, ``steps``).
        loss: ``cross_entropy`` (of the predicted token probabilities) or ``squared`` error of the
            clean-data prediction; the network predicts x̂1 on the simplex either way.
        iterative: ``rounds`` K, ``num_samples`` fresh molecules per round, ``steps`` and ``lr`` of
            each round's fit (the other trainer settings are the main trainer's).
        evaluation: ``num_samples`` per model (and the k of the best-k baseline), ``grid`` molecules
            drawn per model, ``workers`` scoring them, ``batch_size`` of sampling.
        cache_dir: where stages are cached (``None``: ``<run_dir>/../stages``).
        progress: progress bars.
    """

    def __init__(self, dataset: str = "nci", energy: Any = "qed", target: Optional[float] = None,
                 beta: Any = "auto", beta_auto_ess: float = 0.25,
                 models: Sequence[str] | str = MODELS, seed: int = 0, data: Optional[dict] = None,
                 net: Optional[dict] = None, trainer: Optional[dict] = None, sampler: Optional[dict] = None,
                 iterative: Optional[dict] = None, evaluation: Optional[dict] = None, loss: str = "cross_entropy",
                 representation: str = "latent", vae: Optional[dict] = None, efm_scores: str = "decoded",
                 cache_dir: Optional[str] = None, progress: bool = True):
        from .properties import build_property_energy

        self.dataset = str(dataset)
        self._check_dataset()
        spec = dict(energy) if isinstance(energy, dict) or hasattr(energy, "items") else energy
        self.energy_spec = spec
        self.target = None if target is None else check_number(target, "target")
        self.energy = build_property_energy(spec, target=self.target)
        if isinstance(beta, str):
            if beta != "auto":
                raise InputError(f"beta must be a number >= 0 or 'auto', got {beta!r}")
            self.beta_setting: Any = "auto"
        else:
            self.beta_setting = check_number(beta, "beta", low=0.0)
        self.beta_auto_ess = check_number(beta_auto_ess, "beta_auto_ess", low=0.0, high=1.0, low_inclusive=False)
        names = [models] if isinstance(models, str) else list(models)
        bad = [m for m in names if m not in MODELS]
        if bad or not names:
            raise InputError(f"experiment.models: unknown model(s) {bad or names}; choose from {list(MODELS)}")
        self.models = names
        self.seed = check_integer(seed, "seed", minimum=0)
        d = {"min_heavy": 4, "max_heavy": 30, "max_len": 48, "max_molecules": 0,
             "elements": ["C", "N", "O", "F", "S", "Cl", "Br"], "workers": "auto",
             **check_mapping(data, "experiment.data", DATA_KEYS)}
        check_integer(d["min_heavy"], "experiment.data.min_heavy", minimum=1)
        check_integer(d["max_heavy"], "experiment.data.max_heavy", minimum=int(d["min_heavy"]))
        check_integer(d["max_len"], "experiment.data.max_len", minimum=2)
        check_integer(d["max_molecules"], "experiment.data.max_molecules", minimum=0)
        d["elements"] = [str(e) for e in d["elements"]]
        self.data_cfg = d
        self.data_workers = resolve_workers(d["workers"], "experiment.data.workers")
        if representation not in REPRESENTATIONS:
            raise InputError(f"experiment.representation must be one of {list(REPRESENTATIONS)}, got {representation!r}")
        self.representation = representation
        if efm_scores not in ("decoded", "data"):
            raise InputError(f"experiment.efm_scores must be 'decoded' or 'data', got {efm_scores!r}")
        self.efm_scores = efm_scores
        self.net_cfg = {**NET_DEFAULTS[representation],
                        **check_mapping(net, f"experiment.net (representation={representation})", NET_KEYS[representation])}
        v = {"embed": 64, "hidden": 192, "latent": 32, "kl_weight": 0.01, "steps": 2000, "batch_size": 128, "lr": 2e-3,
             "grad_clip": 10.0, **check_mapping(vae, "experiment.vae", VAE_KEYS)}
        for key in ("embed", "hidden", "latent", "steps", "batch_size"):
            check_integer(v[key], f"experiment.vae.{key}", minimum=1)
        check_number(v["kl_weight"], "experiment.vae.kl_weight", low=0.0)
        check_number(v["lr"], "experiment.vae.lr", low=0.0, low_inclusive=False)
        self.vae_cfg = v
        if loss not in ("cross_entropy", "squared"):
            raise InputError(f"experiment.loss must be 'cross_entropy' or 'squared', got {loss!r}")
        self.loss = loss
        self.trainer_cfg = {"steps": 3000, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 100,
                            "ema_decay": 0.999, "log_every": 50, "progress": bool(progress),
                            **check_mapping(trainer, "experiment.trainer")}
        TrainerConfig.from_dict(self.trainer_cfg, "experiment.trainer")   # bad settings fail before any work
        self.sampler_cfg = {"name": "euler", "steps": 50, **check_mapping(sampler, "experiment.sampler")}
        it = {"rounds": 5, "num_samples": 2048, "steps": 2000, "lr": 1e-3,
              **check_mapping(iterative, "experiment.iterative", ITERATIVE_KEYS)}
        check_integer(it["rounds"], "experiment.iterative.rounds", minimum=1)
        check_integer(it["num_samples"], "experiment.iterative.num_samples", minimum=2)
        check_integer(it["steps"], "experiment.iterative.steps", minimum=1)
        check_number(it["lr"], "experiment.iterative.lr", low=0.0, low_inclusive=False)
        self.iterative_cfg = it
        e = {"num_samples": 1000, "grid": 24, "workers": "auto", "batch_size": 1000,
             **check_mapping(evaluation, "experiment.evaluation", EVAL_KEYS)}
        check_integer(e["num_samples"], "experiment.evaluation.num_samples", minimum=2)
        check_integer(e["grid"], "experiment.evaluation.grid", minimum=0)
        check_integer(e["batch_size"], "experiment.evaluation.batch_size", minimum=1)
        self.eval_cfg = e
        self.eval_workers = resolve_workers(e["workers"], "experiment.evaluation.workers")
        self.cache_dir = cache_dir
        self.progress = bool(progress)
        self._data: Optional[DeNovoData] = None
        self._space_cache: Optional[dict[str, Any]] = None

    # -- data ---------------------------------------------------------------------------------------
    def _check_dataset(self) -> None:
        if self.dataset == "nci":
            return
        if not os.path.isfile(self.dataset):
            raise InputError(f"dataset={self.dataset}: no such file (give a .smi, .txt, .csv or .sdf file, or 'nci')")
        if not self.dataset.lower().endswith((".smi", ".smiles", ".txt", ".csv", ".sdf", ".sd")):
            raise InputError(f"dataset={self.dataset}: unknown format (use .smi, .txt, .csv or .sdf)")

    def _source_file(self) -> str:
        if self.dataset == "nci":
            from .chem import nci_default_path

            return nci_default_path()
        return self.dataset

    def _root(self, run_dir: str) -> str:
        return self.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "stages")

    def data_stage(self, run_dir: str) -> Stage:
        import rdkit
        import selfies

        source = self._source_file()
        with open(source, "rb") as f:
            content = fingerprint(f.read())
        d = {k: v for k, v in self.data_cfg.items() if k != "workers"}
        spec = {"source": {"name": os.path.basename(source), "content": content}, "data": d,
                "rdkit": rdkit.__version__, "selfies": selfies.__version__, "format": 1}
        return Stage("denovo-molecules", spec, self._root(run_dir))

    def data(self, run_dir: str) -> DeNovoData:
        if self._data is None:
            stage = self.data_stage(run_dir)
            stage.run(self._build_data)
            self._data = DeNovoData(load_torch(stage.file("dataset.pt"), what="molecule set"))
        return self._data

    def _build_data(self, folder: str) -> dict[str, Any]:
        from .chem import filter_molecules, quiet_rdkit, read_molecules
        from .properties import PROPERTY_NAMES, compute_properties
        from .selfies_codec import SelfiesCodec

        d = self.data_cfg
        with quiet_rdkit():
            mols, smiles, skips = read_molecules(self._source_file())
            mols, smiles, skips = filter_molecules(mols, smiles, min_heavy=int(d["min_heavy"]),
                                                   max_heavy=int(d["max_heavy"]), elements=d["elements"],
                                                   skips=skips, require_mmff=False)
        del mols
        if d["max_molecules"] and len(smiles) > int(d["max_molecules"]):
            keep = np.sort(np.random.default_rng(0).permutation(len(smiles))[: int(d["max_molecules"])])
            smiles = [smiles[i] for i in keep]
        codec, kept, cskips = SelfiesCodec.fit(smiles, max_len=int(d["max_len"]))
        smiles = [smiles[i] for i in kept]
        counts = {**skips.as_dict(), **{k: v for k, v in cskips.as_dict().items() if v}}
        if len(smiles) < 8:
            raise InputError(f"dataset={self.dataset}: only {len(smiles)} usable molecule(s) after filtering "
                             f"(skipped: {counts}); widen experiment.data.min_heavy / max_heavy / max_len")
        tokens, kept2, _ = codec.encode(smiles)
        assert len(kept2) == len(smiles)
        props = compute_properties(smiles, PROPERTY_NAMES, workers=self.data_workers)
        record = {"smiles": smiles, "tokens": tokens, "codec": codec.to_dict(),
                  "props": {k: torch.from_numpy(v) for k, v in props.items()}, "skips": counts}
        atomic_torch_save(record, os.path.join(folder, "dataset.pt"))
        return {"molecules": len(smiles), "vocab": len(codec), "max_len": codec.max_len, "skipped": counts}

    # -- β --------------------------------------------------------------------------------------------
    def resolve_beta(self, data: DeNovoData) -> float:
        """β itself, or for ``auto`` the β whose mean training-batch ESS fraction is ``beta_auto_ess``
        (batches of the trainer's size over a fixed random order of the training molecules)."""
        if self.beta_setting != "auto":
            return float(self.beta_setting)
        from energyflow.iterative import choose_delta_beta

        e = torch.from_numpy(self.energy(data.props))
        order = torch.randperm(len(e), generator=torch.Generator().manual_seed(0))
        beta = choose_delta_beta(e[order], 1e4, self.beta_auto_ess, int(self.trainer_cfg["batch_size"]), min_delta=1e-6)
        return float(f"{beta:.4g}")

    # -- models -------------------------------------------------------------------------------------
    def _energy_key(self) -> dict[str, Any]:
        return {"terms": [[t.name, t.weight] for t in self.energy.terms], "targets": self.energy.targets}

    def _trainer_key(self) -> dict[str, Any]:
        return {k: v for k, v in self.trainer_cfg.items() if k not in ("progress", "log_every", "device", "num_threads")}

    def _vae_trainer_settings(self) -> dict[str, Any]:
        """The trainer settings the autoencoder trains with: the flow's (its schedule, warm-up, EMA...)
        with the ``vae`` block's steps, batch size, learning rate and clipping."""
        v = self.vae_cfg
        return {**self._trainer_key(), "steps": int(v["steps"]), "batch_size": int(v["batch_size"]),
                "lr": float(v["lr"]), "grad_clip": float(v["grad_clip"]), "seed": self.seed}

    def vae_stage(self, run_dir: str) -> Stage:
        """The autoencoder of ``representation: latent``, with the posterior means of the molecule set.
        Keyed by the architecture, KL weight and every trainer setting it trains with."""
        return Stage("denovo-vae", {"vae": self.vae_cfg, "trainer": self._vae_trainer_settings(), "format": 2},
                     self._root(run_dir), upstream=[self.data_stage(run_dir)])

    def train_vae(self, run_dir: str) -> Stage:
        """Train (or reuse) the autoencoder: ``vae.pt`` (a model file) and ``latents.pt`` (``mu`` ``[N, latent]``
        of every molecule, the per-dimension ``mean`` / ``std`` the flow is standardised by, and the
        fraction of molecules the greedy decoder reconstructs exactly)."""
        from energyflow.data import TensorBatchSource

        from .selfies_vae import SelfiesVAE, VAEObjective

        data = self.data(run_dir)
        stage = self.vae_stage(run_dir)
        v = self.vae_cfg

        def fit(folder: str) -> dict[str, Any]:
            torch.manual_seed(self.seed)
            net = SelfiesVAE(len(data.codec), data.codec.max_len, embed=int(v["embed"]), hidden=int(v["hidden"]),
                             latent=int(v["latent"]))
            config = TrainerConfig.from_dict({**self.trainer_cfg, **self._vae_trainer_settings()}, "experiment.vae")
            summary = fit_and_save(net, VAEObjective(int(v["latent"]), float(v["kl_weight"])),
                                   TensorBatchSource({"x1": data.tokens}), config, os.path.join(folder, "train"),
                                   os.path.join(folder, "vae.pt"), meta={"codec": data.codec.to_dict()}, name="vae")
            vae = load_model(os.path.join(folder, "vae.pt")).net.eval()
            with torch.no_grad():
                mu = torch.cat([vae.encode(data.tokens[i:i + 1024])[0] for i in range(0, len(data), 1024)])
                decoded = torch.cat([vae.decode(mu[i:i + 1024]) for i in range(0, len(data), 1024)])
            exact = float(np.mean([a == b for a, b in zip(data.codec.decode_tokens(decoded), data.smiles)]))
            atomic_torch_save({"mu": mu, "mean": mu.mean(0), "std": mu.std(0).clamp_min(1e-6), "recon_exact": exact},
                              os.path.join(folder, "latents.pt"))
            return {**summary, "recon_exact": exact}

        stage.run(fit)
        return stage

    def model_stage(self, run_dir: str, kind: str) -> Stage:
        data_stage = self.data_stage(run_dir)
        spec: dict[str, Any] = {"kind": kind, "representation": self.representation, "net": self.net_cfg,
                                "trainer": self._trainer_key(), "seed": self.seed, "format": 2}
        upstream = [data_stage]
        if self.representation == "latent":
            upstream.append(self.vae_stage(run_dir))
        else:
            spec["loss"] = self.loss
        if kind != "unguided":
            spec.update(energy=self._energy_key(), beta=self.resolve_beta(self.data(run_dir)))
        if kind == "efm" and self.representation == "latent":
            spec["efm_scores"] = self.efm_scores
        if kind == "iterative":
            spec["iterative"] = self.iterative_cfg
            spec["sampler"] = self.sampler_cfg
            upstream.append(self.model_stage(run_dir, "unguided"))
        return Stage(f"denovo-{kind}", spec, self._root(run_dir), upstream=upstream)

    def _space(self, run_dir: str) -> dict[str, Any]:
        """What the flow of this representation works on: ``x1`` ``[N, ...]`` (the molecule set in flow
        space), ``event_shape``, ``to_tokens`` (flow samples → token indices ``[B, L]``), ``prediction``,
        ``error`` and ``sample_transform`` for the losses and the iterative rounds."""
        if self._space_cache is not None:
            return self._space_cache
        self._space_cache = self._build_space(run_dir)
        return self._space_cache

    def _build_space(self, run_dir: str) -> dict[str, Any]:
        data = self.data(run_dir)
        codec = data.codec
        if self.representation == "tokens":
            from energyflow.losses import OneHotCrossEntropy

            return {"x1": codec.to_continuous(data.tokens), "event_shape": codec.event_shape,
                    "to_tokens": codec.from_continuous, "prediction": "x1",
                    "error": OneHotCrossEntropy(codec.scale) if self.loss == "cross_entropy" else None,
                    "sample_transform": lambda x: codec.to_continuous(codec.from_continuous(x))}
        stage = self.train_vae(run_dir)
        lat = load_torch(stage.file("latents.pt"), what="latent codes")
        vae = load_model(stage.file("vae.pt")).net.eval()
        mean, std = lat["mean"], lat["std"]

        def to_tokens(z: Tensor) -> Tensor:
            z = z.float().cpu() * std + mean
            return torch.cat([vae.decode(z[i:i + 1024]) for i in range(0, z.shape[0], 1024)]) if len(z) else \
                torch.zeros(0, codec.max_len, dtype=torch.long)

        return {"x1": (lat["mu"] - mean) / std, "event_shape": (int(self.vae_cfg["latent"]),), "to_tokens": to_tokens,
                "prediction": None, "error": None, "sample_transform": None, "recon_exact": lat["recon_exact"]}

    def _network(self, data: DeNovoData) -> torch.nn.Module:
        if self.representation == "tokens":
            from .sequence_nets import SequenceField

            return SequenceField(len(data.codec), data.codec.max_len, output="x1", scale=data.codec.scale,
                                 **self.net_cfg)
        from energyflow.nets import MLPField

        return MLPField(int(self.vae_cfg["latent"]), **self.net_cfg)

    def train(self, run_dir: str, kind: str) -> str:
        if kind == "iterative":
            return self._train_iterative(run_dir)
        from energyflow.data import TensorBatchSource
        from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss
        from energyflow.paths import CondOTPath

        data = self.data(run_dir)
        space = self._space(run_dir)
        stage = self.model_stage(run_dir, kind)
        beta = 0.0 if kind == "unguided" else self.resolve_beta(data)

        def fit(folder: str) -> dict[str, Any]:
            torch.manual_seed(self.seed)
            if kind == "efm":
                source = TensorBatchSource({"x1": space["x1"], "energy": torch.from_numpy(self.efm_energies(run_dir))})
                objective = EnergyWeightedLoss(CondOTPath(), beta, prediction=space["prediction"], error=space["error"])
            else:
                source = TensorBatchSource({"x1": space["x1"]})
                objective = FlowMatchingLoss(CondOTPath(), prediction=space["prediction"], error=space["error"])
            config = TrainerConfig.from_dict({**self.trainer_cfg, "seed": self.seed}, "experiment.trainer")
            return fit_and_save(self._network(data), objective, source, config, os.path.join(folder, "train"),
                                os.path.join(folder, "model.pt"), path="ot", prediction=space["prediction"],
                                meta=self._meta(kind, beta), name=kind)

        stage.run(fit)
        return stage.file("model.pt")

    def efm_energies(self, run_dir: str) -> np.ndarray:
        """The energies EFM weights the molecule set by ``[N]``: of the training molecules, or (``latent`` with
        ``efm_scores: decoded``) of the molecules their latent codes decode to, scored by RDKit once."""
        data = self.data(run_dir)
        if self.representation != "latent" or self.efm_scores == "data":
            return self.energy(data.props)
        space = self._space(run_dir)
        smiles = data.codec.decode_tokens(space["to_tokens"](space["x1"]))
        return self.energy.from_smiles(smiles, workers=self.eval_workers)[0]

    def _meta(self, kind: str, beta: float) -> dict[str, Any]:
        return {"kind": kind, "beta": beta, "energy": self.energy.describe(), "sampler": self.sampler_cfg,
                "representation": self.representation}

    def _train_iterative(self, run_dir: str) -> str:
        from energyflow.energies import BlackBoxEnergy
        from energyflow.iterative import iterative_tilt
        from energyflow.models import save_model_file
        from energyflow.paths import CondOTPath

        data = self.data(run_dir)
        beta = self.resolve_beta(data)
        base = self.train(run_dir, "unguided")
        space = self._space(run_dir)
        stage = self.model_stage(run_dir, "iterative")
        it = self.iterative_cfg
        device = resolve_device(self.trainer_cfg.get("device", "auto"))

        def score(x_np: np.ndarray) -> np.ndarray:
            smiles = data.codec.decode_tokens(space["to_tokens"](torch.from_numpy(x_np)))
            return self.energy.from_smiles(smiles, workers=self.eval_workers)[0]

        def report(_net: Any, r: Any) -> dict:
            print(f"iterative round {r.round}: beta {r.beta:g}, fresh samples' mean energy {r.mean_energy:.3f} "
                  f"(tilted estimate {r.tilted_mean_energy:.3f}), batch ESS {r.ess_fraction:.2f}", flush=True)
            return {}

        def fit(folder: str) -> dict[str, Any]:
            saved = load_model(base, map_location=device)
            rounds = [beta * (k + 1) for k in range(int(it["rounds"]))]
            trainer = {**self.trainer_cfg, "steps": int(it["steps"]), "lr": float(it["lr"]), "warmup_steps": 0,
                       "lr_schedule": "constant", "seed": self.seed}
            result = iterative_tilt(saved.net, CondOTPath(), BlackBoxEnergy(score), rounds, int(it["num_samples"]),
                                    space["event_shape"], trainer=trainer, sampler=self.sampler_cfg, seed=self.seed,
                                    out_dir=os.path.join(folder, "rounds"), sample_transform=space["sample_transform"],
                                    chunk=int(self.eval_cfg["batch_size"]), prediction=space["prediction"],
                                    error=space["error"], callback=report)
            records = [{"round": r.round, "beta": r.beta, "ess_fraction": r.ess_fraction,
                        "mean_energy": r.mean_energy, "tilted_mean_energy": r.tilted_mean_energy,
                        "sample_seconds": r.sample_seconds, "train_seconds": r.train_seconds} for r in result.records]
            meta = {**self._meta("iterative", rounds[-1]), "rounds": records}
            save_model_file(os.path.join(folder, "model.pt"), result.net, path="ot", prediction=space["prediction"],
                            meta=meta)
            return {"rounds": records, "final_beta": rounds[-1]}

        stage.run(fit)
        return stage.file("model.pt")

    # -- sampling -----------------------------------------------------------------------------------
    def generate(self, model_file: str, space: dict[str, Any], codec: Any, num: int, seed: int,
                 sampler: Optional[dict] = None, device: Any = "cpu") -> tuple[list[Optional[str]], Tensor, float]:
        """``num`` molecules of a model: their SMILES (``None`` when a decoded sequence is empty or
        unsanitisable), their tokens ``[num, L]`` and the sampling seconds (flow and decoding)."""
        model = load_model(model_file, map_location=device)
        predictor = model.predictor()
        smp = sampler_from_config(self.sampler_cfg, sampler)
        gen = torch.Generator().manual_seed(int(seed))
        x0 = initial_noise(int(num), space["event_shape"], generator=gen)
        chunk = int(self.eval_cfg["batch_size"])
        tokens = []
        start = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, int(num), chunk):
                x = smp.sample(predictor, x0[lo:lo + chunk].to(device), None, generator=gen).x
                tokens.append(space["to_tokens"](x.float().cpu()))
        seconds = time.perf_counter() - start
        tokens_t = torch.cat(tokens)
        return codec.decode_tokens(tokens_t), tokens_t, seconds

    def sample(self, run_dir: str, num_samples: int, model: Optional[str] = None,
               sampler: Optional[dict[str, Any]] = None, seed: int = 0) -> SampleRecord:
        """``num_samples`` molecules of model ``model`` (``unguided``, ``efm`` or ``iterative``; default
        the last the recipe trains).  Save with :meth:`write_samples`:
        ``energyflow sample RUN -n 100 -o molecules.smi`` (SMILES, and a drawn grid beside it)."""
        kind = model or self.models[-1]
        if kind not in MODELS:
            raise InputError(f"--model must be one of {list(MODELS)}, got {kind!r}")
        codec = self.data(run_dir).codec
        file = self.model_stage(run_dir, kind).file("model.pt")
        if not os.path.exists(file):
            raise InputError(f"no trained {kind} model for {run_dir} (did the run finish? is the cache at {self._root(run_dir)}?)")
        smiles, tokens, seconds = self.generate(file, self._space(run_dir), codec, int(num_samples), seed, sampler)
        return SampleRecord(x=tokens, meta={"model": kind, "seconds": seconds, "smiles": smiles})

    sample_formats = (".smi", ".png", ".svg")

    def write_samples(self, record: SampleRecord, path: str) -> None:
        """``.smi``: one SMILES a line (an invalid sample as an empty line, so lines match samples),
        and a drawn grid of the first ``evaluation.grid`` valid ones beside it (``.png``); ``.png`` /
        ``.svg``: the grid alone."""
        from .denovo_metrics import draw_grid

        smiles = record.meta["smiles"]
        if path.endswith(".smi"):
            with atomic_open(path, "w") as f:
                f.write("".join(f"{s or ''}\n" for s in smiles))
            grid = os.path.splitext(path)[0] + ".png"
        else:
            grid = path
        valid = [s for s in smiles if s][: max(int(self.eval_cfg["grid"]), 1)]
        if valid:
            draw_grid(valid, grid)

    # -- evaluation ---------------------------------------------------------------------------------
    def run(self, run_dir: str) -> dict[str, Any]:
        data = self.data(run_dir)
        beta = self.resolve_beta(data)
        print(f"molecule set: {len(data)} molecules, {len(data.codec)} SELFIES tokens, length {data.codec.max_len}; "
              f"energy {self.energy.describe()}, beta {beta:g}" + (" (auto)" if self.beta_setting == "auto" else ""),
              flush=True)
        files = {kind: self.train(run_dir, kind) for kind in self.models}
        results = self.evaluate_files(run_dir, files)
        write_json(results, os.path.join(run_dir, "results.json"))
        write_text(results_table(results), os.path.join(run_dir, "results.md"))
        return results

    def evaluate(self, run_dir: str, sampler: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        self.data(run_dir)
        files = {kind: self.model_stage(run_dir, kind).file("model.pt") for kind in self.models}
        missing = [k for k, f in files.items() if not os.path.exists(f)]
        if missing:
            raise InputError(f"no trained {missing} model(s) for {run_dir} (is the cache at {self._root(run_dir)}?)")
        return self.evaluate_files(run_dir, files, sampler)

    def evaluate_files(self, run_dir: str, files: dict[str, str], sampler: Optional[dict] = None) -> dict[str, Any]:
        from .denovo_metrics import draw_grid, generation_metrics, plot_property_histograms, property_summary
        from .properties import PROPERTY_NAMES, compute_properties

        data = self.data(run_dir)
        beta = self.resolve_beta(data)
        n = int(self.eval_cfg["num_samples"])
        device = resolve_device(self.trainer_cfg.get("device", "auto"))
        training = set(data.smiles)
        train_energy = self.energy(data.props)
        best = np.argsort(train_energy, kind="stable")[: min(n, len(data))]
        groups: dict[str, tuple[list[Optional[str]], dict[str, np.ndarray], Optional[float]]] = {
            "training set": (data.smiles, data.props, None),
            f"training best-{len(best)}": ([data.smiles[i] for i in best], {k: v[best] for k, v in data.props.items()},
                                           None),
        }
        space = self._space(run_dir)
        for kind, file in files.items():
            smiles, _, seconds = self.generate(file, space, data.codec, n, self.seed + 12345, sampler, device)
            groups[kind] = (smiles, compute_properties(smiles, PROPERTY_NAMES, workers=self.eval_workers), seconds / n)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        rows = {}
        for name, (smiles, props, seconds) in groups.items():
            row: dict[str, Any] = dict(generation_metrics(smiles, None if name.startswith("training") else training))
            energy = self.energy(props)
            row["energy_mean"] = float(np.mean(energy))
            row["target_fraction"] = float(np.mean(self.energy.hits(props)))
            row["properties"] = property_summary(props)
            if seconds is not None:
                row["seconds_per_molecule"] = seconds
                slug = name.replace(" ", "_")
                with atomic_open(os.path.join(run_dir, "samples", f"{slug}.smi"), "w") as f:
                    f.write("".join(f"{s or ''}\n" for s in smiles))
                valid = [s for s in smiles if s][: int(self.eval_cfg["grid"])]
                if valid:
                    draw_grid(valid, os.path.join(run_dir, f"grid_{slug}.png"))
            rows[name] = row
        names = [p for p in PROPERTY_NAMES if p in self.energy.properties] + \
                [p for p in ("qed", "logp", "sa") if p not in self.energy.properties]
        plot_property_histograms({k: v[1] for k, v in groups.items()}, names,
                                 os.path.join(run_dir, "properties.png"), targets=self.energy.targets)
        out: dict[str, Any] = {"dataset": self.dataset, "energy": self.energy.describe(), "targets": self.energy.targets,
                               "beta": beta, "beta_setting": self.beta_setting, "seed": self.seed,
                               "molecules": len(data), "skipped": data.skips, "num_samples": n, "rows": rows,
                               "representation": self.representation, "efm_scores": self.efm_scores}
        if "recon_exact" in space:
            out["vae_reconstruction_exact"] = space["recon_exact"]
        if "iterative" in files:
            out["iterative_final_beta"] = beta * int(self.iterative_cfg["rounds"])
        return out


def results_table(results: dict[str, Any]) -> str:
    """A markdown table of :meth:`DeNovoExperiment.evaluate_files`'s rows."""
    props = ("qed", "logp", "sa")
    cols = ["validity", "uniqueness", "novelty", "internal_diversity", "energy_mean", "target_fraction"]
    head = cols + [f"mean {p}" for p in props] + ["ms / molecule"]
    lines = [f"{results['dataset']}: energy {results['energy']}, β = {results['beta']:g} "
             f"({results['beta_setting']}), {results['num_samples']} samples per model, {results['molecules']} "
             f"training molecules", "", "| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, row in results["rows"].items():
        vals = [row.get(c, math.nan) for c in cols] + [row["properties"].get(p, {}).get("mean", math.nan) for p in props]
        ms = row.get("seconds_per_molecule")
        cells = [f"{v:.3f}" for v in vals] + ["–" if ms is None else f"{1000 * ms:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
