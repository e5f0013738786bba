"""Evaluators of generated conformer ensembles.

* :func:`heavy_atom_rmsd_matrix` — symmetry-aware heavy-atom RMSD (after best alignment) between
  generated and reference conformers.
* :func:`coverage` — COV-R / AMR-R (recall: are the reference conformers found?) and COV-P / AMR-P
  (precision: are the generated conformers near some reference?) from an RMSD matrix.
* :func:`energy_stats` — mean, median and fraction within ``within`` kcal/mol of relative energies.
* :func:`bond_graph_survives` — does distance-based bond perception recover the molecule's graph?
* :func:`posebusters_checks` — PoseBusters' molecule-only checks, when PoseBusters is installed.

RDKit is imported inside the functions.  Molecules carry explicit hydrogens and coordinates follow
RDKit's atom order (see :mod:`domains.molecule`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from energyflow.errors import InputError

from .features import conformer_array

__all__ = [
    "bond_graph_survives",
    "coverage",
    "energy_stats",
    "heavy_atom_rmsd_matrix",
    "posebusters_checks",
]


def _with_conformers(mol: Any, coords: np.ndarray) -> Any:
    """A copy of ``mol`` whose conformers (ids 0…K−1) are ``coords`` ``[K, N, 3]``."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    out = Chem.Mol(mol)
    out.RemoveAllConformers()
    n = out.GetNumAtoms()
    for k in range(coords.shape[0]):
        conf = Chem.Conformer(n)
        for a in range(n):
            conf.SetAtomPosition(a, Point3D(*coords[k, a]))
        conf.Set3D(True)
        out.AddConformer(conf, assignId=True)
    return out


# --------------------------------------------------------------------------------------------
# RMSD and coverage
# --------------------------------------------------------------------------------------------
def heavy_atom_rmsd_matrix(mol: Any, gen: np.ndarray, ref: np.ndarray,
                           max_matches: int | None = None) -> np.ndarray:
    """Symmetry-aware heavy-atom RMSD (Å) of every generated conformer to every reference one.

    Hydrogens are dropped (so methyl rotations do not count), then each pair is optimally
    superimposed over every symmetry-equivalent atom mapping of the heavy-atom molecule (RDKit's
    ``GetBestRMS``).  Conjugated terminal groups (carboxylate, nitro, …) count as symmetric, so
    swapping the two O of a carboxylate costs nothing.

    Args:
        mol: the molecule (explicit hydrogens).
        gen: ``[G, N, 3]`` generated conformers (all atoms, ``mol``'s order).
        ref: ``[R, N, 3]`` reference conformers.
        max_matches: ``None`` (default): RDKit's ``GetAllConformerBestRMSToRef``, which finds the
            symmetry mappings once for all G·R pairs, with RDKit's cap of 10⁶ mappings (without
            hydrogens, ordinary molecules have a handful; e.g. 48 for a tert-butyl-phenyl
            sulfonamide).  An integer: ``GetBestRMS`` pair by pair with at most that many mappings
            (about twice as slow; for very symmetric molecules, past the cap the RMSD is an upper
            bound).  RDKit 2026.09 cannot pass alignment parameters to
            ``GetAllConformerBestRMSToRef`` from Python, hence the two paths.

    Returns:
        ``float64`` ``[G, R]``.  Rows/columns of conformers with non-finite coordinates are ``+inf``.

    Raises:
        InputError: shape mismatch, or a molecule without heavy atoms.
    """
    from rdkit import Chem
    from rdkit.Chem import rdMolAlign

    g = conformer_array(mol, gen, "gen")
    r = conformer_array(mol, ref, "ref")
    heavy = np.array([a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1], dtype=np.int64)
    if heavy.size == 0:
        raise InputError("heavy-atom RMSD needs a molecule with at least one heavy atom")
    out = np.full((g.shape[0], r.shape[0]), np.inf, dtype=np.float64)
    g_ok = np.isfinite(g).all(axis=(1, 2))
    r_ok = np.isfinite(r).all(axis=(1, 2))
    if not g_ok.any() or not r_ok.any():
        return out

    bare = Chem.Mol(mol)
    bare.RemoveAllConformers()
    try:
        hmol = Chem.RemoveAllHs(bare)
    except (ValueError, RuntimeError):  # unusual valences: keep the graph as it is
        hmol = Chem.RemoveAllHs(bare, sanitize=False)
    if hmol.GetNumAtoms() != heavy.size:  # pragma: no cover - RemoveAllHs keeps every heavy atom
        raise InputError("removing hydrogens changed the heavy atoms of the molecule")
    prb = _with_conformers(hmol, g[g_ok][:, heavy])
    rfm = _with_conformers(hmol, r[r_ok][:, heavy])

    n_g, n_r = int(g_ok.sum()), int(r_ok.sum())
    if max_matches is None:
        # Ordered by reference conformer, then probe conformer: [(ref 0, prb 0), (ref 0, prb 1), …].
        vals = np.asarray(rdMolAlign.GetAllConformerBestRMSToRef(prb, rfm), dtype=np.float64)
        block = vals.reshape(n_r, n_g).T
    else:
        # GetBestRMS aligns the probe conformer in place (harmless: prb is our copy).
        block = np.array([[rdMolAlign.GetBestRMS(prb, rfm, prbId=i, refId=j, maxMatches=int(max_matches),
                                                 symmetrizeConjugatedTerminalGroups=True)
                           for j in range(n_r)] for i in range(n_g)], dtype=np.float64).reshape(n_g, n_r)
    out[np.ix_(g_ok, r_ok)] = block
    return out


