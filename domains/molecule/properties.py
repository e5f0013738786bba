"""RDKit property scores of molecules and the property energies that steer de novo generation.

No property predictor is trained: every property is computed by RDKit from the SMILES, so the
energies are exact (and only defined on valid molecules).

* :data:`PROPERTY_NAMES`: ``qed`` (drug-likeness, 0–1, higher is better), ``logp`` (Crippen
  logP), ``sa`` (synthetic accessibility, 1 easy – 10 hard, RDKit Contrib model), ``tpsa``
  (topological polar surface area, Å²) and ``mw`` (molecular weight, Da).
* :func:`compute_properties` scores a list of SMILES: one ``float64`` array ``[N]`` per
  property, NaN where a SMILES is missing or invalid.
* :func:`build_property_energy` turns a spec (``"qed"``, ``"combo"``, ``{"qed": 1, "sa": 0.1}``)
  into a :class:`PropertyEnergy`: lower energy = preferred molecule, never NaN (an invalid
  molecule gets the documented energy of :data:`ENERGY_RULES`).

RDKit is imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from energyflow.errors import InputError

from .chem import quiet_rdkit

if TYPE_CHECKING:  # pragma: no cover
    from rdkit.Chem import Mol

__all__ = ["PROPERTY_NAMES", "ENERGY_RULES", "COMBO", "EnergyRule", "EnergyTerm", "PropertyEnergy", "mol_from_smiles",
           "compute_properties", "build_property_energy", "sa_score_dir"]

PROPERTY_NAMES = ("qed", "logp", "sa", "tpsa", "mw")

#: the ``"combo"`` spec: −QED + 0.1·SA (drug-like and easy to make)
COMBO: dict[str, float] = {"qed": 1.0, "sa": 0.1}

_SASCORER: ModuleType | None = None  # RDKit Contrib's sascorer, loaded once by _sascorer()


# ------------------------------------------------------------------------------------- scoring


def sa_score_dir() -> str:
    """The folder of RDKit's Contrib SA-score model: ``<RDContribDir>/SA_Score``."""
    from rdkit import RDConfig

    return os.path.join(RDConfig.RDContribDir, "SA_Score")


