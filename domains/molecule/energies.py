"""MMFF94 energies of conformers, as a black-box :class:`~energyflow.energies.Energy`.

* :func:`mmff_energies` — the MMFF94 energies (kcal/mol) of K conformers of one molecule, optionally
  after a short local MMFF relaxation of each conformer.
* :class:`EnergyPool` — energies of many ``(molecule index, conformer)`` pairs, computed by a pool of
  worker processes (or in-process, or on a Ray cluster) with an in-memory LRU cache per conformer.
* :class:`MMFFEnergy` — the core energy adapter: the *relative* energy ``E_MMFF(x) − E_ref,min`` of a
  padded batch ``[B, Nmax, 3]``; ``differentiable=False`` (RDKit is a black box), ``takes_mask=True``.
* :func:`beta_from_temperature` / :func:`temperature_from_beta` — the energy scale β = 1/(k_B T) in
  mol/kcal, so that the target ``q(x) ∝ p(x) · exp(−β · E(x))`` is a Boltzmann reweighting of ``p``.

Invalid conformers (non-finite coordinates, or a non-finite energy) get the finite penalty
:data:`MMFF_INVALID`, never NaN or ±inf: such a sample simply gets (numerically) zero Boltzmann weight.
Energies above the penalty are clipped to it, so the values always fit a float32 tensor.

RDKit is imported inside functions, so importing this module stays cheap.
"""
from __future__ import annotations

import hashlib
import math
import multiprocessing
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from energyflow.energies import Energy
from energyflow.errors import InputError

from .features import conformer_array

__all__ = [
    "KB_KCAL_PER_MOL_K",
    "MMFF_INVALID",
    "EnergyPool",
    "MMFFEnergy",
    "beta_from_temperature",
    "mmff_energies",
    "temperature_from_beta",
]

MMFF_INVALID: float = 1.0e6
"""Energy (kcal/mol) given to a conformer whose coordinates or energy are not finite; energies above
it are clipped to it.  It is finite on purpose: NaN would poison softmax weights and sums, while
``exp(−β · 1e6)`` is exactly 0 for any sensible β, so an invalid conformer just gets no weight."""

KB_KCAL_PER_MOL_K: float = 0.0019872041
"""Boltzmann's constant (the molar gas constant R) in kcal/(mol·K)."""

_NONBONDED_THRESH = math.inf
"""Include every non-bonded pair.  RDKit's default (100 Å) drops pairs that are farther apart in the
conformer the force field is built from; for ordinary conformers both give the same energy."""


# --------------------------------------------------------------------------------------------
# Temperature
# --------------------------------------------------------------------------------------------
def beta_from_temperature(kelvin: float) -> float:
    """The energy scale β = 1/(k_B · T) in mol/kcal for a temperature in kelvin.

    With energies in kcal/mol, the target ``q(x) ∝ p(x) · exp(−β · E(x))`` with this β is the
    Boltzmann reweighting of ``p`` at temperature ``T``: ``exp(−E/kT)``.  At 298.15 K,
    β ≈ 1.688 mol/kcal (kT ≈ 0.593 kcal/mol), so 1 kcal/mol costs a factor ≈ 5.4 in weight.

    Raises:
        InputError: when ``kelvin`` is not a finite positive number.
    """
    t = _positive_finite(kelvin, "temperature (kelvin)")
    return 1.0 / (KB_KCAL_PER_MOL_K * t)


def temperature_from_beta(beta: float) -> float:
    """The temperature in kelvin whose β = 1/(k_B · T) (mol/kcal) is ``beta``; inverse of
    :func:`beta_from_temperature`.

    Raises:
        InputError: when ``beta`` is not a finite positive number.
    """
    b = _positive_finite(beta, "beta (mol/kcal)")
    return 1.0 / (KB_KCAL_PER_MOL_K * b)


def _positive_finite(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{what} must be a finite positive number, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------
# MMFF94 energies of one molecule
# --------------------------------------------------------------------------------------------
def _mmff_properties(mol: Any, name: str = "molecule") -> Any:
    from rdkit.Chem import rdForceFieldHelpers

    props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol, mmffVariant="MMFF94")
    if props is None:
        raise InputError(f"{name} has no MMFF94 parameters (atom typing failed); skip it")
    return props


