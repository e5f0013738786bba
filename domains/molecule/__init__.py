"""Molecule domain: conformer generation tilted by RDKit force-field energies.

Conventions shared by every module of the domain (RDKit and torch-geometric are imported lazily,
inside functions, so ``import domains.molecule`` stays cheap):

* A molecule is an RDKit ``Mol`` **with explicit hydrogens** (``Chem.AddHs``).  Its atom order is
  RDKit's: heavy atoms in SMILES order, then the hydrogens.  Every array of coordinates follows it.
* A conformer is ``float32`` coordinates ``[N, 3]`` in ångström over *all* N atoms (hydrogens
  included: the MMFF94 energy needs them).  An ensemble of K conformers is ``[K, N, 3]``.
* Energies are MMFF94 energies in kcal/mol (``float64``).  The domain's energy is *relative*: the
  absolute MMFF energy minus the molecule's lowest reference-ensemble energy.
* Batches for the core are padded sets: ``x1`` ``[B, Nmax, 3]`` (centred over the real atoms),
  ``mask`` ``[B, Nmax]``, and a dict ``cond`` with the molecular graph (see ``features``).
* Bad molecules (unparsable, unsupported elements, no MMFF parameters, embedding failures) are
  skipped and *counted* by reason; they never stop a run.
"""
