"""Molecule domain data: reading, filtering, scaffold splits and cached reference ensembles."""

import numpy as np
import pytest

pytest.importorskip("rdkit")

from rdkit import Chem, rdBase  # noqa: E402
from rdkit.Chem import rdDistGeom, rdForceFieldHelpers  # noqa: E402

from domains.molecule import chem, ensembles  # noqa: E402
from domains.molecule.chem import (SkipCounts, filter_molecules, nci_default_path, quiet_rdkit,  # noqa: E402
                                   read_molecules, scaffold_split)
from domains.molecule.ensembles import Ensemble, reference_ensemble, reference_ensembles  # noqa: E402
from energyflow.errors import InputError  # noqa: E402


def _mol(smiles: str) -> Chem.Mol:
    return Chem.AddHs(Chem.MolFromSmiles(smiles))


def _shuffled_ethanol() -> Chem.Mol:
    """Ethanol with its hydrogens interleaved among the heavy atoms (an unusual atom order)."""
    mol = _mol("CCO")
    order = [3, 0, 4, 5, 1, 6, 2, 7, 8]
    return Chem.RenumberAtoms(mol, order)


# --------------------------------------------------------------------------------------- reading


def test_quiet_rdkit_restores_the_logger():
    before = rdBase.LogStatus()
    with quiet_rdkit():
        assert "enabled" not in rdBase.LogStatus()
        assert Chem.MolFromSmiles("C1CC") is None  # would log an error
    assert rdBase.LogStatus() == before
    with pytest.raises(KeyError), quiet_rdkit():
        raise KeyError("x")
    assert rdBase.LogStatus() == before


def test_skip_counts():
    skips = SkipCounts()
    assert skips.total == 0 and skips.summary() == "skipped no molecules"
    skips.add("unparsable", 2)
    skips.add("element")
    assert skips.total == 3 and skips.as_dict()["unparsable"] == 2 and skips.as_dict()["duplicate"] == 0
    assert skips.summary() == "skipped 3 molecules (unparsable 2, element 1)"
    with pytest.raises(ValueError):
        skips.add("no_such_reason")


def test_read_smi_counts_invalid_lines(tmp_path):
    path = tmp_path / "mols.smi"
    path.write_text("CCO\tethanol\nnot_a_smiles\t2\nC1CC\t3\n\n# a comment\nc1ccccc1 benzene\nC(C)O 5\n")
    mols, smiles, skips = read_molecules(str(path))
    assert smiles == ["CCO", "c1ccccc1", "CCO"]  # canonical; duplicates are filter_molecules' business
    assert [m.GetNumAtoms() for m in mols] == [9, 12, 9]  # explicit hydrogens
    assert all(a.GetAtomicNum() == 1 for a in mols[0].GetAtoms() if a.GetIdx() >= 3)  # heavy atoms first
    assert skips.unparsable == 2 and skips.total == 2


def test_read_csv_with_header(tmp_path):
    path = tmp_path / "mols.csv"
    path.write_text('SMILES,name\nOCC,ethanol\n"CCCC",butane\nC(,broken\n')
    mols, smiles, skips = read_molecules(str(path))
    assert smiles == ["CCO", "CCCC"]
    assert skips.as_dict() == {**SkipCounts().as_dict(), "unparsable": 1}
    # no header: the first line is a molecule
    path = tmp_path / "plain.txt"
    path.write_text("CCCC 1\nCCO,2\n")
    assert read_molecules(str(path))[1] == ["CCCC", "CCO"]


def test_read_sdf(tmp_path):
    path = tmp_path / "mols.sdf"
    with_h = _shuffled_ethanol()
    rdDistGeom.EmbedMolecule(with_h, randomSeed=1)
    writer = Chem.SDWriter(str(path))
    writer.write(with_h)
    writer.write(Chem.MolFromSmiles("c1ccccc1O"))  # no hydrogens in the file
    writer.close()
    bad = Chem.MolToMolBlock(Chem.MolFromSmiles("CC(C)(C)C")).splitlines()
    bad[5] = bad[5].replace(" C ", " N ")  # the centre becomes a four-bonded neutral N: not sanitisable
    with open(path, "a") as f:
        f.write("\n".join(bad) + "\n$$$$\n")
    mols, smiles, skips = read_molecules(str(path))
    assert smiles == ["CCO", "Oc1ccccc1"]
    assert skips.unparsable == 1
    ethanol, phenol = mols
    assert ethanol.GetNumAtoms() == 9 and phenol.GetNumAtoms() == 13
    assert all(m.GetNumConformers() == 0 for m in mols)  # only the graph is kept
    for m in mols:  # heavy atoms first, then the hydrogens
        numbers = [a.GetAtomicNum() for a in m.GetAtoms()]
        assert numbers == sorted(numbers, key=lambda z: z == 1)


