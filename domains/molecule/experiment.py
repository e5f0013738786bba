"""Conformer generation tilted by RDKit's MMFF94 energy: Boltzmann-weighted EFM against unweighted FM and ETKDG.

For a molecular graph G, p(x | G) is the distribution of its reference conformers (RDKit ETKDG
followed by MMFF94 optimisation), known only through samples, and E(x, G) is the MMFF94 energy
relative to G's lowest reference conformer, a black box without gradient.  The target

    q(x | G) ∝ p(x | G) · exp(−E(x, G) / kT)            β = 1 / kT (mol/kcal)

is the Boltzmann reweighting of G's conformer distribution at temperature T.  Models (``models``):

* ``fm``: flow matching on the conformers (β-independent, the baseline);
* ``efm``: energy-weighted flow matching at β: each batch holds ``group_size`` conformers of each
  of its molecules and the weights are softmax(−βE) *within* each molecule's group
  (:class:`~energyflow.losses.EnergyWeightedLoss` with ``group_size``), so every molecule's own
  Boltzmann factors weight its conformers; no energy gradient is taken;
* ``efm_resampled``: the same per-molecule tilt with no weights: each molecule's group is drawn
  from its K reference conformers with probabilities softmax(−βE) over all K
  (:class:`~energyflow.data.GroupedMembersSource` with ``member_probs``) and trained with the plain
  loss.  Normalising over all K is exact, where a group's softmax over ``group_size`` of them is a
  self-normalised estimate (biased toward the untilted p for small groups and sharp tilts);
* the evaluation adds RDKit's ETKDG (unoptimised) as the baseline row.

Both models are the same E(3)-equivariant network (:class:`~domains.molecule.nets.EGNNField`) on the
conditional-OT path from zero-centre-of-mass Gaussian noise, each noise sample rotated onto its
conformer (Kabsch coupling, :func:`energyflow.priors.kabsch_align`).

Evaluation on held-out molecules (a scaffold split): COV-R / AMR-R and COV-P / AMR-P against the
reference ensemble (symmetry-aware heavy-atom RMSD); the MMFF energies of the generated conformers
(relative to the reference minimum) after a short local relaxation (``evaluation.relax_steps``: the
energy of the basin a conformer lies in; raw energies of generated coordinates are dominated by
bond-length errors of hundredths of an ångström and are reported beside them); the fraction whose
bond graph survives RDKit's perception; the sampling time per conformer.  The known answer is the
reweighted reference ensemble: Σ_k softmax(−βE)_k E_k per molecule, the mean energy EFM must reach.

Caching: the molecule set (with its reference ensembles) and every trained model are
:class:`~energyflow.stages.Stage` s keyed by everything that changes them, including a content hash
of the input file; reference ensembles are also cached per molecule, so an interrupted run resumes.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from energyflow.errors import InputError
from energyflow.experiment import Experiment, SampleRecord, fit_and_save, write_json
from energyflow.files import atomic_open, load_torch, atomic_torch_save
from energyflow.models import load_model
from energyflow.priors import CenteredGaussianPrior
from energyflow.runtime import resolve_device, resolve_workers
from energyflow.sampling import sampler_from_config
from energyflow.stages import Stage, fingerprint
from energyflow.trainer import TrainerConfig
from energyflow.validation import check_integer, check_mapping, check_number

__all__ = ["ConformerExperiment", "MODELS"]

MODELS = ("fm", "efm", "efm_resampled")
REMOTE_DATASETS = ("qm9",)
DATA_KEYS = ("min_heavy", "max_heavy", "max_molecules", "split", "split_seed")
REFERENCE_KEYS = ("num_confs", "seed", "max_iters", "workers")
NET_KEYS = ("hidden", "layers", "time_dim", "edge_dim", "rbf")
EVAL_KEYS = ("split", "max_molecules", "samples_per_reference", "relax_steps", "thresholds", "workers", "batch_size",
             "bootstrap")


class ConformerData:
    """The molecule set of a run: molecules (with H), SMILES, reference ensembles, split indices."""

    def __init__(self, record: dict[str, Any]):
        from rdkit import Chem

        self.smiles: list[str] = list(record["smiles"])
        self.mols = [Chem.MolFromMolBlock(b, removeHs=False) for b in record["molblocks"]]
        self.coords: list[Tensor] = list(record["coords"])
        self.energies: list[Tensor] = list(record["energies"])
        self.split: dict[str, list[int]] = {k: list(v) for k, v in record["split"].items()}
        self.skips: dict[str, int] = dict(record.get("skips") or {})
        self.num_atoms = max(m.GetNumAtoms() for m in self.mols)

    def relative_energies(self, i: int) -> Tensor:
        e = self.energies[i]
        return e - e.min()


class ConformerExperiment(Experiment):
    """Conformers of molecular graphs tilted by exp(−E_MMFF / kT) (module docstring).

    Args:
        dataset: ``nci`` (RDKit's bundled NCI set, offline), a ``.smi`` / ``.txt`` / ``.csv`` / ``.sdf``
            file, or ``qm9`` (torch-geometric's download; fails with one line offline).
        models: any of ``fm``, ``efm``, ``efm_resampled``.
        temperature: T in kelvin; β = 1 / (k_B T).  ``beta`` (mol/kcal), when given, wins.
        beta: β directly, in mol/kcal (``None``: from ``temperature``).
        seed: seed of training and sampling (the molecule set and its split have their own seeds).
        data: ``min_heavy`` / ``max_heavy`` heavy atoms, ``max_molecules`` (a seeded subset, 0 = all),
            ``split`` fractions (train, val, test) by Bemis–Murcko scaffold, ``split_seed``.
        reference: ``num_confs`` K per molecule, ``seed``, ``max_iters`` of MMFF optimisation,
            ``workers`` (processes; ``auto``: the CPUs available).
        net: :class:`~domains.molecule.nets.EGNNField` arguments.
        trainer: :class:`~energyflow.trainer.TrainerConfig` settings (batch size counts conformers).
        group_size: conformers of one molecule per batch group (EFM's softmax runs within a group).
        coupling: ``kabsch`` (noise rotated onto each conformer) or ``independent``.
        sampler: the ODE sampler (``name``, ``steps``).
        evaluation: ``split``, ``max_molecules``, ``samples_per_reference`` (2: twice K conformers
            per molecule), ``relax_steps``, ``thresholds`` (Å), ``workers`` of the MMFF energy pool,
            ``batch_size`` of sampling, ``bootstrap`` resamples for the known answer's noise.
        cache_dir: where stages are cached (``None``: ``<run_dir>/../stages``).
        progress: progress bars.
    """

    def __init__(self, dataset: str = "nci", models: Sequence[str] | str = ("fm", "efm", "efm_resampled"), temperature: float = 600.0,
                 beta: Optional[float] = None, seed: int = 0, data: Optional[dict] = None,
                 reference: Optional[dict] = None, net: Optional[dict] = None, trainer: Optional[dict] = None,
                 group_size: int = 8, coupling: str = "kabsch", sampler: Optional[dict] = None,
                 evaluation: Optional[dict] = None, cache_dir: Optional[str] = None, progress: bool = True):
        self.dataset = str(dataset)
        names = [models] if isinstance(models, str) else list(models)
        bad = [m for m in names if m not in MODELS]
        if bad or not names:
            raise InputError(f"experiment.models: unknown model(s) {bad or names}; choose from {list(MODELS)}")
        self.models = names
        from .energies import beta_from_temperature, temperature_from_beta

        if beta is None:
            self.temperature = check_number(temperature, "temperature", low=0.0, low_inclusive=False)
            self.beta = beta_from_temperature(self.temperature)
        else:
            self.beta = check_number(beta, "beta", low=0.0, low_inclusive=False)
            self.temperature = temperature_from_beta(self.beta)
        self.seed = check_integer(seed, "seed", minimum=0)
        d = {"min_heavy": 4, "max_heavy": 12, "max_molecules": 300, "split": [0.8, 0.1, 0.1], "split_seed": 0,
             **check_mapping(data, "experiment.data", DATA_KEYS)}
        check_integer(d["min_heavy"], "experiment.data.min_heavy", minimum=1)
        check_integer(d["max_heavy"], "experiment.data.max_heavy", minimum=int(d["min_heavy"]))
        check_integer(d["max_molecules"], "experiment.data.max_molecules", minimum=0)
        split = [check_number(f, "experiment.data.split", low=0.0) for f in d["split"]]
        if len(split) != 3 or abs(sum(split) - 1.0) > 1e-6:
            raise InputError(f"experiment.data.split must be three fractions (train, val, test) summing to 1, got {d['split']}")
        d["split"] = split
        self.data_cfg = d
        r = {"num_confs": 16, "seed": 0, "max_iters": 2000, "workers": "auto",
             **check_mapping(reference, "experiment.reference", REFERENCE_KEYS)}
        check_integer(r["num_confs"], "experiment.reference.num_confs", minimum=2)
        self.reference_cfg = r
        self.reference_workers = resolve_workers(r["workers"], "experiment.reference.workers")
        self.net_cfg = {"hidden": 64, "layers": 4, **check_mapping(net, "experiment.net", NET_KEYS)}
        self.trainer_cfg = {"steps": 3000, "batch_size": 64, "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 50,
                            "ema_decay": 0.995, "log_every": 50, "progress": bool(progress),
                            **check_mapping(trainer, "experiment.trainer")}
        TrainerConfig.from_dict(self.trainer_cfg, "experiment.trainer")   # bad settings fail before any work
        self.group_size = check_integer(group_size, "experiment.group_size", minimum=1,
                                        maximum=int(r["num_confs"]))
        if int(self.trainer_cfg["batch_size"]) % self.group_size:
            raise InputError(f"experiment.trainer.batch_size ({self.trainer_cfg['batch_size']}) must be a multiple of "
                             f"experiment.group_size ({self.group_size})")
        if coupling not in ("kabsch", "independent"):
            raise InputError(f"experiment.coupling must be 'kabsch' or 'independent', got {coupling!r}")
        self.coupling = coupling
        self.sampler_cfg = {"name": "euler", "steps": 50, **check_mapping(sampler, "experiment.sampler")}
        e = {"split": "test", "max_molecules": 20, "samples_per_reference": 2, "relax_steps": 200,
             "thresholds": [0.5, 0.75], "workers": "auto", "batch_size": 512, "bootstrap": 200,
             **check_mapping(evaluation, "experiment.evaluation", EVAL_KEYS)}
        if e["split"] not in ("train", "val", "test"):
            raise InputError(f"experiment.evaluation.split must be train, val or test, got {e['split']!r}")
        check_integer(e["max_molecules"], "experiment.evaluation.max_molecules", minimum=1)
        check_integer(e["samples_per_reference"], "experiment.evaluation.samples_per_reference", minimum=1)
        check_integer(e["relax_steps"], "experiment.evaluation.relax_steps", minimum=0)
        self.eval_cfg = e
        self.eval_workers = resolve_workers(e["workers"], "experiment.evaluation.workers")
        self.cache_dir = cache_dir
        self.progress = bool(progress)
        self._data: Optional[ConformerData] = None
        self._check_dataset()

    # -- data ---------------------------------------------------------------------------------------
    def _check_dataset(self) -> None:
        if self.dataset in ("nci",) + REMOTE_DATASETS:
            return
        if not os.path.isfile(self.dataset):
            raise InputError(f"dataset={self.dataset}: no such file (give a .smi, .txt, .csv or .sdf file, 'nci' or 'qm9')")
        if not self.dataset.lower().endswith((".smi", ".txt", ".csv", ".sdf")):
            raise InputError(f"dataset={self.dataset}: unknown format (use .smi, .txt, .csv or .sdf)")

    def _source_file(self, root: str) -> str:
        if self.dataset == "nci":
            from .chem import nci_default_path

            return nci_default_path()
        if self.dataset == "qm9":
            return _qm9_smiles_file(os.path.join(root, "downloads"))
        return self.dataset

    def _root(self, run_dir: str) -> str:
        return self.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "stages")

    def data_stage(self, run_dir: str) -> Stage:
        import rdkit

        source = self._source_file(self._root(run_dir))
        with open(source, "rb") as f:
            content = fingerprint(f.read())
        r = {k: v for k, v in self.reference_cfg.items() if k != "workers"}
        spec = {"source": {"name": os.path.basename(source), "content": content}, "data": self.data_cfg,
                "reference": r, "rdkit": rdkit.__version__, "format": 1}
        return Stage("molecules", spec, self._root(run_dir))

    def data(self, run_dir: str) -> ConformerData:
        if self._data is None:
            stage = self.data_stage(run_dir)
            stage.run(lambda folder: self._build_data(stage, folder))
            self._data = ConformerData(load_torch(stage.file("dataset.pt"), what="molecule set"))
        return self._data

    def _build_data(self, stage: Stage, folder: str) -> dict[str, Any]:
        from rdkit import Chem

        from .chem import filter_molecules, quiet_rdkit, read_molecules, scaffold_split
        from .ensembles import reference_ensembles

        d, r = self.data_cfg, self.reference_cfg
        with quiet_rdkit():
            mols, smiles, skips = read_molecules(self._source_file(os.path.dirname(folder)))
            mols, smiles, skips = filter_molecules(mols, smiles, min_heavy=int(d["min_heavy"]),
                                                   max_heavy=int(d["max_heavy"]), skips=skips)
            if d["max_molecules"] and len(mols) > int(d["max_molecules"]):
                keep = np.sort(np.random.default_rng(int(d["split_seed"])).permutation(len(mols))[: int(d["max_molecules"])])
                mols, smiles = [mols[i] for i in keep], [smiles[i] for i in keep]
            ensembles, eskips = reference_ensembles(
                mols, num_confs=int(r["num_confs"]), seed=int(r["seed"]), max_iters=int(r["max_iters"]),
                cache_dir=os.path.join(os.path.dirname(folder), "conformers"),
                workers=self.reference_workers, progress=self.progress)
        counts = {**skips.as_dict(), **{k: v for k, v in eskips.as_dict().items() if v}}
        keep = [i for i, e in enumerate(ensembles) if e is not None and e.coords.shape[0] == int(r["num_confs"])]
        counts["few_conformers"] = sum(1 for e in ensembles if e is not None and e.coords.shape[0] != int(r["num_confs"]))
        if len(keep) < 3:
            raise InputError(f"dataset={self.dataset}: only {len(keep)} usable molecule(s) after filtering "
                             f"(skipped: {counts}); widen experiment.data.min_heavy / max_heavy")
        mols, smiles, ensembles = [mols[i] for i in keep], [smiles[i] for i in keep], [ensembles[i] for i in keep]
        split = scaffold_split(smiles, tuple(d["split"]), seed=int(d["split_seed"]))
        if not split["train"] or not split[self.eval_cfg["split"]]:
            raise InputError(f"dataset={self.dataset}: the scaffold split left the train or the "
                             f"{self.eval_cfg['split']} set empty ({ {k: len(v) for k, v in split.items()} }); use more "
                             f"molecules or other experiment.data.split fractions")
        record = {"smiles": smiles, "molblocks": [Chem.MolToMolBlock(m) for m in mols],
                  "coords": [torch.from_numpy(np.asarray(e.coords, dtype=np.float32)) for e in ensembles],
                  "energies": [torch.from_numpy(np.asarray(e.energies, dtype=np.float64)) for e in ensembles],
                  "split": {k: [int(i) for i in v] for k, v in split.items()}, "skips": counts}
        atomic_torch_save(record, os.path.join(folder, "dataset.pt"))
        return {"molecules": len(mols), "split": {k: len(v) for k, v in split.items()}, "skipped": counts}

    def tensors(self, data: ConformerData, indices: Sequence[int]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Item tensors (``mask``, ``cond``: graph features and ``mol_index``) and member tensors
        (``x1`` [M, K, Nmax, 3] centred, ``energy`` [M, K] relative kcal/mol) of ``indices``."""
        from .features import featurize, pad_conformers, pad_graphs

        graphs = pad_graphs([featurize(data.mols[i]) for i in indices], data.num_atoms)
        mask = graphs.pop("mask")
        x1 = pad_conformers([data.coords[i].numpy() for i in indices], data.num_atoms)
        energy = torch.stack([data.relative_energies(i) for i in indices]).float()
        cond = {**graphs, "mol_index": torch.as_tensor(list(indices), dtype=torch.long)}
        return {"mask": mask, "cond": cond}, {"x1": x1, "energy": energy}

    # -- models -------------------------------------------------------------------------------------
    def model_name(self, kind: str) -> str:
        return "fm" if kind == "fm" else f"{kind}_T{self.temperature:g}"

    def model_stage(self, run_dir: str, kind: str) -> Stage:
        trainer = {k: v for k, v in self.trainer_cfg.items() if k not in ("progress", "log_every", "device",
                                                                          "num_threads")}
        spec = {"kind": kind, "beta": self.beta if kind != "fm" else None, "net": self.net_cfg, "trainer": trainer,
                "group_size": self.group_size, "coupling": self.coupling, "seed": self.seed, "format": 1}
        return Stage(f"conformer-{kind}", spec, self._root(run_dir), upstream=[self.data_stage(run_dir)])

    def train(self, run_dir: str, kind: str) -> str:
        from energyflow.data import GroupedMembersSource
        from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss
        from energyflow.paths import CondOTPath

        from .nets import EGNNField

        data = self.data(run_dir)
        stage = self.model_stage(run_dir, kind)

        def fit(folder: str) -> dict[str, Any]:
            torch.manual_seed(self.seed)
            items, members = self.tensors(data, data.split["train"])
            probs = torch.softmax(-self.beta * members["energy"].double(), dim=1) if kind == "efm_resampled" else None
            source = GroupedMembersSource(items, members, self.group_size, member_probs=probs)
            prior = CenteredGaussianPrior()
            if kind == "efm":
                objective = EnergyWeightedLoss(CondOTPath(), self.beta, group_size=self.group_size, prior=prior,
                                               coupling=self.coupling)
            else:
                objective = FlowMatchingLoss(CondOTPath(), prior=prior, coupling=self.coupling)
            net = EGNNField(**self.net_cfg)
            config = TrainerConfig.from_dict({**self.trainer_cfg, "seed": self.seed}, "experiment.trainer")
            meta = {"kind": kind, "beta": self.beta if kind != "fm" else 0.0, "temperature": self.temperature,
                    "prior": prior.spec(), "units": "angstrom", "sampler": self.sampler_cfg}
            return fit_and_save(net, objective, source, config, os.path.join(folder, "train"),
                                os.path.join(folder, "model.pt"), path="ot", meta=meta, name=kind)

        stage.run(fit)
        return stage.file("model.pt")

    # -- sampling -----------------------------------------------------------------------------------
    def generate(self, model_file: str, mols: Sequence[Any], per_molecule: int, seed: int,
                 sampler: Optional[dict] = None, device: Any = "cpu") -> tuple[list[np.ndarray], float]:
        """``per_molecule`` conformers ``[per_molecule, N_m, 3]`` of each molecule (``mols`` with H) and
        the sampling seconds; noise from a generator seeded with ``seed``."""
        from .features import featurize, pad_graphs

        model = load_model(model_file, map_location=device)
        predictor = model.predictor()
        smp = sampler_from_config(self.sampler_cfg, sampler)
        nmax = max(m.GetNumAtoms() for m in mols)
        graphs = pad_graphs([featurize(m) for m in mols], nmax)
        mask = graphs.pop("mask")
        which = torch.arange(len(mols)).repeat_interleave(per_molecule)
        gen = torch.Generator().manual_seed(int(seed))
        prior = CenteredGaussianPrior()
        out = torch.zeros(len(which), nmax, 3)
        chunk = int(self.eval_cfg["batch_size"])
        start = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, len(which), chunk):
                idx = which[lo:lo + chunk]
                m = mask[idx]
                cond = {k: v[idx].to(device) for k, v in graphs.items()}
                cond["mask"] = m.to(device)
                x0 = prior.sample((len(idx), nmax, 3), generator=gen, mask=m).to(device)
                out[lo:lo + len(idx)] = smp.sample(predictor, x0, cond).x.float().cpu()
        seconds = time.perf_counter() - start
        result = []
        for k, mol in enumerate(mols):
            n = mol.GetNumAtoms()
            result.append(out[which == k][:, :n].numpy())
        return result, seconds

    def sample(self, run_dir: str, num_samples: int, model: Optional[str] = None,
               sampler: Optional[dict[str, Any]] = None, seed: int = 0, cond: Any = None) -> SampleRecord:
        """``num_samples`` conformers of the molecule given by ``cond`` (a SMILES string; default:
        the first evaluation molecule) from model ``model`` (``fm``, ``efm`` or ``efm_resampled``; default
        the first EFM model the recipe trains).  Save with :meth:`write_samples` (``energyflow sample RUN --cond SMILES -o out.sdf``)."""
        from rdkit import Chem

        kind = model or next((m for m in self.models if m != "fm"), self.models[0])
        if kind not in MODELS:
            raise InputError(f"--model must be one of {list(MODELS)}, got {kind!r}")
        file = self.model_stage(run_dir, kind).file("model.pt")
        if not os.path.exists(file):
            raise InputError(f"no trained {kind} model for {run_dir} (did the run finish? is the cache at {self._root(run_dir)}?)")
        if cond is None:
            data = self.data(run_dir)
            smiles = data.smiles[data.split[self.eval_cfg["split"]][0]]
            mol = data.mols[data.split[self.eval_cfg["split"]][0]]
        else:
            from .chem import quiet_rdkit

            smiles = str(cond)
            with quiet_rdkit():
                parsed = Chem.MolFromSmiles(smiles)
            if parsed is None:
                raise InputError(f"--cond {smiles!r} is not a valid SMILES")
            mol = Chem.AddHs(parsed)
        coords, seconds = self.generate(file, [mol], int(num_samples), seed, sampler)
        x = torch.from_numpy(coords[0])
        return SampleRecord(x=x, mask=torch.ones(x.shape[:2]), cond={"smiles": smiles},
                            meta={"model": kind, "seconds": seconds, "molblock": Chem.MolToMolBlock(mol)})

    sample_formats = (".sdf",)

    def write_samples(self, record: SampleRecord, path: str) -> None:
        """Write a :meth:`sample` record as an SDF file (one entry per conformer, hydrogens included)."""
        write_sdf(record.meta["molblock"], record.x.numpy(), path, name=record.cond.get("smiles", ""))

    # -- evaluation ---------------------------------------------------------------------------------
    def run(self, run_dir: str) -> dict[str, Any]:
        files = {kind: self.train(run_dir, kind) for kind in self.models}
        results = self.evaluate_files(run_dir, files)
        write_json(results, os.path.join(run_dir, "results.json"))
        _write_table(results, os.path.join(run_dir, "results.md"))
        return results

    def evaluate(self, run_dir: str, sampler: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        files = {kind: self.model_stage(run_dir, kind).file("model.pt") for kind in self.models}
        return self.evaluate_files(run_dir, files, sampler)

    def evaluate_files(self, run_dir: str, files: dict[str, str], sampler: Optional[dict] = None) -> dict[str, Any]:
        from .energies import EnergyPool
        from .metrics import bond_graph_survives, coverage, energy_stats, heavy_atom_rmsd_matrix

        data = self.data(run_dir)
        e = self.eval_cfg
        idx = data.split[e["split"]][: int(e["max_molecules"])]
        if not idx:
            raise InputError(f"experiment.evaluation.split={e['split']}: the split holds no molecule")
        mols = [data.mols[i] for i in idx]
        k = int(self.reference_cfg["num_confs"])
        per = int(e["samples_per_reference"]) * k
        device = resolve_device(self.trainer_cfg.get("device", "auto"))
        generated: dict[str, tuple[list[np.ndarray], float]] = {}
        for kind, file in files.items():
            generated[self.model_name(kind)] = self.generate(file, mols, per, self.seed + 12345, sampler, device)
        generated["etkdg"] = etkdg_conformers(mols, per, seed=self.seed + 1)
        ref_min = np.array([float(data.energies[i].min()) for i in idx])
        rows = {}
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        with EnergyPool(mols, workers=self.eval_workers,
                        relax_steps=int(e["relax_steps"])) as pool:
            for name, (confs, seconds) in generated.items():
                covs, bonds = [], []
                for j, (mol, gen) in enumerate(zip(mols, confs)):
                    ref = data.coords[idx[j]].numpy()
                    covs.append(coverage(heavy_atom_rmsd_matrix(mol, gen, ref), tuple(e["thresholds"])))
                    bonds.append(bond_graph_survives(mol, gen))
                flat, mol_index, num_atoms = _flatten(confs)
                rel_e = pool.energies(mol_index, flat, num_atoms) - ref_min[mol_index]
                raw_e = pool.energies(mol_index, flat, num_atoms, relax_steps=0) - ref_min[mol_index]
                row = {key: float(np.mean([c[key] for c in covs])) for key in covs[0]}
                row.update({f"median_{key}": float(np.median([c[key] for c in covs])) for key in covs[0]})
                row.update({f"energy_{k2}": v for k2, v in energy_stats(rel_e).items()})
                row["energy_raw_median"] = float(np.median(raw_e))
                row["energy_per_molecule"] = [float(np.mean(rel_e[mol_index == j])) for j in range(len(mols))]
                row["bonds_ok"] = float(np.mean(np.concatenate(bonds)))
                row["seconds_per_conformer"] = seconds / max(len(flat), 1)
                rows[name] = row
                write_sdf_many(mols, confs, os.path.join(run_dir, "samples", f"{name}.sdf"),
                               [data.smiles[i] for i in idx])
        target = self.known_answer(data, idx)
        for name, row in rows.items():
            if name != "etkdg":
                row["target_gap"] = float(np.mean(row["energy_per_molecule"]) - target["mean"])
        return {"temperature": self.temperature, "beta": self.beta, "molecules": len(idx),
                "conformers_per_molecule": per, "dataset": self.dataset, "skipped": data.skips,
                "known_answer": target, "rows": rows}

    def known_answer(self, data: ConformerData, idx: Sequence[int]) -> dict[str, Any]:
        """The exact tilted target's mean energy: each molecule's reference ensemble reweighted by
        exp(−βE), averaged over molecules; ``noise`` is its bootstrap standard deviation (conformers
        resampled within each molecule, ``evaluation.bootstrap`` times)."""
        rng = np.random.default_rng(self.seed)
        means, boots = [], []
        for i in idx:
            e = data.relative_energies(i).numpy()
            w = np.exp(-self.beta * (e - e.min()))
            means.append(float((w * e).sum() / w.sum()))
            pick = rng.integers(0, len(e), size=(int(self.eval_cfg["bootstrap"]), len(e)))
            wb = w[pick]
            boots.append((wb * e[pick]).sum(1) / wb.sum(1))
        boot = np.mean(np.stack(boots), axis=0)
        return {"mean": float(np.mean(means)), "noise": float(boot.std()), "per_molecule": means,
                "untilted_mean": float(np.mean([data.relative_energies(i).mean().item() for i in idx]))}


def _flatten(confs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nmax = max(c.shape[1] for c in confs)
    flat = np.zeros((sum(len(c) for c in confs), nmax, 3), dtype=np.float32)
    mol_index = np.concatenate([np.full(len(c), j) for j, c in enumerate(confs)])
    num_atoms = np.concatenate([np.full(len(c), c.shape[1]) for c in confs])
    at = 0
    for c in confs:
        flat[at:at + len(c), : c.shape[1]] = c
        at += len(c)
    return flat, mol_index, num_atoms


def etkdg_conformers(mols: Sequence[Any], per_molecule: int, seed: int) -> tuple[list[np.ndarray], float]:
    """RDKit ETKDGv3 conformers (no force-field optimisation), the baseline, and the seconds they took."""
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom

    out, start = [], time.perf_counter()
    for mol in mols:
        m = Chem.Mol(mol)
        params = rdDistGeom.ETKDGv3()
        params.randomSeed = int(seed)
        params.numThreads = 1
        ids = list(rdDistGeom.EmbedMultipleConfs(m, per_molecule, params))
        coords = np.stack([m.GetConformer(c).GetPositions() for c in ids]).astype(np.float32) if ids else \
            np.zeros((0, m.GetNumAtoms(), 3), np.float32)
        out.append(coords)
    return out, time.perf_counter() - start


def write_sdf(molblock: str, coords: np.ndarray, path: str, name: str = "") -> None:
    """Conformers ``[K, N, 3]`` of the molecule ``molblock`` as an SDF file, atomically."""
    from rdkit import Chem

    mol = Chem.MolFromMolBlock(molblock, removeHs=False)
    write_sdf_many([mol], [coords], path, [name])


def write_sdf_many(mols: Sequence[Any], confs: Sequence[np.ndarray], path: str, names: Sequence[str]) -> None:
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    blocks = []
    for mol, coords, name in zip(mols, confs, names):
        for k, xyz in enumerate(coords):
            m = Chem.Mol(mol)
            m.RemoveAllConformers()
            conf = Chem.Conformer(m.GetNumAtoms())
            for a, (x, y, z) in enumerate(np.asarray(xyz, dtype=np.float64)):
                conf.SetAtomPosition(a, Point3D(x, y, z))
            m.AddConformer(conf, assignId=True)
            m.SetProp("_Name", f"{name} conformer {k}")
            blocks.append(Chem.MolToMolBlock(m) + "$$$$\n")
    with atomic_open(path, "w") as f:
        f.write("".join(blocks))


def _write_table(results: dict[str, Any], path: str) -> None:
    from energyflow.files import write_text

    cols = ["cov_r@0.5", "cov_r@0.75", "amr_r", "cov_p@0.5", "cov_p@0.75", "amr_p", "energy_mean", "energy_median",
            "energy_frac_within", "bonds_ok", "seconds_per_conformer"]
    lines = [f"T = {results['temperature']:g} K (β = {results['beta']:.3f} mol/kcal), {results['molecules']} molecules, "
             f"{results['conformers_per_molecule']} conformers each; known answer {results['known_answer']['mean']:.3f} "
             f"± {results['known_answer']['noise']:.3f} kcal/mol", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in cols) + " |")
    write_text("\n".join(lines) + "\n", path)


def _qm9_smiles_file(root: str) -> str:
    """QM9's SMILES as a ``.smi`` file, through torch-geometric's downloader (internet needed once)."""
    out = os.path.join(root, "qm9.smi")
    if os.path.exists(out):
        return out
    try:
        from torch_geometric.datasets import QM9

        ds = QM9(os.path.join(root, "qm9"))
    except Exception as err:  # noqa: BLE001 - any download failure becomes one line
        reason = " ".join(str(err).split())[:200]
        raise InputError(f"dataset=qm9 needs a one-time download by torch-geometric, which failed ({reason}); "
                         f"offline, use dataset=nci or a local .smi/.sdf file") from None
    smiles = [d.smiles for d in ds]
    with atomic_open(out, "w") as f:
        f.write("\n".join(smiles) + "\n")
    return out