def _sascorer() -> ModuleType:
    """RDKit Contrib's ``sascorer`` module, imported once from :func:`sa_score_dir`.

    Raises:
        InputError: ``sascorer.py`` is not in that folder (an RDKit build without Contrib).
    """
    global _SASCORER
    if _SASCORER is None:
        path = os.path.join(sa_score_dir(), "sascorer.py")
        if not os.path.isfile(path):
            raise InputError(f"the SA score needs RDKit's Contrib model, but {path} does not exist; "
                             f"install an RDKit build with Contrib (e.g. the rdkit wheel) or leave 'sa' out")
        spec = importlib.util.spec_from_file_location("_energyflow_sascorer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SASCORER = module
    return _SASCORER


def _scorers(names: Sequence[str]) -> list[Callable[[Mol], float]]:
    """One RDKit scoring function per name (the SA model is loaded here, so a missing model raises
    before any molecule is scored)."""
    from rdkit.Chem import QED, Crippen, Descriptors, rdMolDescriptors

    table: dict[str, Callable[[Mol], float]] = {
        "qed": QED.qed,
        "logp": Crippen.MolLogP,
        "tpsa": rdMolDescriptors.CalcTPSA,
        "mw": Descriptors.MolWt,
    }
    if "sa" in names:
        table["sa"] = _sascorer().calculateScore
    return [table[name] for name in names]


def mol_from_smiles(smiles: str | None) -> Mol | None:
    """Parse and sanitise one SMILES (hydrogens implicit), silently.

    Returns:
        The RDKit ``Mol``, or None for None, ``""``, a non-string, an unparsable or unsanitisable
        SMILES, or one with zero atoms.  Never raises.
    """
    if not isinstance(smiles, str) or not smiles.strip():
        return None
    from rdkit import Chem

    with quiet_rdkit():
        try:
            mol = Chem.MolFromSmiles(smiles)
        except (RuntimeError, ValueError, TypeError):
            return None
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


def _score(mol: Mol, scorer: Callable[[Mol], float]) -> float:
    """One property of one molecule; NaN when RDKit fails on it or returns nothing finite."""
    try:
        value = scorer(mol)
    except (RuntimeError, ValueError, TypeError, ArithmeticError):  # RDKit's errors on odd molecules
        return math.nan
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _score_chunk(smiles: list[str | None], names: tuple[str, ...]) -> np.ndarray:
    """Score one chunk (top-level, so spawned worker processes can run it).

    Returns:
        ``float64`` ``[len(smiles), len(names)]``; a row of NaN for an invalid SMILES.
    """
    scorers = _scorers(names)
    out = np.full((len(smiles), len(names)), np.nan, dtype=np.float64)
    with quiet_rdkit():
        for i, smi in enumerate(smiles):
            mol = mol_from_smiles(smi)
            if mol is not None:
                out[i] = [_score(mol, scorer) for scorer in scorers]
    return out


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    """The property names as a tuple, each checked against :data:`PROPERTY_NAMES`."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    for name in names:
        if name not in PROPERTY_NAMES:
            raise InputError(f"unknown molecular property {name!r}; expected one of {', '.join(PROPERTY_NAMES)}")
    return names


def _score_all(smiles: list[str | None], names: tuple[str, ...], workers: int, chunk: int) -> np.ndarray:
    """Score every SMILES, in chunks of ``chunk``, over ``workers`` spawned processes when > 1.

    Returns:
        ``float64`` ``[N, len(names)]`` in input order.
    """
    chunks = [smiles[i:i + chunk] for i in range(0, len(smiles), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        parts = [_score_chunk(part, names) for part in chunks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _scorers(names)  # a missing SA model raises here, once, with its clear message
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
            parts = list(pool.map(_score_chunk, chunks, [names] * len(chunks)))  # in task order
    if not parts:
        return np.zeros((0, len(names)), dtype=np.float64)
    return np.concatenate(parts, axis=0)


def compute_properties(smiles: Sequence[str | None], names: Sequence[str] = PROPERTY_NAMES, workers: int = 1,
                       chunk: int = 256) -> dict[str, np.ndarray]:
    """RDKit properties of molecules given as SMILES.

    Args:
        smiles: ``N`` SMILES; None, ``""`` and invalid entries are allowed.
        names: properties among :data:`PROPERTY_NAMES`: ``qed`` (0–1), ``logp``, ``sa`` (1–10),
            ``tpsa`` (Å²), ``mw`` (Da).
        workers: processes; above 1, chunks are scored in a spawned ``ProcessPoolExecutor``
            (results identical to ``workers=1`` and in input order).
        chunk: SMILES per task.

    Returns:
        ``{name: float64 [N]}`` for each name, NaN where the SMILES is None or invalid (or RDKit
        cannot score that property for it).

    Raises:
        InputError: an unknown property name, ``workers`` or ``chunk`` below 1, ``smiles`` given
            as one string, or ``sa`` requested without RDKit's Contrib SA model.
    """
    names = _check_names(names)
    if isinstance(smiles, str):
        raise InputError("compute_properties expects a sequence of SMILES, got one string; wrap it in a list")
    if int(workers) < 1 or int(chunk) < 1:
        raise InputError(f"compute_properties needs workers >= 1 and chunk >= 1, got workers={workers}, chunk={chunk}")
    table = _score_all(list(smiles), names, int(workers), int(chunk))
    return {name: np.ascontiguousarray(table[:, k]) for k, name in enumerate(names)}


# ------------------------------------------------------------------------------------ energies


@dataclass(frozen=True)
class EnergyRule:
    """How one property becomes an energy (lower = preferred) and a hit.

    Attributes:
        name: the property name (see :data:`PROPERTY_NAMES`).
        label: its symbol in formulas (``QED``, ``logP``…).
        mode: ``"maximise"`` (energy −x, hit x ≥ target), ``"minimise"`` (energy x, hit
            x ≤ target) or ``"match"`` (energy |x − target|, hit |x − target| ≤ ``tolerance``).
        default_target: the target when none is given (in the property's unit).
        tolerance: the half-width of a hit for ``"match"`` (property unit); None otherwise.
        invalid_energy: the energy of an invalid molecule (NaN property).
        unit: the property's unit, ``""`` when dimensionless.
    """

    name: str
    label: str
    mode: str
    default_target: float
    tolerance: float | None
    invalid_energy: float
    unit: str = ""

    def energy(self, values: np.ndarray, target: float) -> np.ndarray:
        """Energies ``float64 [N]`` of property values ``[N]``; ``invalid_energy`` where NaN."""
        values = np.asarray(values, dtype=np.float64)
        if self.mode == "maximise":
            energy = -values
        elif self.mode == "minimise":
            energy = values.copy()
        else:
            energy = np.abs(values - target)
        return np.where(np.isfinite(values), energy, self.invalid_energy)

    def hit(self, values: np.ndarray, target: float) -> np.ndarray:
        """Whether each value ``[N]`` meets the target (``bool [N]``; False where NaN)."""
        values = np.asarray(values, dtype=np.float64)
        if self.mode == "maximise":
            return values >= target
        if self.mode == "minimise":
            return values <= target
        return np.abs(values - target) <= self.tolerance

    def formula(self, target: float) -> tuple[float, str]:
        """``(sign, body)`` of the energy: ``(-1, "QED")``, ``(1, "SA")``, ``(1, "|logP − 4|")``."""
        if self.mode == "maximise":
            return -1.0, self.label
        if self.mode == "minimise":
            return 1.0, self.label
        op = "−" if target >= 0 else "+"
        return 1.0, f"|{self.label} {op} {_number(abs(target))}|"


#: one rule per property: its energy, default target, hit criterion and energy when invalid
ENERGY_RULES: dict[str, EnergyRule] = {
    "qed": EnergyRule("qed", "QED", "maximise", 0.7, None, 0.0),  # 0.0 = a QED of 0, the worst possible
    "logp": EnergyRule("logp", "logP", "match", 4.0, 0.5, 10.0),
    "sa": EnergyRule("sa", "SA", "minimise", 3.0, None, 10.0),  # 10 = the worst SA score
    "tpsa": EnergyRule("tpsa", "TPSA", "match", 60.0, 10.0, 100.0, "Å²"),
    "mw": EnergyRule("mw", "MW", "match", 300.0, 25.0, 300.0, "Da"),
}


def _number(x: float) -> str:
    """A number as in a formula: ``4`` not ``4.0``, ``0.1``."""
    return f"{x:g}"


@dataclass(frozen=True)
class EnergyTerm:
    """One weighted single-property energy of a :class:`PropertyEnergy`.

    Attributes:
        name: a property name of :data:`PROPERTY_NAMES`.
        weight: its finite weight in the sum.
    """

    name: str
    weight: float


def _check_weight(key: str, weight: object) -> float:
    """A finite real weight, else :class:`InputError` naming ``key``."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise InputError(f"property energy weight for {key!r} must be a finite number, got {weight!r}")
    return float(weight)


def _check_target(name: str, target: object) -> float:
    """A finite real target, else :class:`InputError` naming the property."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(float(target)):
        raise InputError(f"property energy target for {name!r} must be a finite number, got {target!r}")
    return float(target)


class PropertyEnergy:
    """A weighted sum of single-property energies: ``E = Σ_k w_k · e_k(property_k)``.

    Each ``e_k`` follows :data:`ENERGY_RULES` with the target of :attr:`targets`; an invalid
    molecule (NaN property) gets the rule's ``invalid_energy`` for that term, so the energy is
    never NaN.

    Attributes:
        terms: the :class:`EnergyTerm` list, in spec order.
        targets: ``{name: target}`` for every term (property units).
        properties: the property names needed, in term order.
    """

    def __init__(self, terms: Sequence[EnergyTerm], targets: Mapping[str, float] | None = None) -> None:
        if not terms:
            raise InputError("a property energy needs at least one term")
        targets = dict(targets or {})
        for term in terms:
            if term.name not in ENERGY_RULES:
                raise InputError(f"unknown property {term.name!r} in the energy; expected one of "
                                 f"{', '.join(PROPERTY_NAMES)}")
            _check_weight(term.name, term.weight)
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise InputError(f"a property energy names each property once, got {names}")
        for name in targets:
            if name not in names:
                raise InputError(f"target given for {name!r}, which is not a term of the energy {names}")
        self.terms: list[EnergyTerm] = list(terms)
        self.targets: dict[str, float] = {
            name: _check_target(name, targets.get(name, ENERGY_RULES[name].default_target)) for name in names}
        self.properties: tuple[str, ...] = tuple(names)

    def _values(self, props: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The needed properties as ``float64 [N]`` arrays of one common length."""
        values: dict[str, np.ndarray] = {}
        for name in self.properties:
            if name not in props:
                raise InputError(f"property energy {self.describe()} needs property {name!r}; got {sorted(props)}")
            values[name] = np.asarray(props[name], dtype=np.float64).reshape(-1)
        lengths = {name: len(v) for name, v in values.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"property arrays have different lengths: {lengths}")
        return values

    def __call__(self, props: Mapping[str, np.ndarray]) -> np.ndarray:
        """Energies of ``N`` molecules.

        Args:
            props: ``{name: float64 [N]}`` as from :func:`compute_properties` (NaN = invalid).

        Returns:
            ``float64 [N]``, never NaN.
        """
        values = self._values(props)
        n = len(next(iter(values.values())))
        total = np.zeros(n, dtype=np.float64)
        for term in self.terms:
            total += term.weight * ENERGY_RULES[term.name].energy(values[term.name], self.targets[term.name])
        return total

    def hits(self, props: Mapping[str, np.ndarray]) -> np.ndarray:
        """Whether each molecule meets every term's target (``bool [N]``; False when invalid)."""
        values = self._values(props)
        n = len(next(iter(values.values())))
        ok = np.ones(n, dtype=bool)
        for term in self.terms:
            ok &= ENERGY_RULES[term.name].hit(values[term.name], self.targets[term.name])
        return ok

    def from_smiles(self, smiles: Sequence[str | None], workers: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Score SMILES and return ``(energies float64 [N], {name: float64 [N]})``."""
        props = compute_properties(smiles, self.properties, workers=workers)
        return self(props), props

    def describe(self) -> str:
        """The energy as a formula, e.g. ``−QED``, ``|logP − 4|`` or ``−QED + 0.1·SA``."""
        text = ""
        for k, term in enumerate(self.terms):
            sign, body = ENERGY_RULES[term.name].formula(self.targets[term.name])
            coef = sign * term.weight
            size = "" if abs(coef) == 1.0 else f"{_number(abs(coef))}·"
            if k == 0:
                text = f"{'−' if coef < 0 else ''}{size}{body}"
            else:
                text += f" {'−' if coef < 0 else '+'} {size}{body}"
        return text

    def __repr__(self) -> str:
        return f"PropertyEnergy({self.describe()!r}, targets={self.targets})"


def _spec_weights(spec: str | Mapping[str, float]) -> tuple[dict[str, float], bool]:
    """``({name: weight}, single)`` of a spec; ``single`` when it names one property by string."""
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "combo":
            return dict(COMBO), False
        if key in ENERGY_RULES:
            return {key: 1.0}, True
        raise InputError(f"unknown property energy {spec!r}; expected one of {', '.join(PROPERTY_NAMES)}, combo "
                         f"or a mapping {{property: weight}}")
    if not isinstance(spec, Mapping):
        raise InputError(f"a property energy spec is a name or a mapping {{property: weight}}, got {spec!r}")
    if not spec:
        raise InputError("the property energy mapping is empty; give at least one {property: weight}")
    weights: dict[str, float] = {}
    for key, weight in spec.items():
        if key not in ENERGY_RULES:
            raise InputError(f"unknown property {key!r} in the energy spec; "
                             f"expected one of {', '.join(PROPERTY_NAMES)}")
        weights[key] = _check_weight(key, weight)
    return weights, False


def build_property_energy(spec: str | Mapping[str, float], target: float | None = None) -> PropertyEnergy:
    """Build a :class:`PropertyEnergy` from a spec.

    Args:
        spec: ``"qed"``, ``"logp"``, ``"sa"``, ``"tpsa"``, ``"mw"``, ``"combo"`` (−QED + 0.1·SA),
            or a mapping ``{property: weight}``: the weighted sum of those single-property
            energies, each with its default target (see :data:`ENERGY_RULES`).
        target: the target of a single-property spec (property units); None for its default.

    Raises:
        InputError: an unknown name, an empty mapping, a weight that is not a finite number, or a
            ``target`` with ``combo`` or a mapping.
    """
    weights, single = _spec_weights(spec)
    targets: dict[str, float] = {}
    if target is not None:
        if not single:
            raise InputError(f"a target applies only to a single-property energy, not to {spec!r}")
        name = next(iter(weights))
        targets[name] = _check_target(name, target)
    return PropertyEnergy([EnergyTerm(name, weight) for name, weight in weights.items()], targets)