def test_read_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.smi")
    with pytest.raises(InputError, match="nope.smi") as err:
        read_molecules(missing)
    assert "\n" not in str(err.value)
    odd = tmp_path / "mols.xyz"
    odd.write_text("CCO\n")
    with pytest.raises(InputError, match="mols.xyz"):
        read_molecules(str(odd))


def test_filter_counts_reasons():
    raw = ["CCCCO", "OCCCC", "CCO", "C" * 25, "[Na+].[Cl-]", "CC(=O)[O-]", "CCCC[Si](C)(C)C", "[CH2]CCCC",
           "FS(F)(F)(F)(F)F", "O=[N+]([O-])c1ccccc1"]
    mols = [_mol(s) for s in raw]
    smiles = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in raw]
    previous = SkipCounts(unparsable=2)
    kept, kept_smiles, skips = filter_molecules(mols, smiles, skips=previous)
    assert skips is previous
    assert kept_smiles == ["CCCCO", "O=[N+]([O-])c1ccccc1"]  # nitro: formal charges but neutral overall
    assert kept[0] is mols[0]
    expected = dict(unparsable=2, duplicate=1, too_small=1, too_large=1, fragments=1, charged=1, element=1,
                    radical=1, no_mmff_params=1)
    assert {k: v for k, v in skips.as_dict().items() if v} == expected
    # the bounds are inclusive; hydrogen is always allowed
    _, kept_smiles, _ = filter_molecules(mols[:3], smiles[:3], min_heavy=3, max_heavy=5, elements=("C", "O"))
    assert kept_smiles == ["CCCCO", "CCO"]


# --------------------------------------------------------------------------------------- splits


@pytest.fixture(scope="module")
def nci_smiles():
    _, smiles, _ = read_molecules(nci_default_path())
    return smiles[:400]


def test_scaffold_split(nci_smiles):
    smiles = nci_smiles + ["CCCCO", "CCN", "CC(C)CC(=O)O"]  # acyclic: the empty scaffold
    n = len(smiles)
    split = scaffold_split(smiles, seed=0)
    everything = split["train"] + split["val"] + split["test"]
    assert sorted(everything) == list(range(n))  # complete and disjoint
    assert all(idx == sorted(idx) for idx in split.values())
    assert 0 < len(split["val"]) <= round(0.1 * n) and 0 < len(split["test"]) <= round(0.1 * n)
    scaffolds = [chem._scaffold(s) for s in smiles]
    where = {}
    for name, idx in split.items():
        for i in idx:
            where.setdefault(scaffolds[i], set()).add(name)
    assert all(len(names) == 1 for names in where.values())  # whole scaffold groups
    assert where[""] == {"train"}
    assert scaffold_split(smiles, seed=0) == split  # deterministic
    assert scaffold_split(smiles, seed=1)["val"] != split["val"]
    with pytest.raises(InputError):
        scaffold_split(smiles, fractions=(0.8, -0.1, 0.3))


# --------------------------------------------------------------------------------------- ensembles


def _energy(mol: Chem.Mol, coords: np.ndarray) -> float:
    """MMFF94 energy of ``coords`` recomputed from scratch on a fresh conformer."""
    m = Chem.Mol(mol)
    m.RemoveAllConformers()
    conf = Chem.Conformer(m.GetNumAtoms())
    for i, xyz in enumerate(coords.astype(np.float64)):
        conf.SetAtomPosition(i, xyz.tolist())
    m.AddConformer(conf, assignId=True)
    ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(m, rdForceFieldHelpers.MMFFGetMoleculeProperties(m))
    return ff.CalcEnergy()


