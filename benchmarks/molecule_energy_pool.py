"""Worker scaling of the MMFF94 energy pool: the same conformers scored with 1 and with N workers.

    python benchmarks/molecule_energy_pool.py                 # 1 vs 2 workers, relaxed energies
    python benchmarks/molecule_energy_pool.py --workers 4 --relax-steps 0

The conformers are ETKDG embeddings of NCI molecules (RDKit's bundled set, offline), perturbed by
0.1 Å so that every conformer is new to the pool's cache.  Each configuration is timed
``--repeats`` times on a fresh pool (the pool's start-up is timed separately); the script prints
the median seconds and the ratio against 1 worker, measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def conformers(num_molecules: int, per_molecule: int, seed: int = 0):
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom

    from domains.molecule.chem import filter_molecules, nci_default_path, quiet_rdkit, read_molecules

    with quiet_rdkit():
        mols, smiles, _ = read_molecules(nci_default_path())
        mols, smiles, _ = filter_molecules(mols, smiles, min_heavy=8, max_heavy=14)
    rng = np.random.default_rng(seed)
    chosen, coords = [], []
    for mol in mols:
        m = Chem.Mol(mol)
        params = rdDistGeom.ETKDGv3()
        params.randomSeed = 7
        if len(rdDistGeom.EmbedMultipleConfs(m, per_molecule, params)) == per_molecule:
            chosen.append(mol)
            coords.append(np.stack([c.GetPositions() for c in m.GetConformers()]))
        if len(chosen) == num_molecules:
            break
    nmax = max(c.shape[1] for c in coords)
    flat = np.zeros((num_molecules * per_molecule, nmax, 3))
    for j, c in enumerate(coords):
        flat[j * per_molecule:(j + 1) * per_molecule, : c.shape[1]] = c + rng.normal(0, 0.1, c.shape)
    mol_index = np.repeat(np.arange(num_molecules), per_molecule)
    num_atoms = np.array([chosen[i].GetNumAtoms() for i in mol_index])
    return chosen, flat, mol_index, num_atoms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="the pool size compared with 1 worker (default 2)")
    parser.add_argument("--molecules", type=int, default=24)
    parser.add_argument("--per-molecule", type=int, default=32)
    parser.add_argument("--relax-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from domains.molecule.energies import EnergyPool

    mols, flat, mol_index, num_atoms = conformers(args.molecules, args.per_molecule)
    print(f"{len(flat)} conformers of {len(mols)} NCI molecules, relax_steps={args.relax_steps}")
    results = {}
    for workers in (1, args.workers):
        times, starts = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with EnergyPool(mols, workers=workers, relax_steps=args.relax_steps) as pool:
                pool.energies(mol_index[:1], flat[:1], num_atoms[:1])        # start the workers
                t1 = time.perf_counter()
                energies = pool.energies(mol_index, flat, num_atoms)
                t2 = time.perf_counter()
            starts.append(t1 - t0)
            times.append(t2 - t1)
        results[workers] = (statistics.median(times), statistics.median(starts), energies)
    base = results[1][0]
    assert np.allclose(results[1][2], results[args.workers][2]), "the pools disagree"
    for workers, (seconds, start, _) in results.items():
        print(f"workers={workers}: {seconds:.2f} s for the batch (median of {args.repeats}; start-up {start:.2f} s), "
              f"{1e3 * seconds / len(flat):.2f} ms per conformer, speed-up {base / seconds:.2f}x vs 1 worker")


if __name__ == "__main__":
    main()