def _energies_with_props(mol: Any, props: Any, coords: np.ndarray, relax_steps: int) -> np.ndarray:
    """MMFF94 energies of ``coords`` ``[K, N, 3]`` (float64) with precomputed properties."""
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers
    from rdkit.Geometry import Point3D

    k, n = coords.shape[0], coords.shape[1]
    out = np.full(k, MMFF_INVALID, dtype=np.float64)
    finite = np.isfinite(coords).all(axis=(1, 2))
    if not finite.any():
        return out
    work = Chem.Mol(mol)
    work.RemoveAllConformers()
    conf = Chem.Conformer(n)
    first = coords[int(np.argmax(finite))]
    for a in range(n):
        conf.SetAtomPosition(a, Point3D(*first[a]))
    work.AddConformer(conf, assignId=True)

    if relax_steps <= 0:
        # One force field; CalcEnergy(pos) evaluates any coordinates with the same terms.
        ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(work, props, nonBondedThresh=_NONBONDED_THRESH)
        if ff is None:
            raise InputError("MMFF94 force field setup failed for this molecule; skip it")
        for i in np.flatnonzero(finite):
            out[i] = ff.CalcEnergy(coords[i].ravel().tolist())
    else:
        # One force field per conformer: Minimize moves the conformer the field was built on.
        for i in np.flatnonzero(finite):
            c = work.GetConformer()
            for a in range(n):
                c.SetAtomPosition(a, Point3D(*coords[i, a]))
            ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(work, props, nonBondedThresh=_NONBONDED_THRESH)
            if ff is None:
                raise InputError("MMFF94 force field setup failed for this molecule; skip it")
            ff.Initialize()
            ff.Minimize(maxIts=int(relax_steps))
            out[i] = ff.CalcEnergy()
    out[~np.isfinite(out)] = MMFF_INVALID
    return np.minimum(out, MMFF_INVALID)


def mmff_energies(mol: Any, coords: np.ndarray, relax_steps: int = 0) -> np.ndarray:
    """MMFF94 energies (kcal/mol) of K conformers of one molecule.

    Args:
        mol: an RDKit ``Mol`` with explicit hydrogens (its own conformers are ignored).
        coords: ``[K, N, 3]`` (or one ``[N, 3]``) coordinates in ångström, in ``mol``'s atom order.
        relax_steps: when ``> 0``, each conformer is first locally minimised with at most this many
            MMFF94 iterations and the energy of the *relaxed* conformer is returned — the energy of
            the conformer's basin rather than of the exact coordinates.  Generated coordinates carry
            small bond-length and angle errors (a few hundredths of an ångström), and the stiff
            bond/angle terms then dominate the raw energy (tens of kcal/mol); a few dozen relaxation
            steps remove that noise while staying in the same conformational basin.

    Returns:
        ``float64`` ``[K]`` energies.  A conformer with non-finite coordinates (or a non-finite
        energy) gets :data:`MMFF_INVALID`; energies above it are clipped to it.  Never NaN.

    Raises:
        InputError: when ``coords`` does not match the molecule, ``relax_steps`` is negative, or the
            molecule has no MMFF94 parameters.
    """
    arr = conformer_array(mol, coords)
    relax_steps = _check_relax(relax_steps)
    return _energies_with_props(mol, _mmff_properties(mol), arr, relax_steps)


def _check_relax(relax_steps: Any) -> int:
    if isinstance(relax_steps, bool) or not isinstance(relax_steps, (int, np.integer)) or relax_steps < 0:
        raise InputError(f"relax_steps must be an integer >= 0, got {relax_steps!r}")
    return int(relax_steps)


# --------------------------------------------------------------------------------------------
# Worker pool
# --------------------------------------------------------------------------------------------
class _MolTable:
    """The molecules of a pool, with their MMFF properties built once (lazily) per molecule."""

    def __init__(self, mols: Sequence[Any]):
        self.mols = list(mols)
        self._props: dict[int, Any] = {}

    def energies(self, index: int, coords: np.ndarray, relax_steps: int) -> np.ndarray:
        props = self._props.get(index)
        if props is None:
            props = self._props[index] = _mmff_properties(self.mols[index], f"molecule {index}")
        return _energies_with_props(self.mols[index], props, coords, relax_steps)


_WORKER_TABLE: _MolTable | None = None