def _bond_lengths(mol: Chem.Mol, coords: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        pair = "".join(sorted(mol.GetAtomWithIdx(k).GetSymbol() for k in (i, j)))
        out.setdefault(pair, []).append(np.linalg.norm(coords[:, i] - coords[:, j], axis=-1))
    return {k: np.concatenate(v) for k, v in out.items()}


def test_reference_ensemble_is_deterministic_and_consistent():
    mol = _mol("CCCCC")
    a = reference_ensemble(mol, num_confs=6, seed=0)
    b = reference_ensemble(mol, num_confs=6, seed=0)
    assert isinstance(a, Ensemble) and mol.GetNumConformers() == 0  # the input is not modified
    assert a.coords.dtype == np.float32 and a.energies.dtype == np.float64
    assert a.coords.shape == (6, 17, 3) and a.energies.shape == (6,)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.energies, b.energies)
    for x, e in zip(a.coords, a.energies):
        assert abs(_energy(mol, x) - e) < 1e-3
    assert a.min_energy == a.energies.min() and a.relative_energies().min() == 0.0
    assert np.ptp(a.energies) > 0.1  # distinct conformers (RDKit's randomSeed=0 alone would give copies)
    c = reference_ensemble(mol, num_confs=6, seed=1)
    assert not np.array_equal(a.coords, c.coords)


def test_reference_ensemble_keeps_the_atom_order():
    mol = _shuffled_ethanol()
    ens = reference_ensemble(mol, num_confs=3, seed=0)
    lengths = _bond_lengths(mol, ens.coords)
    assert set(lengths) == {"CC", "CO", "CH", "HO"}
    assert np.all(np.abs(lengths["CC"] - 1.51) < 0.05) and np.all(np.abs(lengths["CO"] - 1.42) < 0.05)
    assert np.all(np.abs(lengths["CH"] - 1.09) < 0.03) and np.all(np.abs(lengths["HO"] - 0.97) < 0.03)
    for x, e in zip(ens.coords, ens.energies):
        assert abs(_energy(mol, x) - e) < 1e-3
    with pytest.raises(InputError, match="hydrogens"):
        reference_ensemble(Chem.MolFromSmiles("CCO"))


def test_reference_ensembles_cache(tmp_path, monkeypatch):
    mols = [_mol("CCCC"), _shuffled_ethanol(), _mol("FS(F)(F)(F)(F)F")]
    calls = []
    original = ensembles.reference_ensemble

    def counting(mol, **kwargs):
        calls.append(Chem.MolToSmiles(mol))
        return original(mol, **kwargs)

    monkeypatch.setattr(ensembles, "reference_ensemble", counting)
    first, skips = reference_ensembles(mols, num_confs=4, cache_dir=str(tmp_path))
    assert len(calls) == 2 and first[2] is None and skips.no_mmff_params == 1 and skips.total == 1
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 2
    for ens, mol in zip(first[:2], mols[:2]):
        assert ens.coords.shape == (4, mol.GetNumAtoms(), 3)
        np.testing.assert_array_equal(ens.coords, original(mol, num_confs=4).coords)

    calls.clear()
    again, _ = reference_ensembles(mols, num_confs=4, cache_dir=str(tmp_path))
    assert calls == []  # all read from the cache
    for a, b in zip(again[:2], first[:2]):
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.energies, b.energies)

    reference_ensembles(mols, num_confs=3, cache_dir=str(tmp_path))  # another setting: a miss
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npz"))) == 4

    # the same molecule in another atom order is another cache entry
    assert ensembles._cache_key(_mol("CCO"), 4, 0, 2000) != ensembles._cache_key(mols[1], 4, 0, 2000)

    calls.clear()
    files[0].write_bytes(b"PK\x03\x04 not really a zip file")  # corrupt: recomputed, then rewritten
    healed, _ = reference_ensembles(mols, num_confs=4, cache_dir=str(tmp_path))
    assert len(calls) == 1
    for a, b in zip(healed[:2], first[:2]):
        np.testing.assert_array_equal(a.coords, b.coords)
    calls.clear()
    reference_ensembles(mols, num_confs=4, cache_dir=str(tmp_path))
    assert calls == []


def test_reference_ensembles_workers_match_in_process():
    mols = [_mol("CCCC"), _shuffled_ethanol(), _mol("c1ccccc1")]
    serial, skips1 = reference_ensembles(mols, num_confs=4, workers=1)
    parallel, skips2 = reference_ensembles(mols, num_confs=4, workers=2)
    assert skips1.total == skips2.total == 0
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.energies, b.energies)
