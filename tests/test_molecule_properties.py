"""RDKit property scores and property energies (domains.molecule.properties)."""
import functools
import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("rdkit")

from rdkit import Chem, RDConfig  # noqa: E402
from rdkit.Chem import QED, Crippen, Descriptors, rdMolDescriptors  # noqa: E402

from domains.molecule import properties  # noqa: E402
from domains.molecule.properties import (  # noqa: E402
    ENERGY_RULES,
    PROPERTY_NAMES,
    EnergyTerm,
    PropertyEnergy,
    build_property_energy,
    compute_properties,
    mol_from_smiles,
)
from energyflow.errors import InputError  # noqa: E402

VALID = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1"]
INVALID = ["C1CC", "not a smiles", None, ""]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _sascorer_direct():
    path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
    spec = importlib.util.spec_from_file_location("_test_sascorer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _direct(smiles):
    """The five properties by RDKit called directly."""
    mol = Chem.MolFromSmiles(smiles)
    return {"qed": QED.qed(mol), "logp": Crippen.MolLogP(mol), "sa": _sascorer_direct().calculateScore(mol),
            "tpsa": rdMolDescriptors.CalcTPSA(mol), "mw": Descriptors.MolWt(mol)}


@pytest.fixture(scope="module")
def props():
    return compute_properties(VALID + INVALID)


@pytest.fixture(scope="module")
def direct():
    expected = [_direct(s) for s in VALID]
    return {name: np.array([e[name] for e in expected]) for name in PROPERTY_NAMES}


# --------------------------------------------------------------------------------------- scoring


def test_module_import_is_cheap():
    code = ("import sys, domains.molecule.properties, domains.molecule.denovo_metrics; "
            "print(sorted(m for m in ('rdkit', 'matplotlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mol_from_smiles():
    assert mol_from_smiles("CCO").GetNumAtoms() == 3
    for bad in INVALID + ["   ", 3]:
        assert mol_from_smiles(bad) is None


def test_properties_match_rdkit(props, direct):
    assert set(props) == set(PROPERTY_NAMES)
    for name in PROPERTY_NAMES:
        assert props[name].dtype == np.float64 and props[name].shape == (8,)
        np.testing.assert_allclose(props[name][:4], direct[name], rtol=1e-12, err_msg=name)
        assert np.isnan(props[name][4:]).all(), name
    # hand values: ethanol's molecular weight and TPSA (one hydroxyl, 20.23 Å²)
    assert props["mw"][0] == pytest.approx(2 * 12.011 + 6 * 1.008 + 15.999, abs=1e-3)
    assert props["tpsa"][0] == pytest.approx(20.23)
    assert 0 < props["qed"][0] < 1 and 1 <= props["sa"][0] <= 10


def test_compute_properties_subset_order_and_empty():
    out = compute_properties(["c1ccccc1O", None], names=["mw", "qed"])
    assert list(out) == ["mw", "qed"]
    assert out["mw"][0] == pytest.approx(Descriptors.MolWt(Chem.MolFromSmiles("c1ccccc1O")))
    assert np.isnan(out["qed"][1])
    empty = compute_properties([], names=["qed"])
    assert empty["qed"].shape == (0,) and empty["qed"].dtype == np.float64


def test_compute_properties_bad_input():
    with pytest.raises(InputError, match="'foo'.*qed, logp, sa, tpsa, mw"):
        compute_properties(["CCO"], names=["qed", "foo"])
    with pytest.raises(InputError, match="one string"):
        compute_properties("CCO")
    with pytest.raises(InputError, match="workers"):
        compute_properties(["CCO"], workers=0)


def test_missing_sa_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(properties, "_SASCORER", None)
    monkeypatch.setattr(properties, "sa_score_dir", lambda: str(tmp_path))
    with pytest.raises(InputError, match=str(tmp_path)):
        compute_properties(["CCO"], names=["sa"])
    assert np.isfinite(compute_properties(["CCO"], names=["qed"])["qed"]).all()  # other properties still work


def test_workers_match_serial():
    pool = VALID + INVALID + ["CCN", "CC(C)O", "c1ccncc1", "O=C(O)c1ccccc1", "CCCCCC", "C1CCCCC1N"]
    smiles = [pool[(5 * i) % len(pool)] for i in range(40)]  # 5 and 14 coprime: every entry, shuffled
    serial = compute_properties(smiles, chunk=8, workers=1)
    parallel = compute_properties(smiles, chunk=8, workers=2)
    for name in PROPERTY_NAMES:
        np.testing.assert_array_equal(parallel[name], serial[name])
    # in input order: each row is the score of that SMILES alone
    alone = np.array([compute_properties([smi], names=["mw"])["mw"][0] for smi in smiles])
    np.testing.assert_array_equal(parallel["mw"], alone)
    assert len(set(smiles[:8])) == 8 and np.isnan(parallel["mw"]).sum() == sum(smi in INVALID for smi in smiles) == 11


# -------------------------------------------------------------------------------------- energies


def test_single_energies_default_targets(props, direct):
    expected = {"qed": -direct["qed"], "logp": np.abs(direct["logp"] - 4.0), "sa": direct["sa"],
                "tpsa": np.abs(direct["tpsa"] - 60.0), "mw": np.abs(direct["mw"] - 300.0)}
    invalid = {"qed": 0.0, "logp": 10.0, "sa": 10.0, "tpsa": 100.0, "mw": 300.0}
    for name in PROPERTY_NAMES:
        energy = build_property_energy(name)
        assert energy.properties == (name,)
        e = energy(props)
        assert e.dtype == np.float64 and e.shape == (8,) and not np.isnan(e).any()
        np.testing.assert_allclose(e[:4], expected[name], rtol=1e-12, err_msg=name)
        np.testing.assert_array_equal(e[4:], invalid[name])
        assert ENERGY_RULES[name].invalid_energy == invalid[name]


def test_custom_targets():
    props = {"qed": np.array([0.5, 0.9]), "logp": np.array([1.0, 2.6]), "sa": np.array([2.0, 5.0]),
             "tpsa": np.array([30.0, 41.0]), "mw": np.array([250.0, 180.0])}
    np.testing.assert_allclose(build_property_energy("logp", target=2.0)(props), [1.0, 0.6])
    np.testing.assert_allclose(build_property_energy("tpsa", target=40.0)(props), [10.0, 1.0])
    np.testing.assert_allclose(build_property_energy("mw", target=200.0)(props), [50.0, 20.0])
    np.testing.assert_allclose(build_property_energy("qed", target=0.8)(props), [-0.5, -0.9])  # target only for hits
    np.testing.assert_array_equal(build_property_energy("qed", target=0.8).hits(props), [False, True])
    np.testing.assert_array_equal(build_property_energy("sa", target=4.0).hits(props), [True, False])
    np.testing.assert_array_equal(build_property_energy("logp", target=2.0).hits(props), [False, False])
    np.testing.assert_array_equal(build_property_energy("logp", target=1.2).hits(props), [True, False])
    np.testing.assert_array_equal(build_property_energy("tpsa", target=40.0).hits(props), [True, True])
    np.testing.assert_array_equal(build_property_energy("mw", target=200.0).hits(props), [False, True])
    assert build_property_energy("logp", target=2.0).targets == {"logp": 2.0}


def test_default_hits():
    props = {"qed": np.array([0.7, 0.69, np.nan]), "logp": np.array([4.5, 3.4, np.nan]),
             "sa": np.array([3.0, 3.01, np.nan]), "tpsa": np.array([70.0, 49.0, np.nan]),
             "mw": np.array([275.0, 326.0, np.nan])}
    for name in PROPERTY_NAMES:
        np.testing.assert_array_equal(build_property_energy(name).hits(props), [True, False, False], err_msg=name)


def test_combo_and_mapping_sum(props, direct):
    combo = build_property_energy("combo")
    assert combo.terms == [EnergyTerm("qed", 1.0), EnergyTerm("sa", 0.1)]
    assert combo.targets == {"qed": 0.7, "sa": 3.0}
    assert set(combo.properties) == {"qed", "sa"}
    e = combo(props)
    np.testing.assert_allclose(e[:4], -direct["qed"] + 0.1 * direct["sa"], rtol=1e-12)
    np.testing.assert_allclose(e[4:], 0.0 + 0.1 * 10.0)

    mapping = build_property_energy({"logp": 2.0, "mw": 0.01, "tpsa": -0.5})
    e = mapping(props)
    hand = (2.0 * np.abs(direct["logp"] - 4.0) + 0.01 * np.abs(direct["mw"] - 300.0)
            - 0.5 * np.abs(direct["tpsa"] - 60.0))
    np.testing.assert_allclose(e[:4], hand, rtol=1e-12)
    np.testing.assert_allclose(e[4:], 2.0 * 10.0 + 0.01 * 300.0 - 0.5 * 100.0)


def test_combo_hits_need_every_term():
    props = {"qed": np.array([0.8, 0.8, 0.5, np.nan]), "sa": np.array([2.0, 4.0, 2.0, 2.0])}
    np.testing.assert_array_equal(build_property_energy("combo").hits(props), [True, False, False, False])


def test_describe():
    assert build_property_energy("qed").describe() == "−QED"
    assert build_property_energy("logp").describe() == "|logP − 4|"
    assert build_property_energy("logp", target=-1.5).describe() == "|logP + 1.5|"
    assert build_property_energy("combo").describe() == "−QED + 0.1·SA"
    assert build_property_energy({"sa": 1, "tpsa": 0.5}).describe() == "SA + 0.5·|TPSA − 60|"


def test_from_smiles(direct):
    energy = build_property_energy("combo")
    e, props = energy.from_smiles(VALID + [None])
    assert set(props) == {"qed", "sa"}
    np.testing.assert_allclose(e, np.append(-direct["qed"] + 0.1 * direct["sa"], 1.0), rtol=1e-12)


@pytest.mark.parametrize("spec, target, key", [
    ("foo", None, "foo"),
    ({"qed": 1.0, "bar": 1.0}, None, "bar"),
    ({"qed": float("nan")}, None, "qed"),
    ({"sa": "heavy"}, None, "sa"),
    ({"mw": True}, None, "mw"),
    ({}, None, "empty"),
    ("combo", 1.0, "single-property"),
    ({"logp": 1.0}, 2.0, "single-property"),
    ("logp", float("inf"), "logp"),
    (["qed"], None, "mapping"),
])
def test_bad_specs(spec, target, key):
    with pytest.raises(InputError, match=key) as info:
        build_property_energy(spec, target=target)
    assert "\n" not in str(info.value)


def test_energy_checks_its_input():
    energy = PropertyEnergy([EnergyTerm("qed", 1.0)])
    with pytest.raises(InputError, match="'qed'"):
        energy({"sa": np.zeros(2)})
    combo = build_property_energy("combo")
    with pytest.raises(InputError, match="lengths"):
        combo({"qed": np.zeros(2), "sa": np.zeros(3)})
    assert math.isclose(float(energy({"qed": [0.25]})[0]), -0.25)
