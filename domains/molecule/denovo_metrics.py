"""Evaluating generated molecules: validity, uniqueness, novelty, diversity, property figures.

* :func:`generation_metrics`: the usual de novo numbers of a list of generated SMILES.
* :func:`property_summary`: mean, std and quantiles of property arrays (from
  :func:`domains.molecule.properties.compute_properties`).
* :func:`plot_property_histograms` and :func:`draw_grid`: figures, written atomically.

RDKit and matplotlib are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from energyflow.errors import InputError

from .chem import quiet_rdkit
from .properties import ENERGY_RULES, mol_from_smiles

if TYPE_CHECKING:  # pragma: no cover
    from rdkit.Chem import Mol

__all__ = ["canonical", "internal_diversity", "generation_metrics", "property_summary", "plot_property_histograms",
           "draw_grid"]

_FP_RADIUS = 2
_FP_BITS = 2048
_GRID_SUFFIXES = (".png", ".svg")


def canonical(smiles: str | None) -> str | None:
    """RDKit's canonical (isomeric) SMILES, or None when ``smiles`` is None, empty or invalid."""
    mol = mol_from_smiles(smiles)
    if mol is None:
        return None
    from rdkit import Chem

    return Chem.MolToSmiles(mol)


def _mean_pairwise_tanimoto(mols: Sequence[Mol]) -> float:
    """Mean Tanimoto similarity over the ``n(n−1)/2`` distinct pairs of Morgan fingerprints
    (radius 2, 2048 bits); needs ``n >= 2``."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=_FP_RADIUS, fpSize=_FP_BITS)
    fps = [generator.GetFingerprint(mol) for mol in mols]
    total = 0.0
    for i in range(1, len(fps)):
        total += float(np.sum(DataStructs.BulkTanimotoSimilarity(fps[i], fps[:i])))
    pairs = len(fps) * (len(fps) - 1) / 2
    return total / pairs


def internal_diversity(smiles: Sequence[str | None], max_molecules: int = 2000) -> float:
    """``1 −`` mean pairwise Tanimoto similarity of Morgan fingerprints (radius 2, 2048 bits).

    Args:
        smiles: molecules; invalid entries are skipped, duplicates are kept (two copies of a
            molecule are a pair of similarity 1).
        max_molecules: only the first ``max_molecules`` valid ones are used (cost is quadratic).

    Returns:
        A value in [0, 1]; NaN with fewer than 2 valid molecules.
    """
    if int(max_molecules) < 2:
        raise InputError(f"internal diversity needs max_molecules >= 2, got {max_molecules}")
    mols = []
    for smi in smiles:
        mol = mol_from_smiles(smi)
        if mol is not None:
            mols.append(mol)
            if len(mols) >= max_molecules:
                break
    return _diversity(mols)


def _diversity(mols: Sequence[Mol]) -> float:
    """``1 −`` mean pairwise Tanimoto of ``mols``; NaN with fewer than 2."""
    if len(mols) < 2:
        return math.nan
    with quiet_rdkit():
        return 1.0 - _mean_pairwise_tanimoto(mols)


def generation_metrics(smiles: Sequence[str | None], training: Collection[str] | None = None,
                       max_diversity: int = 2000) -> dict[str, float]:
    """The standard de novo generation metrics of ``N`` generated SMILES.

    Args:
        smiles: the generated molecules; None and invalid entries count as invalid.
        training: canonical SMILES (as from :func:`canonical`) of the training set, for novelty;
            None to leave novelty out.
        max_diversity: internal diversity uses the first ``max_diversity`` unique valid
            molecules (in order of first appearance).

    Returns:
        ``num_samples`` (N) and ``num_valid`` (ints), ``validity`` (valid / N: entries that sanitise to a
        non-empty molecule; 0.0 when N = 0), ``uniqueness`` (distinct canonical SMILES / valid;
        0.0 with none valid), ``novelty`` (fraction of the distinct valid molecules not in
        ``training``; 0.0 with none valid; only when ``training`` is given),
        ``internal_diversity`` (see :func:`internal_diversity`, over the distinct valid ones; NaN
        with fewer than 2) and ``mean_heavy_atoms`` (over the valid entries; NaN with none).
    """
    if isinstance(smiles, str):
        raise InputError("generation_metrics expects a sequence of SMILES, got one string; wrap it in a list")
    if int(max_diversity) < 2:
        raise InputError(f"generation_metrics needs max_diversity >= 2, got {max_diversity}")
    from rdkit import Chem

    unique: dict[str, Mol] = {}
    heavy: list[int] = []
    with quiet_rdkit():
        for smi in smiles:
            mol = mol_from_smiles(smi)
            if mol is None:
                continue
            heavy.append(mol.GetNumHeavyAtoms())
            unique.setdefault(Chem.MolToSmiles(mol), mol)
    n, valid = len(smiles), len(heavy)
    metrics: dict[str, float] = {
        "num_samples": n,
        "num_valid": valid,
        "validity": valid / n if n else 0.0,
        "uniqueness": len(unique) / valid if valid else 0.0,
    }
    if training is not None:
        novel = sum(1 for key in unique if key not in training)
        metrics["novelty"] = novel / len(unique) if unique else 0.0
    metrics["internal_diversity"] = _diversity(list(unique.values())[:int(max_diversity)])
    metrics["mean_heavy_atoms"] = float(np.mean(heavy)) if heavy else math.nan
    return metrics


def property_summary(props: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Statistics of each property over its finite values.

    Args:
        props: ``{name: [N]}`` (NaN for invalid molecules).

    Returns:
        ``{name: {"mean", "std" (population, ddof 0), "q10", "q50", "q90", "n"}}``; ``n`` is the
        number of finite values and the other statistics are NaN when it is 0.
    """
    summary: dict[str, dict[str, float]] = {}
    for name, values in props.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            stats = dict.fromkeys(("mean", "std", "q10", "q50", "q90"), math.nan)
        else:
            q10, q50, q90 = np.quantile(finite, [0.1, 0.5, 0.9])
            stats = {"mean": float(finite.mean()), "std": float(finite.std()), "q10": float(q10), "q50": float(q50),
                     "q90": float(q90)}
        stats["n"] = float(finite.size)
        summary[name] = stats
    return summary


