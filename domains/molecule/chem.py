"""Reading, filtering and splitting molecules (RDKit).

Every molecule returned here follows the domain's conventions (see :mod:`domains.molecule`): an
RDKit ``Mol`` with explicit hydrogens, heavy atoms first, then the hydrogens.  Bad entries are
skipped and counted by reason in a :class:`SkipCounts`; they never raise.  RDKit is imported
inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from energyflow.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from rdkit.Chem import Mol

__all__ = ["quiet_rdkit", "nci_default_path", "SkipCounts", "read_molecules", "filter_molecules", "scaffold_split",
           "DEFAULT_ELEMENTS"]

DEFAULT_ELEMENTS = ("C", "N", "O", "F", "S", "Cl", "Br", "H")

_SMILES_SUFFIXES = (".smi", ".smiles", ".txt", ".csv")
_SDF_SUFFIXES = (".sdf", ".sd")
_HEADER_NAMES = {"smiles", "smile", "smi", "canonical_smiles", "isomeric_smiles", "mol", "molecule", "structure"}
_SPLIT = re.compile(r"[\s,]+")


@contextlib.contextmanager
def quiet_rdkit() -> Iterator[None]:
    """Silence RDKit's logger (all ``rdApp.*`` levels) inside the block; the previous state is
    restored on exit, also after an exception.  Blocks nest."""
    from rdkit import rdBase

    with rdBase.BlockLogs():
        yield


def nci_default_path() -> str:
    """The NCI sample shipped with RDKit: ``<RDDataDir>/NCI/first_5K.smi`` (``SMILES<TAB>id``, no header)."""
    from rdkit import RDConfig

    return os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


@dataclass
class SkipCounts:
    """How many molecules were skipped, by reason.

    Reasons: ``unparsable`` (RDKit could not read or sanitise it), ``too_small`` / ``too_large``
    (heavy-atom count), ``element`` (an element outside the allowed set), ``charged`` (non-zero
    net charge), ``radical`` (unpaired electrons), ``fragments`` (more than one fragment, e.g. a
    salt), ``no_mmff_params`` (MMFF94 cannot type it), ``duplicate`` (same canonical SMILES as a
    molecule already kept), ``embedding_failed`` (no 3D conformer could be generated).
    """

    unparsable: int = 0
    too_small: int = 0
    too_large: int = 0
    element: int = 0
    charged: int = 0
    radical: int = 0
    fragments: int = 0
    no_mmff_params: int = 0
    duplicate: int = 0
    embedding_failed: int = 0

    @property
    def total(self) -> int:
        """All skipped molecules."""
        return sum(self.as_dict().values())

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` more molecules skipped for ``reason`` (one of the field names)."""
        if reason not in {f.name for f in fields(self)}:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {[f.name for f in fields(self)]}")
        setattr(self, reason, getattr(self, reason) + n)

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}`` over all reasons (zeros included), for JSON."""
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. ``skipped 5 molecules (unparsable 3, element 2)`` or ``skipped no molecules``."""
        parts = [f"{k} {v}" for k, v in self.as_dict().items() if v]
        if not parts:
            return "skipped no molecules"
        total = self.total
        return f"skipped {total} molecule{'s' if total != 1 else ''} ({', '.join(parts)})"