def coverage(rmsd: np.ndarray, thresholds: Sequence[float] = (0.5, 0.75)) -> dict[str, float]:
    """Coverage and matching metrics of an RMSD matrix ``[G generated, R reference]``.

    * ``cov_r@δ`` (recall coverage): fraction of reference conformers with some generated
      conformer at RMSD ≤ δ.
    * ``amr_r``: mean over reference conformers of the smallest RMSD to a generated conformer.
    * ``cov_p@δ`` (precision coverage): fraction of generated conformers at RMSD ≤ δ of some
      reference conformer.
    * ``amr_p``: mean over generated conformers of the smallest RMSD to a reference conformer.

    Fractions are in [0, 1].  ``+inf`` entries (invalid conformers) never cover anything; an AMR
    over a conformer with no finite RMSD is ``inf``.

    Raises:
        InputError: when the matrix is not 2-D or has no row or no column, or contains NaN.
    """
    d = np.asarray(rmsd, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise InputError(f"coverage needs an RMSD matrix [G, R] with G, R >= 1, got shape {d.shape}")
    if np.isnan(d).any():
        raise InputError(f"the RMSD matrix has {int(np.isnan(d).sum())} NaN entries")
    min_r = d.min(axis=0)  # best generated conformer for each reference
    min_p = d.min(axis=1)  # best reference conformer for each generated one
    out: dict[str, float] = {}
    for t in thresholds:
        out[f"cov_r@{float(t):g}"] = float((min_r <= t).mean())
    out["amr_r"] = float(min_r.mean())
    for t in thresholds:
        out[f"cov_p@{float(t):g}"] = float((min_p <= t).mean())
    out["amr_p"] = float(min_p.mean())
    return out


# --------------------------------------------------------------------------------------------
# Energies
# --------------------------------------------------------------------------------------------
def energy_stats(relative_energies: np.ndarray, within: float = 5.0) -> dict[str, float]:
    """Summary of relative energies (kcal/mol above the molecule's reference minimum).

    Returns:
        ``mean``, ``median``, ``min``, ``frac_within`` (fraction ≤ ``within``), ``within`` and ``n``.
        Invalid conformers (energy :data:`~domains.molecule.energies.MMFF_INVALID`) count as
        outside the window and pull the mean up, as they should.

    Raises:
        InputError: when there are no energies or one is NaN.
    """
    e = np.asarray(relative_energies, dtype=np.float64).reshape(-1)
    if e.size == 0:
        raise InputError("energy_stats needs at least one energy")
    if np.isnan(e).any():
        raise InputError(f"{int(np.isnan(e).sum())} of {e.size} energies are NaN")
    return {
        "mean": float(e.mean()),
        "median": float(np.median(e)),
        "min": float(e.min()),
        "frac_within": float((e <= within).mean()),
        "within": float(within),
        "n": int(e.size),
    }


# --------------------------------------------------------------------------------------------
# Validity
# --------------------------------------------------------------------------------------------
def _bond_set(m: Any) -> set[tuple[int, int]]:
    return {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in m.GetBonds()}


def bond_graph_survives(mol: Any, coords: np.ndarray) -> np.ndarray:
    """Whether bond perception from the coordinates alone recovers exactly the molecule's bonds.

    For each conformer, RDKit's ``rdDetermineBonds.DetermineConnectivity`` (covalent-radius
    "connect the dots") is run on the bare atoms with these coordinates; the conformer passes when
    the perceived bonded pairs equal the molecule's (hydrogens included).  A stretched or broken
    bond, or two atoms clashing into an extra bond, fails.

    Args:
        mol: the molecule (explicit hydrogens).
        coords: ``[K, N, 3]`` (or ``[N, 3]``) coordinates.

    Returns:
        ``bool`` ``[K]``; conformers with non-finite coordinates are ``False``.
    """
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    x = conformer_array(mol, coords, "coords")
    expected = _bond_set(mol)
    bare = Chem.RWMol()
    for atom in mol.GetAtoms():
        a = Chem.Atom(atom.GetAtomicNum())
        a.SetFormalCharge(atom.GetFormalCharge())
        bare.AddAtom(a)
    n = mol.GetNumAtoms()
    out = np.zeros(x.shape[0], dtype=bool)
    for k in range(x.shape[0]):
        if not np.isfinite(x[k]).all():
            continue
        work = Chem.RWMol(bare)
        conf = Chem.Conformer(n)
        for a in range(n):
            conf.SetAtomPosition(a, Point3D(*x[k, a]))
        conf.Set3D(True)
        work.AddConformer(conf, assignId=True)
        try:
            rdDetermineBonds.DetermineConnectivity(work)
        except (ValueError, RuntimeError):  # perception failed: the graph did not survive
            continue
        out[k] = _bond_set(work) == expected
    return out


def posebusters_checks(mol: Any, coords: np.ndarray) -> dict[str, float] | None:
    """Fraction of conformers passing each of PoseBusters' molecule-only checks (config ``"mol"``).

    Returns ``None`` when ``posebusters`` is not installed.  Otherwise a dict from check name to
    the fraction of the K conformers passing it, plus ``"all"`` (passing every check).  Conformers
    with non-finite coordinates count as failing every check.
    """
    try:
        from posebusters import PoseBusters
    except ImportError:
        return None

    x = conformer_array(mol, coords, "coords")
    k = x.shape[0]
    ok = np.flatnonzero(np.isfinite(x).all(axis=(1, 2)))
    if k == 0:
        return {}
    if ok.size == 0:
        return {"all": 0.0}
    mols = []
    for i in ok:
        m = _with_conformers(mol, x[i: i + 1])
        mols.append(m)
    table = PoseBusters(config="mol").bust(mols, None, None)
    checks = [c for c in table.columns if table[c].dtype == bool]
    out = {str(c): float(table[c].sum()) / k for c in checks}
    out["all"] = float(table[checks].all(axis=1).sum()) / k if checks else 0.0
    return out