def _axis_label(name: str) -> str:
    """``TPSA (Å²)`` for a known property, the name itself otherwise."""
    rule = ENERGY_RULES.get(name)
    if rule is None:
        return name
    return f"{rule.label} ({rule.unit})" if rule.unit else rule.label


def _finite(groups: Mapping[str, Mapping[str, np.ndarray]], group: str, name: str) -> np.ndarray:
    """The finite values of property ``name`` in ``group`` (``float64``, 1-D)."""
    if name not in groups[group]:
        raise InputError(f"property histograms: group {group!r} has no property {name!r}; "
                         f"it has {sorted(groups[group])}")
    values = np.asarray(groups[group][name], dtype=np.float64).reshape(-1)
    return values[np.isfinite(values)]


def plot_property_histograms(groups: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str], path: str,
                             targets: Mapping[str, float] | None = None, bins: int = 40) -> str:
    """One panel per property, with an overlaid step histogram per group.

    Histograms are densities (groups of different sizes compare), over bin edges shared by all
    groups of a panel; NaN values are left out.  A dashed vertical line marks a property's target.

    Args:
        groups: ``{label: {name: [N_label]}}``, e.g. ``"training set"``, ``"unguided"``, ``"EFM β=4"``.
        names: the properties to plot, in panel order; every group must have them.
        path: the figure file (format from the suffix, default PNG), written atomically.
        targets: ``{name: value}`` of target lines (property units).
        bins: bins per panel.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from energyflow.files import save_figure

    names = [names] if isinstance(names, str) else list(names)
    if not groups or not names:
        raise InputError("plot_property_histograms needs at least one group and one property name")
    targets = dict(targets or {})
    fig = Figure(figsize=(3.6 * len(names), 3.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        data = {label: _finite(groups, label, name) for label in groups}
        pooled = np.concatenate(list(data.values()))
        if pooled.size:
            edges = np.histogram_bin_edges(pooled, bins=int(bins))
            for label, values in data.items():
                if values.size:
                    ax.hist(values, bins=edges, histtype="step", density=True, linewidth=1.4, label=str(label))
        else:
            ax.text(0.5, 0.5, "no valid values", ha="center", va="center", transform=ax.transAxes)
        if targets.get(name) is not None:
            ax.axvline(float(targets[name]), color="k", linestyle="--", linewidth=1.0, label="target")
        ax.set_xlabel(_axis_label(name))
        ax.set_ylabel("density")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    return os.fspath(path)


def draw_grid(smiles: Sequence[str | None], path: str, legends: Sequence[str] | None = None, per_row: int = 6,
              size: int = 200) -> str:
    """Depict the valid molecules in a grid (invalid entries are skipped with their legends).

    Args:
        smiles: molecules to draw.
        path: ``.png`` (a PIL image) or ``.svg`` (SVG text), written atomically.
        legends: one caption per entry of ``smiles`` (e.g. its energy), or None.
        per_row: molecules per row.
        size: width and height of each cell, pixels.

    Returns:
        ``path``.

    Raises:
        InputError: another suffix, ``legends`` of the wrong length, or no valid molecule.
    """
    from rdkit.Chem import Draw

    from energyflow.files import atomic_open

    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in _GRID_SUFFIXES:
        raise InputError(f"draw_grid writes {' or '.join(_GRID_SUFFIXES)} files, got {path}")
    if legends is not None and len(legends) != len(smiles):
        raise InputError(f"draw_grid: {len(legends)} legends for {len(smiles)} molecules")
    mols, captions = [], []
    for k, smi in enumerate(smiles):
        mol = mol_from_smiles(smi)
        if mol is not None:
            mols.append(mol)
            captions.append("" if legends is None else str(legends[k]))
    if not mols:
        raise InputError(f"draw_grid: none of the {len(smiles)} molecules is valid, nothing to draw in {path}")
    with quiet_rdkit():
        image = Draw.MolsToGridImage(mols, molsPerRow=max(1, int(per_row)), subImgSize=(int(size), int(size)),
                                     legends=captions, useSVG=suffix == ".svg")
    if suffix == ".svg":
        with atomic_open(path, "w") as f:
            f.write(getattr(image, "data", image))  # a str, or IPython's SVG object in a notebook
    else:
        with atomic_open(path, "wb") as f:
            if isinstance(image, (bytes, bytearray)):
                f.write(image)
            elif hasattr(image, "save"):
                image.save(f, format="PNG")
            else:  # IPython's Image object
                f.write(image.data)
    return os.fspath(path)