def _init_worker(binaries: Sequence[bytes]) -> None:
    """Pool initializer: receive the molecules once, as ``Mol.ToBinary()`` bytes."""
    from rdkit import Chem

    global _WORKER_TABLE
    _WORKER_TABLE = _MolTable([Chem.Mol(b) for b in binaries])


def _worker_energies(task: tuple[int, np.ndarray, int]) -> np.ndarray:
    index, coords, relax_steps = task
    if _WORKER_TABLE is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("energy worker was not initialised with the molecules")
    return _WORKER_TABLE.energies(index, coords, relax_steps)


def _started() -> bool:
    return _WORKER_TABLE is not None


def _conformer_key(coords: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(coords.dtype).encode())
    h.update(np.ascontiguousarray(coords).tobytes())
    return h.digest()


class EnergyPool:
    """MMFF94 energies of many ``(molecule index, conformer)`` pairs, in parallel and cached.

    Requests are grouped by molecule and sent to the workers in chunks of at most ``chunk_size``
    conformers.  Each worker receives the molecules once (as ``Mol.ToBinary()`` bytes, through the
    pool's initializer) and builds each molecule's MMFF94 properties once.  Results are cached per
    conformer in an in-memory LRU keyed by ``(molecule index, relax_steps, hash of the coordinates'
    bytes)``; identical conformers within one request are computed once.

    Args:
        mols: the molecules (RDKit ``Mol`` with explicit hydrogens); requests index this list.
        workers: number of worker processes.  With ``backend="process"`` and ``workers=1`` everything
            runs in this process (no pool).
        backend: ``"process"`` (``concurrent.futures.ProcessPoolExecutor``, ``start_method`` processes)
            or ``"ray"`` (``ray.util.multiprocessing.Pool`` with ``workers`` processes, always used).
        ray_address: the Ray cluster to connect to (``None``: start or join a local one).
        relax_steps: MMFF relaxation iterations before each energy (see :func:`mmff_energies`).
        cache_size: maximum number of cached conformer energies (0 disables the cache).
        chunk_size: maximum number of conformers per task sent to a worker.
        start_method: multiprocessing start method of the process backend (``"forkserver"`` is safe
            with threads, e.g. after torch is imported).

    Raises:
        InputError: a bad argument, a molecule without MMFF94 parameters, or ``backend="ray"`` without
            Ray installed.

    Use it as a context manager, or call :meth:`close`, to stop the workers.
    """

    def __init__(self, mols: Sequence[Any], workers: int = 1, backend: str = "process",
                 ray_address: str | None = None, relax_steps: int = 0, cache_size: int = 100_000,
                 chunk_size: int = 64, start_method: str = "forkserver"):
        if backend not in ("process", "ray"):
            raise InputError(f"backend must be 'process' or 'ray', got {backend!r}")
        for name, value, lo in (("workers", workers, 1), ("cache_size", cache_size, 0), ("chunk_size", chunk_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
        self.mols = list(mols)
        if not self.mols:
            raise InputError("EnergyPool needs at least one molecule")
        self.relax_steps = _check_relax(relax_steps)
        self.workers = int(workers)
        self.backend = backend
        self.ray_address = ray_address
        self.cache_size = int(cache_size)
        self.chunk_size = int(chunk_size)
        self.start_method = start_method
        self.num_atoms = np.array([m.GetNumAtoms() for m in self.mols], dtype=np.int64)
        self._table = _MolTable(self.mols)
        for i in range(len(self.mols)):  # fail now, not in a worker; also fills the local props cache
            self._table._props[i] = _mmff_properties(self.mols[i], f"molecule {i}")
        if backend == "ray":
            try:
                import ray.util.multiprocessing  # noqa: F401
            except ImportError:
                raise InputError("backend='ray' needs Ray: pip install 'ray[default]', or use backend='process'") from None
        self._cache: OrderedDict[tuple[int, int, bytes], float] = OrderedDict()
        self._pool: Any = None
        self.hits = 0
        self.misses = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def _in_process(self) -> bool:
        return self.backend == "process" and self.workers == 1

    def _get_pool(self) -> Any:
        if self._pool is None:
            binaries = [m.ToBinary() for m in self.mols]
            if self.backend == "ray":
                from ray.util.multiprocessing import Pool

                self._pool = Pool(processes=self.workers, initializer=_init_worker, initargs=(binaries,),
                                  ray_address=self.ray_address)
            else:
                from concurrent.futures import ProcessPoolExecutor

                ctx = multiprocessing.get_context(self.start_method)
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                                 initializer=_init_worker, initargs=(binaries,))
                # The executor starts workers lazily, one per submission that finds none idle: start
                # them all now, so that the first batch is spread over every worker.
                for f in [self._pool.submit(_started) for _ in range(self.workers)]:
                    f.result()
        return self._pool

    def close(self) -> None:
        """Stop the workers (if any).  The pool can still be used afterwards: it restarts them."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self.backend == "ray":
            pool.terminate()
        else:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EnergyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the reliable way
        try:
            self.close()
        except Exception:
            pass

    # -- cache -------------------------------------------------------------------------------
    def cache_info(self) -> dict[str, int]:
        """``hits``, ``misses`` (conformers computed), current ``size`` and ``max_size`` of the cache."""
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}

    def clear_cache(self) -> None:
        """Forget every cached energy (the hit/miss counters are kept)."""
        self._cache.clear()

    # -- energies ----------------------------------------------------------------------------
    def energies(self, mol_index: np.ndarray, coords: np.ndarray,
                 num_atoms: np.ndarray | None = None, relax_steps: int | None = None) -> np.ndarray:
        """MMFF94 energies (kcal/mol) of a batch of conformers of the pool's molecules.

        Args:
            mol_index: ``[B]`` integer indices into ``mols``.
            coords: ``[B, Nmax, 3]`` padded coordinates; the first ``num_atoms[i]`` rows of sample
                ``i`` are its atoms, in the molecule's atom order.
            num_atoms: ``[B]`` number of real atoms of each sample; must equal the molecule's atom
                count.  ``None``: each molecule's atom count.
            relax_steps: this call's MMFF relaxation iterations (``None``: the pool's), so one pool
                (one set of workers) serves both raw and relaxed energies; the cache keys include it.

        Returns:
            ``float64`` ``[B]`` absolute energies (see :func:`mmff_energies` for invalid conformers).

        Raises:
            InputError: an index out of range, a shape mismatch, or an atom count that does not match
                the molecule.
        """
        relax = self.relax_steps if relax_steps is None else _check_relax(relax_steps)
        idx = np.asarray(mol_index)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise InputError(f"mol_index must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        b = idx.shape[0]
        x = np.asarray(coords)
        if x.ndim != 3 or x.shape[0] != b or x.shape[2] != 3:
            raise InputError(f"coords must have shape [B={b}, Nmax, 3], got {x.shape}")
        if b and (idx.min() < 0 or idx.max() >= len(self.mols)):
            raise InputError(f"mol_index out of range [0, {len(self.mols)}): min {idx.min()}, max {idx.max()}")
        expected = self.num_atoms[idx]
        if num_atoms is None:
            n_at = expected
        else:
            n_at = np.asarray(num_atoms).astype(np.int64).reshape(-1)
            if n_at.shape != (b,):
                raise InputError(f"num_atoms must have shape [{b}], got {np.shape(num_atoms)}")
        bad = np.flatnonzero(n_at != expected)
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{bad.size} of {b} samples have the wrong number of atoms, e.g. sample {i}: "
                             f"{int(n_at[i])} atoms for molecule {int(idx[i])} which has {int(expected[i])}")
        if b and int(n_at.max()) > x.shape[1]:
            raise InputError(f"coords has {x.shape[1]} atom slots but a molecule needs {int(n_at.max())}")

        out = np.empty(b, dtype=np.float64)
        pending: dict[tuple[int, int, bytes], list[int]] = {}
        for i in range(b):
            key = (int(idx[i]), relax, _conformer_key(x[i, : n_at[i]]))
            if self.cache_size and key in self._cache:
                self._cache.move_to_end(key)
                out[i] = self._cache[key]
                self.hits += 1
            else:
                pending.setdefault(key, []).append(i)
        if not pending:
            return out

        keys = list(pending)
        by_mol: dict[int, list[int]] = {}
        for j, key in enumerate(keys):
            by_mol.setdefault(key[0], []).append(j)
        tasks: list[tuple[int, np.ndarray, int]] = []
        task_keys: list[list[int]] = []
        for m, js in by_mol.items():
            n = int(self.num_atoms[m])
            for s in range(0, len(js), self.chunk_size):
                part = js[s: s + self.chunk_size]
                rows = [pending[keys[j]][0] for j in part]
                tasks.append((m, np.asarray(x[rows, :n], dtype=np.float64), relax))
                task_keys.append(part)
        results = self._run(tasks)
        self.misses += len(keys)
        for part, energies in zip(task_keys, results):
            for j, e in zip(part, np.asarray(energies, dtype=np.float64)):
                key = keys[j]
                out[pending[key]] = e
                if self.cache_size:
                    self._cache[key] = float(e)
                    self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def _run(self, tasks: list[tuple[int, np.ndarray, int]]) -> list[np.ndarray]:
        if self._in_process():
            return [self._table.energies(*t) for t in tasks]
        # ProcessPoolExecutor.map and ray's Pool.map both return results in task order.
        return list(self._get_pool().map(_worker_energies, tasks))


# --------------------------------------------------------------------------------------------
# The core energy adapter
# --------------------------------------------------------------------------------------------
class MMFFEnergy(Energy):
    """The molecule domain's energy: MMFF94 energy relative to each molecule's reference minimum.

    ``E(x) = E_MMFF(x) − reference_min[mol_index]`` in kcal/mol, so 0 is as good as the best
    reference conformer.  RDKit is a black box (``differentiable=False``): only energy-weighted
    training may use this energy.

    Args:
        pool: the :class:`EnergyPool` computing absolute energies (its ``mols`` define the indices).
        reference_min: ``float64`` ``[len(pool.mols)]`` lowest reference-ensemble energy of each
            molecule (computed with the pool's ``relax_steps``, for consistency).

    ``forward(x, cond, mask=None)``: ``x`` ``[B, Nmax, 3]``; ``cond["mol_index"]`` a ``[B]`` integer
    tensor (or array); ``mask`` ``[B, Nmax]`` marks real atoms (their order is kept; each sample must
    have exactly its molecule's atom count).  Without a mask the first N rows of each sample are used.
    Returns a ``[B]`` tensor on ``x``'s device and dtype.  Bad inputs raise :class:`InputError`.
    """

    differentiable = False
    takes_mask = True

    def __init__(self, pool: EnergyPool, reference_min: Sequence[float] | np.ndarray):
        ref = np.asarray(reference_min, dtype=np.float64).reshape(-1)
        if ref.shape[0] != len(pool.mols):
            raise InputError(f"reference_min has {ref.shape[0]} values but the pool has {len(pool.mols)} molecules")
        if not np.isfinite(ref).all():
            raise InputError(f"reference_min has {int((~np.isfinite(ref)).sum())} non-finite values")
        self.pool = pool
        self.reference_min = ref

    def forward(self, x: Tensor, cond: Any | None = None, mask: Tensor | None = None) -> Tensor:
        if not isinstance(cond, dict) or "mol_index" not in cond:
            raise InputError("MMFFEnergy needs cond['mol_index'] ([B] molecule indices into the energy pool)")
        mi = cond["mol_index"]
        idx = (mi.detach().cpu().numpy() if isinstance(mi, Tensor) else np.asarray(mi)).reshape(-1)
        if x.ndim != 3 or x.shape[-1] != 3:
            raise InputError(f"MMFFEnergy expects coordinates [B, Nmax, 3], got {tuple(x.shape)}")
        if idx.shape[0] != x.shape[0]:
            raise InputError(f"cond['mol_index'] has {idx.shape[0]} entries for a batch of {x.shape[0]}")
        xs = x.detach().to(torch.float64).cpu().numpy()
        num_atoms = None
        if mask is not None:
            m = mask.detach().cpu().numpy().astype(bool)
            if m.shape != xs.shape[:2]:
                raise InputError(f"mask has shape {m.shape}, expected {xs.shape[:2]}")
            # Move the real atoms to the front of each row, keeping their order.
            order = np.argsort(~m, axis=1, kind="stable")
            xs = np.take_along_axis(xs, order[..., None], axis=1)
            num_atoms = m.sum(axis=1)
        absolute = self.pool.energies(idx, xs, num_atoms)
        rel = absolute - self.reference_min[idx.astype(np.int64)]
        return torch.as_tensor(rel, device=x.device).to(x.dtype)

    def close(self) -> None:
        """Stop the pool's workers."""
        self.pool.close()
