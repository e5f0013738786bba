"""The molecule domain's featurisation and equivariant network, and the core pieces it stands on
(Kabsch coupling, grouped batches of padded sets)."""
import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("torch_geometric")

from rdkit import Chem  # noqa: E402

from domains.molecule.features import ATOM_FEATURES, ELEMENTS, MAX_HOPS, featurize, pad_conformers, pad_graphs  # noqa: E402
from energyflow.data import GroupedMembersSource  # noqa: E402
from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss  # noqa: E402
from energyflow.paths import CondOTPath  # noqa: E402
from energyflow.priors import CenteredGaussianPrior, center_of_mass_free, kabsch_align  # noqa: E402


def _mol(smiles):
    return Chem.AddHs(Chem.MolFromSmiles(smiles))


def test_featurize_ethanol_and_benzene():
    g = featurize(_mol("CCO"))                      # C0 C1 O2 then 6 H
    assert g.atoms.shape == (9, ATOM_FEATURES)
    c, o, h = ELEMENTS.index("C"), ELEMENTS.index("O"), ELEMENTS.index("H")
    assert g.atoms[0, c] == 1 and g.atoms[2, o] == 1 and g.atoms[3:, h].all()
    assert g.bonds[0, 1] == g.bonds[1, 0] == 1 and g.bonds[1, 2] == 1 and g.bonds[0, 2] == 0
    assert g.hops[0, 2] == 2 and g.hops[0, 0] == 0 and (g.hops == g.hops.T).all()
    # an H on C0 and the H on O2 are four bonds apart: clipped at MAX_HOPS
    h_on_o = [a.GetIdx() for a in _mol("CCO").GetAtomWithIdx(2).GetNeighbors() if a.GetSymbol() == "H"][0]
    assert g.hops[3, h_on_o] == min(4, MAX_HOPS)
    b = featurize(_mol("c1ccccc1"))
    assert b.bonds[0, 1] == 4 and b.atoms[:6, len(ELEMENTS) + 1].all()      # aromatic bonds and atoms


def test_pad_graphs_and_conformers():
    graphs = [featurize(_mol(s)) for s in ("C", "CCO")]
    batch = pad_graphs(graphs)
    assert batch["atoms"].shape == (2, 9, ATOM_FEATURES) and batch["mask"].sum(1).tolist() == [5, 9]
    assert batch["bonds"][0, 5:].abs().sum() == 0
    confs = pad_conformers([torch.randn(3, 5, 3).numpy() + 4.0, torch.randn(3, 9, 3).numpy()])
    assert confs.shape == (2, 3, 9, 3)
    assert torch.allclose(confs[0, :, :5].mean(1), torch.zeros(3, 3), atol=1e-5)
    assert confs[0, :, 5:].abs().sum() == 0
    with pytest.raises(ValueError, match="same number of conformers"):
        pad_conformers([torch.randn(3, 5, 3).numpy(), torch.randn(2, 5, 3).numpy()])


def _random_rotation(gen):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q


def _egnn_inputs(dtype=torch.float64):
    mols = [_mol(s) for s in ("CCO", "OC(=O)c1ccccc1", "CC(C)CCN")]
    cond = pad_graphs([featurize(m) for m in mols])
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    gen = torch.Generator().manual_seed(0)
    x = center_of_mass_free(torch.randn(*cond["mask"].shape, 3, generator=gen, dtype=dtype), cond["mask"])
    t = torch.rand(x.shape[0], generator=gen, dtype=dtype)
    return x, t, cond, gen


def _egnn():
    from domains.molecule.nets import EGNNField

    torch.manual_seed(0)
    net = EGNNField(hidden=32, layers=3).double()
    with torch.no_grad():
        for p in net.parameters():      # non-trivial coordinate heads (they start at zero)
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_egnn_is_equivariant_to_rotation_translation_and_permutation():
    net = _egnn()
    x, t, cond, gen = _egnn_inputs()
    v = net(x, t, cond)
    m = cond["mask"][..., None]
    assert v.abs().max() > 1e-3                                   # the test is not vacuous
    assert (v * (1 - m)).abs().max() == 0                         # zero on padding
    assert torch.allclose((v * m).sum(1), torch.zeros(3, 3, dtype=v.dtype), atol=1e-9)   # zero centre of mass
    rot = _random_rotation(gen)
    shift = torch.randn(1, 1, 3, generator=gen, dtype=x.dtype)
    v_rot = net((x @ rot.T + shift) * m, t, cond)
    assert (v_rot - v @ rot.T).abs().max() < 1e-5
    v_ref = net(x * torch.tensor([-1.0, 1.0, 1.0], dtype=x.dtype), t, cond)          # a reflection
    assert (v_ref - v * torch.tensor([-1.0, 1.0, 1.0], dtype=x.dtype)).abs().max() < 1e-5
    # permute the real atoms of molecule 1 (features, pairs, coordinates)
    n1 = int(cond["mask"][1].sum())
    order = torch.arange(cond["mask"].shape[1])
    order[:n1] = torch.randperm(n1, generator=gen)
    perm = {k: v_.clone() for k, v_ in cond.items()}
    perm["atoms"][1] = cond["atoms"][1][order]
    for key in ("bonds", "hops"):
        perm[key][1] = cond[key][1][order][:, order]
    xp = x.clone()
    xp[1] = x[1][order]
    assert (net(xp, t, perm)[1] - v[1][order]).abs().max() < 1e-5