def _smiles_tokens(path: str) -> Iterator[str]:
    """The first field of every non-blank, non-comment line, a header line left out."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = True
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            token = _SPLIT.split(line, maxsplit=1)[0].strip("\"'")
            if first:
                first = False
                low = token.lower()
                if low in _HEADER_NAMES or "smiles" in low:
                    continue
            if token:
                yield token


def _heavy_first(mol: "Mol") -> "Mol":
    """Renumber so that the heavy atoms come first (in their order), then the hydrogens."""
    from rdkit import Chem

    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() != 1]
    hydrogens = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() == 1]
    order = heavy + hydrogens
    if order == list(range(mol.GetNumAtoms())):
        return mol
    return Chem.RenumberAtoms(mol, order)


def read_molecules(path: str) -> tuple[list["Mol"], list[str], SkipCounts]:
    """Read molecules from a SMILES list or an SD file.

    * ``.smi`` / ``.smiles`` / ``.txt`` / ``.csv``: one molecule a line, the SMILES in the first
      field (fields separated by whitespace, tabs or commas; quotes around it are dropped).  A
      first line whose first field looks like a column name (``smiles``, ``SMILES``,
      ``canonical_smiles``…) is a header and skipped; blank lines and ``#`` comments are ignored.
    * ``.sdf`` / ``.sd``: every record; hydrogens present in the file are kept, the missing ones
      added, and the coordinates dropped (only the graph is used; stereo read from 3D is kept as
      tags).  Atoms are renumbered heavy atoms first (file order), then the hydrogens.

    Returns:
        ``(mols, smiles, skips)``: molecules with explicit hydrogens (``Chem.AddHs``), their
        canonical isomeric SMILES without hydrogens, and the entries skipped
        (``skips.unparsable``).  Invalid entries never raise.

    Raises:
        InputError: the file does not exist or its suffix is none of the above.
    """
    from rdkit import Chem

    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise InputError(f"molecule file not found: {path}")
    if suffix not in _SMILES_SUFFIXES + _SDF_SUFFIXES:
        raise InputError(f"unsupported molecule file {path}: expected a "
                         f"{', '.join(_SMILES_SUFFIXES + _SDF_SUFFIXES)} file")
    mols: list = []
    smiles: list[str] = []
    skips = SkipCounts()
    with quiet_rdkit():
        if suffix in _SDF_SUFFIXES:
            supplier = Chem.SDMolSupplier(path, sanitize=True, removeHs=False)
            for mol in supplier:
                if mol is None or mol.GetNumAtoms() == 0:
                    skips.add("unparsable")
                    continue
                try:
                    mol = Chem.AddHs(mol)
                    mol.RemoveAllConformers()
                    mol = _heavy_first(mol)
                    smi = Chem.MolToSmiles(Chem.RemoveHs(mol))
                except (RuntimeError, ValueError):  # RDKit's sanitisation errors
                    skips.add("unparsable")
                    continue
                mols.append(mol)
                smiles.append(smi)
        else:
            for token in _smiles_tokens(path):
                mol = Chem.MolFromSmiles(token)
                if mol is None or mol.GetNumAtoms() == 0:
                    skips.add("unparsable")
                    continue
                smiles.append(Chem.MolToSmiles(mol))
                mols.append(Chem.AddHs(mol))
    return mols, smiles, skips


def filter_molecules(mols: Sequence["Mol"], smiles: Sequence[str], *, min_heavy: int = 4, max_heavy: int = 20,
                     elements: Sequence[str] = DEFAULT_ELEMENTS, skips: Optional[SkipCounts] = None,
                     require_mmff: bool = True) -> tuple[list["Mol"], list[str], SkipCounts]:
    """Keep the molecules the domain can handle, counting the others by reason.

    A molecule is kept when, checked in this order, it is one fragment (else ``fragments``), has
    zero net charge (else ``charged``; zwitterionic groups such as nitro are fine), no unpaired
    electrons (``radical``), only atoms of ``elements`` (``element``; hydrogen is always
    allowed), ``min_heavy`` to ``max_heavy`` heavy atoms (``too_small`` / ``too_large``), full
    MMFF94 parameters (``no_mmff_params``; checked only with ``require_mmff``, which conformer work
    needs and de novo generation does not) and a canonical SMILES not kept before (``duplicate``).

    Args:
        mols, smiles: as returned by :func:`read_molecules` (same length).
        skips: counts to add to (e.g. the reader's); a new one if None.

    Returns:
        ``(mols, smiles, skips)``: the kept molecules in their input order, and the counts.
    """
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers

    if len(mols) != len(smiles):
        raise ValueError(f"{len(mols)} molecules but {len(smiles)} SMILES")
    skips = SkipCounts() if skips is None else skips
    allowed = set(elements) | {"H"}
    kept_mols: list = []
    kept_smiles: list[str] = []
    seen: set[str] = set()
    with quiet_rdkit():
        for mol, smi in zip(mols, smiles):
            heavy = mol.GetNumHeavyAtoms()
            if len(Chem.GetMolFrags(mol)) > 1:
                reason = "fragments"
            elif Chem.GetFormalCharge(mol) != 0:
                reason = "charged"
            elif any(a.GetNumRadicalElectrons() for a in mol.GetAtoms()):
                reason = "radical"
            elif any(a.GetSymbol() not in allowed for a in mol.GetAtoms()):
                reason = "element"
            elif heavy < min_heavy:
                reason = "too_small"
            elif heavy > max_heavy:
                reason = "too_large"
            elif require_mmff and not rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol):
                reason = "no_mmff_params"
            elif smi in seen:
                reason = "duplicate"
            else:
                seen.add(smi)
                kept_mols.append(mol)
                kept_smiles.append(smi)
                continue
            skips.add(reason)
    return kept_mols, kept_smiles, skips


def _scaffold(smi: str) -> str:
    """The Bemis–Murcko scaffold's canonical SMILES ('' for acyclic molecules; the SMILES itself
    for one RDKit cannot read, so it forms its own group)."""
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    mol = Chem.MolFromSmiles(smi)
    if mol is None:
        return f"unparsable:{smi}"
    return Chem.MolToSmiles(MurckoScaffold.GetScaffoldForMol(mol))


def scaffold_split(smiles: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> dict[str, list[int]]:
    """Split molecules into train / val / test by Bemis–Murcko scaffold.

    The rule:

    1. Molecules are grouped by the canonical SMILES of their Bemis–Murcko scaffold (ring systems
       and the linkers between them); acyclic molecules share the empty scaffold.  Each group goes
       whole into one split, so no scaffold is in two splits.
    2. The targets are ``round(f * n)`` molecules for val and test (``fractions`` are normalised
       to sum to 1); train takes the rest.
    3. The empty-scaffold group (usually large) goes to train.
    4. The other groups, sorted by scaffold and shuffled with ``random.Random(seed)``, are dealt
       in that order: a group goes to val if it fits in val's target, else to test if it fits in
       test's, else to train.  Val and test therefore never exceed their targets (they may fall
       short when only large groups are left), and the result depends only on the SMILES and
       the seed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``: sorted indices into ``smiles``; every
        index appears in exactly one list.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or any(not f >= 0 for f in fractions) or sum(fractions) <= 0:
        raise InputError(f"scaffold split fractions must be three non-negative numbers with a positive sum, "
                         f"got {fractions}")
    total = sum(fractions)
    n = len(smiles)
    targets = {"val": round(fractions[1] / total * n), "test": round(fractions[2] / total * n)}
    groups: dict[str, list[int]] = {}
    with quiet_rdkit():
        for i, smi in enumerate(smiles):
            groups.setdefault(_scaffold(smi), []).append(i)
    split: dict[str, list[int]] = {"train": list(groups.pop("", [])), "val": [], "test": []}
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    for key in keys:
        group = groups[key]
        for name in ("val", "test"):
            if len(split[name]) + len(group) <= targets[name]:
                split[name].extend(group)
                break
        else:
            split["train"].extend(group)
    return {name: sorted(idx) for name, idx in split.items()}
