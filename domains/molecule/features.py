"""Featurisation of molecular graphs, and padded conformer tensors for the core's batches.

A molecule (RDKit ``Mol`` with explicit hydrogens, see :mod:`domains.molecule`) becomes a
:class:`MolGraph`:

* ``atoms``: ``float32 [N, ATOM_FEATURES]``: element one-hot (:data:`ELEMENTS` + other), aromatic,
  in a ring, formal charge, hybridisation one-hot (sp, sp², sp³, other), degree one-hot (0–4+);
* ``bonds``: ``int64 [N, N]``: bond type of each pair (0 none, 1 single, 2 double, 3 triple,
  4 aromatic), symmetric;
* ``hops``: ``int64 [N, N]``: topological distance of each pair clipped to :data:`MAX_HOPS`
  (0 on the diagonal; :data:`MAX_HOPS` also for "farther or not connected").

The network (:class:`domains.molecule.nets.EGNNField`) reads pairs through ``bonds`` and ``hops``:
one-, two- and three-bond neighbours fix bond lengths, angles and torsions, the rest is the
non-bonded geometry.  Nothing here depends on coordinates, so the features are invariant to
rotations and translations, and permuting the atoms permutes them.

:func:`pad_graphs` stacks graphs to ``[M, Nmax, ...]`` with a ``mask`` ``[M, Nmax]``;
:func:`pad_conformers` stacks ensembles to ``[M, K, Nmax, 3]``, centred over each conformer's atoms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ELEMENTS", "ATOM_FEATURES", "BOND_TYPES", "MAX_HOPS", "MolGraph", "featurize", "pad_graphs",
           "pad_conformers", "conformer_array"]

ELEMENTS = ("H", "C", "N", "O", "F", "S", "Cl", "Br")
_HYBRIDISATIONS = ("SP", "SP2", "SP3")
ATOM_FEATURES = len(ELEMENTS) + 1 + 3 + len(_HYBRIDISATIONS) + 1 + 5
BOND_TYPES = 5          # none, single, double, triple, aromatic
MAX_HOPS = 4


@dataclass
class MolGraph:
    """The graph of one molecule with hydrogens: ``atoms`` [N, F], ``bonds`` [N, N], ``hops`` [N, N]."""

    atoms: np.ndarray
    bonds: np.ndarray
    hops: np.ndarray

    @property
    def num_atoms(self) -> int:
        return int(self.atoms.shape[0])


def _bond_code(bond: Any) -> int:
    from rdkit import Chem

    kind = bond.GetBondType()
    if bond.GetIsAromatic() or kind == Chem.BondType.AROMATIC:
        return 4
    return {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}.get(kind, 1)


def featurize(mol: Any) -> MolGraph:
    """The :class:`MolGraph` of ``mol`` (an RDKit molecule with explicit hydrogens), in RDKit's atom order."""
    from rdkit import Chem

    n = mol.GetNumAtoms()
    atoms = np.zeros((n, ATOM_FEATURES), dtype=np.float32)
    for atom in mol.GetAtoms():
        i, f = atom.GetIdx(), 0
        symbol = atom.GetSymbol()
        atoms[i, ELEMENTS.index(symbol) if symbol in ELEMENTS else len(ELEMENTS)] = 1.0
        f = len(ELEMENTS) + 1
        atoms[i, f] = float(atom.GetIsAromatic())
        atoms[i, f + 1] = float(atom.IsInRing())
        atoms[i, f + 2] = float(atom.GetFormalCharge())
        f += 3
        hyb = str(atom.GetHybridization())
        atoms[i, f + (_HYBRIDISATIONS.index(hyb) if hyb in _HYBRIDISATIONS else len(_HYBRIDISATIONS))] = 1.0
        f += len(_HYBRIDISATIONS) + 1
        atoms[i, f + min(atom.GetDegree(), 4)] = 1.0
    bonds = np.zeros((n, n), dtype=np.int64)
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        bonds[i, j] = bonds[j, i] = _bond_code(bond)
    dist = Chem.GetDistanceMatrix(mol)          # topological; 1e8 between fragments
    hops = np.minimum(dist, MAX_HOPS).astype(np.int64)
    return MolGraph(atoms=atoms, bonds=bonds, hops=hops)


def conformer_array(mol: Any, coords: Any, what: str = "conformer coordinates") -> np.ndarray:
    """``coords`` of ``mol`` as ``float64 [K, N, 3]`` (one ``[N, 3]`` conformer becomes ``K = 1``);
    an :class:`~energyflow.errors.InputError` naming ``what`` when the shape does not fit the molecule."""
    from energyflow.errors import InputError

    arr = np.asarray(coords, dtype=np.float64)
    n = mol.GetNumAtoms()
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (n, 3):
        raise InputError(f"{what} must have shape [K, {n}, 3] for a molecule with {n} atoms (hydrogens "
                         f"included), got {tuple(np.shape(coords))}")
    return arr


def pad_graphs(graphs: Sequence[MolGraph], num_atoms: int | None = None) -> dict[str, Tensor]:
    """Graphs padded to ``Nmax`` atoms: ``{"atoms": [M, Nmax, F], "bonds": [M, Nmax, Nmax],
    "hops": [M, Nmax, Nmax], "mask": [M, Nmax]}`` (padding: zero features, bond 0, hop 0, mask 0)."""
    if not graphs:
        raise ValueError("pad_graphs needs at least one graph")
    nmax = max(g.num_atoms for g in graphs) if num_atoms is None else int(num_atoms)
    m = len(graphs)
    atoms = torch.zeros(m, nmax, ATOM_FEATURES)
    bonds = torch.zeros(m, nmax, nmax, dtype=torch.long)
    hops = torch.zeros(m, nmax, nmax, dtype=torch.long)
    mask = torch.zeros(m, nmax)
    for k, g in enumerate(graphs):
        n = g.num_atoms
        if n > nmax:
            raise ValueError(f"a molecule has {n} atoms, more than the padding size {nmax}")
        atoms[k, :n] = torch.from_numpy(g.atoms)
        bonds[k, :n, :n] = torch.from_numpy(g.bonds)
        hops[k, :n, :n] = torch.from_numpy(g.hops)
        mask[k, :n] = 1.0
    return {"atoms": atoms, "bonds": bonds, "hops": hops, "mask": mask}


def pad_conformers(ensembles: Sequence[np.ndarray], num_atoms: int | None = None) -> Tensor:
    """Ensembles ``[K, N_m, 3]`` (one K for all) padded to ``[M, K, Nmax, 3]``, each conformer
    centred over its real atoms (padding zero)."""
    if not ensembles:
        raise ValueError("pad_conformers needs at least one ensemble")
    ks = {e.shape[0] for e in ensembles}
    if len(ks) != 1:
        raise ValueError(f"every ensemble must hold the same number of conformers, got {sorted(ks)}")
    nmax = max(e.shape[1] for e in ensembles) if num_atoms is None else int(num_atoms)
    out = torch.zeros(len(ensembles), ks.pop(), nmax, 3)
    for k, e in enumerate(ensembles):
        c = torch.as_tensor(np.asarray(e, dtype=np.float32))
        out[k, :, : c.shape[1]] = c - c.mean(dim=1, keepdim=True)
    return out
