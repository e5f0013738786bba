"""Reference conformer ensembles: RDKit ETKDGv3 embedding, then MMFF94 optimisation.

An :class:`Ensemble` holds K optimised conformers of one molecule (``float32 [K, N, 3]`` Å, the
molecule's atom order) and their absolute MMFF94 energies (``float64 [K]`` kcal/mol), computed on
exactly the stored ``float32`` coordinates.  :func:`reference_ensembles` computes them for many
molecules in worker processes and caches each molecule's result as one ``.npz`` file.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from energyflow.errors import InputError
from energyflow.files import atomic_open
from energyflow.stages import config_key

from .chem import SkipCounts, quiet_rdkit

if TYPE_CHECKING:  # pragma: no cover
    from rdkit.Chem import Mol

__all__ = ["Ensemble", "reference_ensemble", "reference_ensembles", "CACHE_FORMAT"]

CACHE_FORMAT = 1  # bump when the computation or the file layout changes: old cache files are then ignored


@dataclass
class Ensemble:
    """Optimised conformers of one molecule.

    Attributes:
        coords: ``float32 [K, N, 3]`` coordinates in Å, in the molecule's atom order.
        energies: ``float64 [K]`` absolute MMFF94 energies (kcal/mol) of exactly these coordinates.
    """

    coords: np.ndarray
    energies: np.ndarray

    def __post_init__(self) -> None:
        self.coords = np.ascontiguousarray(self.coords, dtype=np.float32)
        self.energies = np.ascontiguousarray(self.energies, dtype=np.float64)
        if self.coords.ndim != 3 or self.coords.shape[2] != 3 or self.energies.shape != self.coords.shape[:1]:
            raise ValueError(f"an ensemble needs coords [K, N, 3] and energies [K], "
                             f"got {self.coords.shape} and {self.energies.shape}")

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def min_energy(self) -> float:
        """The lowest energy of the ensemble (kcal/mol)."""
        return float(self.energies.min())

    def relative_energies(self) -> np.ndarray:
        """Energies minus :attr:`min_energy` (``float64 [K]``, kcal/mol, all ≥ 0)."""
        return self.energies - self.energies.min()


def _check_hydrogens(mol: "Mol") -> None:
    if any(a.GetNumImplicitHs() for a in mol.GetAtoms()):
        from rdkit import Chem

        raise InputError(f"molecule {Chem.MolToSmiles(mol)} has implicit hydrogens: call Chem.AddHs first "
                         f"(the MMFF94 energy needs every hydrogen)")


def _rdkit_seed(seed: int) -> int:
    """The ETKDG base seed for our ``seed``: a hash of it in ``[1, 2**30]``.

    RDKit's ``EmbedMultipleConfs`` does not use ``randomSeed`` as is: by default (RDKit 2026.09,
    observed) conformer ``i`` is embedded from ``randomSeed * (i + 1)``, so ``randomSeed=0``
    gives K copies of one conformer and seeds ``s`` and ``2s`` share conformers.  With
    ``enableSequentialRandomSeeds`` the conformers come from consecutive seeds after ``base``;
    hashing ``seed`` into a large range keeps the ensembles of different seeds apart (and below
    RDKit's 2**31 seed limit, past which it raises).  A side effect: the first k conformers of
    ``num_confs=K`` are those of ``num_confs=k``.
    """
    digest = hashlib.sha256(f"energyflow-etkdg-seed:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2 ** 30) + 1


def reference_ensemble(mol: "Mol", num_confs: int = 32, seed: int = 0, max_iters: int = 2000,
                       prune_rms: float = 0.0) -> Optional[Ensemble]:
    """K ≤ ``num_confs`` MMFF94-optimised conformers of ``mol`` (which must have explicit hydrogens).

    ETKDGv3 (``EmbedMultipleConfs``, one thread, ``pruneRmsThresh=prune_rms``, seeded from
    ``seed`` through :func:`_rdkit_seed`, which avoids RDKit's degenerate ``randomSeed=0``) embeds
    the conformers; if it finds none, it tries once more from random coordinates.  Each
    conformer is then optimised with MMFF94 (``maxIters=max_iters``); one that has not converged
    is optimised once more (and kept either way).  The energies are computed on the ``float32``
    coordinates that are returned.  The result is deterministic for a given seed; ``mol`` is not
    modified and the atom order is ``mol``'s.

    Returns:
        The :class:`Ensemble`, or None when no conformer could be embedded.

    Raises:
        InputError: ``mol`` has implicit hydrogens or lacks MMFF94 parameters.
    """
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom, rdForceFieldHelpers

    _check_hydrogens(mol)
    work = Chem.Mol(mol)
    work.RemoveAllConformers()
    with quiet_rdkit():
        props = rdForceFieldHelpers.MMFFGetMoleculeProperties(work)
        if props is None or not rdForceFieldHelpers.MMFFHasAllMoleculeParams(work):
            raise InputError(f"molecule {Chem.MolToSmiles(Chem.RemoveHs(work))} has no MMFF94 parameters")
        params = rdDistGeom.ETKDGv3()
        params.randomSeed = _rdkit_seed(seed)
        params.enableSequentialRandomSeeds = True  # consecutive seeds per conformer (see _rdkit_seed)
        params.numThreads = 1
        params.pruneRmsThresh = float(prune_rms)
        cids = list(rdDistGeom.EmbedMultipleConfs(work, int(num_confs), params))
        if not cids:
            params.useRandomCoords = True
            cids = list(rdDistGeom.EmbedMultipleConfs(work, int(num_confs), params))
        if not cids:
            return None
        results = rdForceFieldHelpers.MMFFOptimizeMoleculeConfs(work, numThreads=1, maxIters=int(max_iters))
        for cid, (not_converged, _) in zip(cids, results):
            if not_converged:
                ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(work, props, confId=cid)
                ff.Minimize(maxIts=int(max_iters))
        coords = np.stack([work.GetConformer(cid).GetPositions() for cid in cids]).astype(np.float32)
        ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(work, props, confId=cids[0])
        energies = np.array([ff.CalcEnergy(x.astype(np.float64).ravel().tolist()) for x in coords])
    return Ensemble(coords, energies)


def _identity(mol: "Mol") -> str:
    """A text that identifies the molecule *and its atom order*: canonical SMILES plus every atom
    (element, charge, isotope, radicals, chirality tag) and bond (ends, type, stereo) in order."""
    from rdkit import Chem

    atoms = ";".join(f"{a.GetAtomicNum()},{a.GetFormalCharge()},{a.GetIsotope()},{a.GetNumRadicalElectrons()},"
                     f"{int(a.GetChiralTag())}" for a in mol.GetAtoms())
    bonds = ";".join(f"{b.GetBeginAtomIdx()}-{b.GetEndAtomIdx()},{b.GetBondTypeAsDouble()},{int(b.GetStereo())},"
                     f"{list(b.GetStereoAtoms())}" for b in mol.GetBonds())
    return f"{Chem.MolToSmiles(mol)}|{atoms}|{bonds}"


def _cache_key(mol: "Mol", num_confs: int, seed: int, max_iters: int) -> str:
    import rdkit

    identity = hashlib.sha256(_identity(mol).encode()).hexdigest()
    return config_key({"molecule": identity, "num_confs": int(num_confs), "seed": int(seed),
                       "max_iters": int(max_iters), "rdkit": rdkit.__version__, "format": CACHE_FORMAT})


def _load_cached(path: str, key: str, num_atoms: int) -> tuple[bool, Optional[Ensemble]]:
    """``(hit, ensemble)``; a missing, unreadable, corrupt or mismatching file is a miss.  A hit
    with no conformers is a cached embedding failure (``ensemble`` None)."""
    if not os.path.isfile(path):
        return False, None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return False, None
            coords, energies = data["coords"], data["energies"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False, None
    if (coords.dtype != np.float32 or energies.dtype != np.float64 or coords.ndim != 3
            or coords.shape[1:] != (num_atoms, 3) or energies.shape != coords.shape[:1]
            or not (np.isfinite(coords).all() and np.isfinite(energies).all())):
        return False, None
    return True, (Ensemble(coords, energies) if len(coords) else None)


def _save_cached(path: str, key: str, num_atoms: int, ens: Optional[Ensemble]) -> None:
    if ens is None:
        coords, energies = np.zeros((0, num_atoms, 3), np.float32), np.zeros(0, np.float64)
    else:
        coords, energies = ens.coords, ens.energies
    with atomic_open(path, "wb") as f:
        np.savez(f, coords=coords, energies=energies, key=np.array(key))


def _compute(mol: "Mol", num_confs: int, seed: int, max_iters: int) -> tuple[str, Any]:
    """One molecule's ensemble as ``("ok", (coords, energies))``, ``("ok", None)`` when embedding
    failed, or ``("error", message)`` when RDKit raised (an odd molecule: counted, never fatal)."""
    try:
        ens = reference_ensemble(mol, num_confs=num_confs, seed=seed, max_iters=max_iters)
    except (RuntimeError, ValueError) as err:
        return "error", f"{type(err).__name__}: {err}"
    return "ok", (None if ens is None else (ens.coords, ens.energies))


def _worker(blob: bytes, num_confs: int, seed: int, max_iters: int) -> tuple[str, Any]:
    """Process-pool entry point (module level, so it works with "spawn"): rebuild the molecule from
    its binary pickle (atom order kept) and :func:`_compute` it."""
    from rdkit import Chem

    return _compute(Chem.Mol(blob), num_confs, seed, max_iters)


def reference_ensembles(mols: Sequence["Mol"], *, num_confs: int = 32, seed: int = 0, max_iters: int = 2000,
                        cache_dir: Optional[str] = None, workers: int = 1, progress: bool = False,
                        ) -> tuple[list[Optional[Ensemble]], SkipCounts]:
    """:func:`reference_ensemble` for many molecules, in parallel and cached.

    Every molecule uses the same ``seed`` (its result therefore does not depend on its position
    in ``mols`` or on the other molecules).  ``workers > 1`` runs that many "spawn" worker
    processes (molecules travel as ``mol.ToBinary()``, so the atom order is kept); ``workers=1``
    computes in this process.  The results are identical either way.  (As always with "spawn", a
    script that uses ``workers > 1`` needs the ``if __name__ == "__main__":`` guard.)

    With ``cache_dir``, each molecule's result is one ``<key>.npz`` there (written atomically),
    where ``key`` hashes the molecule's identity *including its atom order*, ``num_confs``,
    ``seed``, ``max_iters``, the RDKit version and :data:`CACHE_FORMAT`.  A cached file that
    cannot be read or does not match is recomputed.  Embedding failures are cached too (as an
    empty ensemble), as they are deterministic.

    Returns:
        ``(ensembles, skips)``: one entry per molecule, None where it failed; the failures are
        counted as ``no_mmff_params`` (molecule without MMFF94 parameters) or ``embedding_failed``.

    Raises:
        InputError: a molecule has implicit hydrogens (call ``Chem.AddHs``).
    """
    from rdkit.Chem import rdForceFieldHelpers
    from tqdm.auto import tqdm

    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    skips = SkipCounts()
    out: list[Optional[Ensemble]] = [None] * len(mols)
    todo: list[int] = []
    keys: dict[int, str] = {}
    for mol in mols:
        _check_hydrogens(mol)
    bar = tqdm(total=len(mols), desc="reference conformers", disable=not progress)
    with quiet_rdkit():
        for i, mol in enumerate(mols):
            if not rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol):
                skips.add("no_mmff_params")
                bar.update(1)
                continue
            if cache_dir is not None:
                keys[i] = _cache_key(mol, num_confs, seed, max_iters)
                hit, ens = _load_cached(os.path.join(cache_dir, f"{keys[i]}.npz"), keys[i], mol.GetNumAtoms())
                if hit:
                    out[i] = ens
                    if ens is None:
                        skips.add("embedding_failed")
                    bar.update(1)
                    continue
            todo.append(i)

    def finish(i: int, status: str, result: Any) -> None:
        if status != "ok":
            warnings.warn(f"reference conformers of molecule {i} failed: {result}", RuntimeWarning, stacklevel=3)
        ens = Ensemble(*result) if status == "ok" and result is not None else None
        out[i] = ens
        if ens is None:
            skips.add("embedding_failed")
        if cache_dir is not None and status == "ok":
            _save_cached(os.path.join(cache_dir, f"{keys[i]}.npz"), keys[i], mols[i].GetNumAtoms(), ens)
        bar.update(1)

    try:
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                finish(i, *_compute(mols[i], num_confs, seed, max_iters))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context) as pool:
                futures = {pool.submit(_worker, mols[i].ToBinary(), num_confs, seed, max_iters): i for i in todo}
                for future in as_completed(futures):
                    finish(futures[future], *future.result())
    finally:
        bar.close()
    return out, skips