def test_egnn_padding_does_not_change_a_molecule():
    net = _egnn()
    x, t, cond, _ = _egnn_inputs()
    one = {k: v[:1, :9] if v.dim() == 2 or k == "atoms" else v[:1, :9, :9] for k, v in cond.items()}
    assert (net(x[:1, :9], t[:1], one) - net(x, t, cond)[:1, :9]).abs().max() < 1e-10


def test_egnn_model_file_round_trip(tmp_path):
    from energyflow.models import load_model, save_model_file

    net = _egnn().float()
    file = save_model_file(tmp_path / "egnn.pt", net, path="ot")
    loaded = load_model(file).net
    x, t, cond, _ = _egnn_inputs(torch.float32)
    assert torch.equal(loaded(x, t, cond), net(x, t, cond))


def test_kabsch_align_finds_the_rotation_and_keeps_the_noise_distribution_centred():
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 7)
    mask[2, 5:] = 0
    x1 = center_of_mass_free(torch.randn(4, 7, 3, generator=gen, dtype=torch.float64), mask)
    rots = torch.stack([_random_rotation(gen) for _ in range(4)])
    x0 = (x1 @ rots.transpose(1, 2)) * mask[..., None]         # exact rotated copies
    aligned = kabsch_align(x0, x1, mask)
    assert (aligned - x1).abs().max() < 1e-10
    noise = CenteredGaussianPrior().sample((4, 7, 3), generator=gen, mask=mask)
    a = kabsch_align(noise, x1.float(), mask)
    assert (a[2, 5:] == 0).all() and torch.allclose(a.sum(1), torch.zeros(4, 3), atol=1e-5)
    assert torch.allclose(a.norm(dim=-1), noise.norm(dim=-1), atol=1e-5)          # a rotation: norms kept
    assert ((a - x1).square().sum() <= (noise - x1).square().sum() + 1e-4)         # never farther
    d = torch.linalg.det(torch.linalg.lstsq(noise[0].double(), a[0].double()).solution)
    assert abs(d.item() - 1.0) < 1e-6                                              # proper rotation, no reflection


def test_flow_matching_loss_applies_the_coupling():
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(6, 5)
    x1 = center_of_mass_free(torch.randn(6, 5, 3, generator=gen), mask)
    loss = FlowMatchingLoss(CondOTPath(), prior=CenteredGaussianPrior(), coupling="kabsch")
    batch = loss.prepare({"x1": x1, "mask": mask}, torch.Generator().manual_seed(3))
    free = FlowMatchingLoss(CondOTPath(), prior=CenteredGaussianPrior()).prepare(
        {"x1": x1, "mask": mask}, torch.Generator().manual_seed(3))
    assert torch.allclose(batch["x0"], kabsch_align(free["x0"], x1, mask), atol=1e-6)
    with pytest.raises(ValueError, match="coupling"):
        EnergyWeightedLoss(CondOTPath(), 1.0, coupling="sinkhorn")


def test_grouped_members_source_draws_distinct_members_of_one_item():
    n, k, m = 5, 6, 3
    members = {"x1": torch.arange(n * k, dtype=torch.float32).view(n, k, 1, 1).expand(n, k, 2, 3).clone(),
               "energy": torch.arange(n * k, dtype=torch.float32).view(n, k)}
    items = {"mask": torch.ones(n, 2), "cond": {"mol_index": torch.arange(n), "atoms": torch.randn(n, 2, 4)}}
    src = GroupedMembersSource(items, members, group_size=m)
    batch = src.sample(12, torch.Generator().manual_seed(0))
    assert batch["x1"].shape == (12, 2, 3) and batch["cond"]["atoms"].shape == (12, 2, 4)
    ids = batch["energy"].view(4, m).long()
    owner = batch["cond"]["mol_index"].view(4, m)
    assert (owner == owner[:, :1]).all() and (ids // k == owner).all()            # members of their own item
    assert all(len(set(row.tolist())) == m for row in ids)                         # distinct members
    again = src.sample(12, torch.Generator().manual_seed(0))
    assert torch.equal(again["energy"], batch["energy"])                           # seeded
    with pytest.raises(ValueError, match="group_size"):
        GroupedMembersSource(items, members, group_size=7)


def test_grouped_members_source_resamples_members_by_their_probabilities():
    n, k = 3, 4
    members = {"x1": torch.arange(n * k, dtype=torch.float32).view(n, k, 1)}
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    src = GroupedMembersSource({"id": torch.arange(n)}, members, group_size=4, member_probs=probs)
    batch = src.sample(40000, torch.Generator().manual_seed(0))
    member = batch["x1"].view(-1).long() % k
    owner = batch["id"]
    for i in range(n):
        freq = torch.bincount(member[owner == i], minlength=k).double()
        assert torch.allclose(freq / freq.sum(), probs[i].double(), atol=0.02)
    with pytest.raises(ValueError, match="sum to 1"):
        GroupedMembersSource({"id": torch.arange(n)}, members, 2, member_probs=probs * 2)
