"""Molecule domain: MMFF94 energies (black box, worker pool, core adapter) and conformer metrics."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rdkit")

import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from domains.molecule import energies as en
from domains.molecule.energies import (
    MMFF_INVALID,
    EnergyPool,
    MMFFEnergy,
    beta_from_temperature,
    mmff_energies,
    temperature_from_beta,
)
from domains.molecule.metrics import (
    bond_graph_survives,
    coverage,
    energy_stats,
    heavy_atom_rmsd_matrix,
    posebusters_checks,
)
from energyflow.errors import InputError

# Note: EmbedMultipleConfs(randomSeed=0) gives K *identical* conformers in RDKit 2026.09; use seed != 0.
_SEED = 7


def _embed(smiles: str, n: int = 4, seed: int = _SEED) -> tuple[Chem.Mol, np.ndarray]:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    ids = list(AllChem.EmbedMultipleConfs(mol, n, randomSeed=seed))
    assert len(ids) == n
    coords = np.stack([mol.GetConformer(i).GetPositions() for i in ids]).astype(np.float32)
    return mol, coords


@pytest.fixture(scope="module")
def ethanol():
    return _embed("CCO")


@pytest.fixture(scope="module")
def butane():
    return _embed("CCCC")


def _rdkit_energy(mol: Chem.Mol, xyz: np.ndarray) -> float:
    m = Chem.Mol(mol)
    m.RemoveAllConformers()
    conf = Chem.Conformer(m.GetNumAtoms())
    for a, p in enumerate(xyz.astype(np.float64)):
        conf.SetAtomPosition(a, p.tolist())
    m.AddConformer(conf, assignId=True)
    props = AllChem.MMFFGetMoleculeProperties(m)
    return AllChem.MMFFGetMoleculeForceField(m, props).CalcEnergy()


def _padded(mols, coords_per_mol, pairs, nmax, fill=np.nan):
    idx = np.array([m for m, _ in pairs])
    x = np.full((len(pairs), nmax, 3), fill, dtype=np.float32)
    na = np.array([mols[m].GetNumAtoms() for m in idx])
    for b, (m, k) in enumerate(pairs):
        x[b, : na[b]] = coords_per_mol[m][k]
    return idx, x, na


# --------------------------------------------------------------------------------------------
# mmff_energies
# --------------------------------------------------------------------------------------------
def test_mmff_energies_match_rdkit(butane):
    mol, x = butane
    e = mmff_energies(mol, x)
    assert e.dtype == np.float64 and e.shape == (4,)
    ref = np.array([_rdkit_energy(mol, xi) for xi in x])
    np.testing.assert_allclose(e, ref, atol=1e-6, rtol=0)
    assert np.ptp(e) > 1e-3  # distinct conformers
    np.testing.assert_allclose(mmff_energies(mol, x[0]), ref[:1], atol=1e-6)  # one [N, 3] conformer


def test_relax_steps_lower_the_energy(butane):
    mol, x = butane
    noisy = x + np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
    raw = mmff_energies(mol, noisy)
    relaxed = mmff_energies(mol, noisy, relax_steps=50)
    assert (relaxed < raw - 1.0).all()  # bond-length noise costs several kcal/mol; relaxation removes it
    assert (mmff_energies(mol, noisy, relax_steps=200) <= relaxed + 1e-6).all()


def test_nonfinite_coordinates_give_the_penalty(ethanol):
    mol, x = ethanol
    bad = x.copy()
    bad[1, 2, 0] = np.nan
    bad[2, 0, 1] = np.inf
    e = mmff_energies(mol, bad)
    assert not np.isnan(e).any()
    assert e[1] == MMFF_INVALID and e[2] == MMFF_INVALID
    np.testing.assert_allclose(e[[0, 3]], mmff_energies(mol, x[[0, 3]]), atol=1e-9)
    assert mmff_energies(mol, bad[1:3], relax_steps=5).tolist() == [MMFF_INVALID, MMFF_INVALID]


def test_mmff_energies_refuse_bad_shapes(ethanol):
    mol, x = ethanol
    with pytest.raises(InputError, match="atoms"):
        mmff_energies(mol, x[:, :5])
    with pytest.raises(InputError, match="relax_steps"):
        mmff_energies(mol, x, relax_steps=-1)


# --------------------------------------------------------------------------------------------
# EnergyPool
# --------------------------------------------------------------------------------------------
def test_pool_in_process_and_workers_agree_with_padding(ethanol, butane):
    mols = [ethanol[0], butane[0]]
    coords = [ethanol[1], butane[1]]
    pairs = [(0, 0), (1, 0), (1, 3), (0, 2), (1, 1), (0, 3)]
    idx, x, na = _padded(mols, coords, pairs, nmax=16, fill=123.0)  # padding must be ignored
    direct = np.array([mmff_energies(mols[m], coords[m][k : k + 1])[0] for m, k in pairs])
    with EnergyPool(mols, workers=1) as p1:
        e1 = p1.energies(idx, x, na)
    with EnergyPool(mols, workers=2, chunk_size=2) as p2:
        e2 = p2.energies(idx, x, na)
    np.testing.assert_allclose(e1, direct, atol=1e-9)
    np.testing.assert_allclose(e2, e1, atol=1e-9)
    _, x_nan, _ = _padded(mols, coords, pairs, nmax=16, fill=np.nan)
    np.testing.assert_allclose(EnergyPool(mols).energies(idx, x_nan, None), direct, atol=1e-9)


def test_pool_cache_skips_recomputation(ethanol, butane, monkeypatch):
    mols = [ethanol[0], butane[0]]
    calls = []
    real = en._MolTable.energies

    def counting(self, index, coords, relax_steps):
        calls.append(coords.shape[0])
        return real(self, index, coords, relax_steps)

    monkeypatch.setattr(en._MolTable, "energies", counting)
    pairs = [(0, 0), (1, 1), (0, 0), (1, 2)]  # one duplicate inside the batch
    idx, x, na = _padded(mols, [ethanol[1], butane[1]], pairs, nmax=14)
    pool = EnergyPool(mols, workers=1)
    first = pool.energies(idx, x, na)
    assert sum(calls) == 3 and first[0] == first[2]
    second = pool.energies(idx, x, na)
    assert sum(calls) == 3  # nothing recomputed
    np.testing.assert_array_equal(first, second)
    assert pool.cache_info()["hits"] == 4 and pool.cache_info()["misses"] == 3
    # relax_steps is part of the key: another pool with relaxation computes its own values
    relaxed = EnergyPool(mols, relax_steps=10).energies(idx, x, na)
    assert (relaxed <= first + 1e-9).all()
    # ... and one pool serves both: a per-call relax_steps computes (and caches) its own values
    n = sum(calls)
    np.testing.assert_allclose(pool.energies(idx, x, na, relax_steps=10), relaxed, atol=1e-9)
    assert sum(calls) == n + 3
    np.testing.assert_array_equal(pool.energies(idx, x, na), first)
    assert sum(calls) == n + 3
    with pytest.raises(InputError, match="relax_steps"):
        pool.energies(idx, x, na, relax_steps=-2)
    # LRU eviction
    small = EnergyPool(mols, cache_size=1)
    small.energies(idx, x, na)
    assert small.cache_info()["size"] == 1


def test_pool_refuses_bad_requests(ethanol, butane):
    mols = [ethanol[0], butane[0]]
    pool = EnergyPool(mols)
    idx, x, na = _padded(mols, [ethanol[1], butane[1]], [(0, 0), (1, 0)], nmax=14)
    with pytest.raises(InputError, match="wrong number of atoms"):
        pool.energies(idx, x, na + 1)
    with pytest.raises(InputError, match="out of range"):
        pool.energies(np.array([0, 2]), x, na)
    with pytest.raises(InputError, match="shape"):
        pool.energies(idx, x[:, :, :2], na)
    with pytest.raises(InputError, match="backend"):
        EnergyPool(mols, backend="threads")


def test_ray_backend_without_ray_is_one_clear_error(ethanol):
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="Ray"):
            EnergyPool([ethanol[0]], backend="ray", workers=2)
    else:  # pragma: no cover
        pytest.skip("ray is installed")


# --------------------------------------------------------------------------------------------
# MMFFEnergy and temperature
# --------------------------------------------------------------------------------------------
def test_mmff_energy_is_relative_and_masked(ethanol, butane):
    mols = [ethanol[0], butane[0]]
    coords = [ethanol[1], butane[1]]
    ref_min = np.array([mmff_energies(m, c).min() for m, c in zip(mols, coords)])
    energy = MMFFEnergy(EnergyPool(mols), ref_min)
    assert energy.differentiable is False and energy.takes_mask is True
    pairs = [(0, 1), (1, 2), (1, 0)]
    idx, x, na = _padded(mols, coords, pairs, nmax=14, fill=0.0)
    mask = torch.as_tensor(np.arange(14)[None] < na[:, None])
    xt = torch.as_tensor(x)
    cond = {"mol_index": torch.as_tensor(idx, dtype=torch.long)}
    out = energy(xt, cond, mask=mask)
    assert out.shape == (3,) and out.dtype == torch.float32
    expected = np.array([mmff_energies(mols[m], coords[m][k : k + 1])[0] for m, k in pairs]) - ref_min[idx]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-3)
    assert (out >= -1e-4).all()  # the reference minimum is the lowest reference energy
    # a mask with the real atoms scattered (order kept) gives the same energies
    perm_x = np.zeros((3, 20, 3), dtype=np.float32)
    perm_m = np.zeros((3, 20), dtype=bool)
    for b in range(3):
        slots = np.sort(np.random.default_rng(b).choice(20, na[b], replace=False))
        perm_x[b, slots] = x[b, : na[b]]
        perm_m[b, slots] = True
    out2 = energy(torch.as_tensor(perm_x), cond, mask=torch.as_tensor(perm_m))
    np.testing.assert_allclose(out2.numpy(), out.numpy(), atol=1e-4)
    # nothing is refused silently
    with pytest.raises(InputError, match="mol_index"):
        energy(xt, {}, mask=mask)
    bad_mask = mask.clone()
    bad_mask[0, 0] = False
    with pytest.raises(InputError, match="wrong number of atoms"):
        energy(xt, cond, mask=bad_mask)
    with pytest.raises(InputError, match="reference_min"):
        MMFFEnergy(EnergyPool(mols), ref_min[:1])


def test_beta_from_temperature():
    beta = beta_from_temperature(298.15)
    assert beta == pytest.approx(1.688, abs=1e-3)
    assert temperature_from_beta(beta) == pytest.approx(298.15)
    with pytest.raises(InputError):
        beta_from_temperature(0.0)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def test_coverage_on_a_hand_built_matrix():
    d = np.array([[0.3, 0.9, 1.2],
                  [0.6, 0.7, 2.0]])
    c = coverage(d, thresholds=(0.5, 0.75))
    # per reference, best generated: 0.3, 0.7, 1.2; per generated, best reference: 0.3, 0.6
    assert c["cov_r@0.5"] == pytest.approx(1 / 3)
    assert c["cov_r@0.75"] == pytest.approx(2 / 3)
    assert c["amr_r"] == pytest.approx((0.3 + 0.7 + 1.2) / 3)
    assert c["cov_p@0.5"] == pytest.approx(0.5)
    assert c["cov_p@0.75"] == pytest.approx(1.0)
    assert c["amr_p"] == pytest.approx(0.45)
    d_inf = np.vstack([d, np.full(3, np.inf)])  # an invalid generated conformer
    c2 = coverage(d_inf)
    assert c2["cov_p@0.75"] == pytest.approx(2 / 3) and c2["cov_r@0.75"] == c["cov_r@0.75"]
    with pytest.raises(InputError):
        coverage(np.zeros((0, 3)))


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_heavy_atom_rmsd_basic_properties(butane):
    mol, x = butane
    d = heavy_atom_rmsd_matrix(mol, x, x)
    assert d.shape == (4, 4)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-4)
    np.testing.assert_allclose(d, d.T, atol=1e-4)
    moved = x[:2] @ _rotation(1).T + np.array([3.0, -2.0, 5.0], dtype=np.float32)
    np.testing.assert_allclose(heavy_atom_rmsd_matrix(mol, moved, x[1:]), d[:2, 1:], atol=1e-4)
    np.testing.assert_allclose(heavy_atom_rmsd_matrix(mol, x[:2], x[1:], max_matches=100), d[:2, 1:], atol=1e-6)
    bad = x[:2].copy()
    bad[0, 0, 0] = np.nan
    dd = heavy_atom_rmsd_matrix(mol, bad, x)
    assert np.isinf(dd[0]).all() and np.isfinite(dd[1]).all()


@pytest.mark.parametrize("smiles,swap", [
    ("CC(=O)[O-]", [(2, 3)]),           # carboxylate oxygens (conjugated terminal group)
    ("Cc1ccccc1", [(2, 6), (3, 5)]),    # toluene ring flip: ortho and meta carbons
    ("CC(C)C", [(0, 2), (2, 3)]),       # isobutane methyls
])
def test_heavy_atom_rmsd_is_symmetry_aware(smiles, swap):
    mol, x = _embed(smiles, n=1)
    y = x[0].copy()
    for i, j in swap:
        y[[i, j]] = y[[j, i]]
    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    naive = np.sqrt(((y[heavy] - x[0][heavy]) ** 2).sum(-1).mean())
    assert naive > 0.3
    assert heavy_atom_rmsd_matrix(mol, y[None], x)[0, 0] < 1e-3


def test_energy_stats():
    s = energy_stats(np.array([0.0, 1.0, 4.0, 6.0, MMFF_INVALID]), within=5.0)
    assert s["frac_within"] == pytest.approx(0.6)
    assert s["median"] == pytest.approx(4.0)
    assert s["mean"] == pytest.approx((11.0 + MMFF_INVALID) / 5)
    assert s["n"] == 5


@pytest.mark.parametrize("smiles", ["CCO", "CCCC", "c1ccccc1", "Cc1ccccc1"])
def test_bond_graph_survives_etkdg(smiles):
    mol, x = _embed(smiles, n=3)
    assert bond_graph_survives(mol, x).all()


def test_bond_graph_breaks_when_a_bond_is_stretched(ethanol):
    mol, x = ethanol
    # stretch C1–O2 to 3 Å, moving the O together with its hydrogen
    y = x.copy()
    o_h = [2] + [n.GetIdx() for n in mol.GetAtomWithIdx(2).GetNeighbors() if n.GetAtomicNum() == 1]
    for k in range(len(y)):
        v = y[k, 2] - y[k, 1]
        shift = v / np.linalg.norm(v) * (3.0 - np.linalg.norm(v))
        y[k, o_h] += shift
    assert np.allclose(np.linalg.norm(y[:, 2] - y[:, 1], axis=-1), 3.0, atol=1e-4)
    got = bond_graph_survives(mol, np.concatenate([x[:1], y, np.full_like(x[:1], np.nan)]))
    assert got.tolist() == [True] + [False] * len(y) + [False]


def test_posebusters_checks_optional(ethanol):
    try:
        import posebusters  # noqa: F401
    except ImportError:
        assert posebusters_checks(*ethanol) is None
    else:  # pragma: no cover
        out = posebusters_checks(*ethanol)
        assert out is not None and 0.0 <= out["all"] <= 1.0
