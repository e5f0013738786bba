"""The SELFIES codec (domains.molecule.selfies_codec) and the sequence velocity field (sequence_nets)."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("selfies")

from domains.molecule.selfies_codec import NOP, SelfiesCodec
from domains.molecule.sequence_nets import SequenceField

MOLECULES = [
    "c1ccccc1",                      # aromatic ring
    "O=[N+]([O-])c1ccccc1",          # charged nitro
    "C[C@H](N)C(=O)O",               # stereocentre
    "C/C=C/C",                       # double-bond stereo
    "Clc1ccc(Br)cc1F",               # halogens
    "C1CCC2CCCCC2C1",                # fused aliphatic rings
    "c1ccc2[nH]ccc2c1",              # aromatic NH, fused
    "CC(=O)Oc1ccccc1C(=O)O",         # aspirin
    "NS(=O)(=O)c1ccc(I)cc1",         # sulfonamide, iodine
    "C[C@@H]1CC[C@H](O)CC1",         # ring stereo
    "[NH3+]CC(=O)[O-]",              # zwitterion
    "OC1=CC=CC=C1",                  # kekulé input of phenol
]


def _canonical(smiles: str) -> str:
    from rdkit import Chem

    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))


@pytest.fixture(scope="module")
def codec() -> SelfiesCodec:
    codec, kept, skips = SelfiesCodec.fit(MOLECULES, max_len=32)
    assert kept == list(range(len(MOLECULES))) and skips.total == 0
    return codec


def test_round_trip_gives_the_canonical_smiles(codec):
    tokens, kept, skips = codec.encode(MOLECULES)
    assert kept == list(range(len(MOLECULES))) and skips.total == 0
    assert tokens.shape == (len(MOLECULES), 32) and tokens.dtype == torch.long
    x = codec.to_continuous(tokens)
    assert x.shape == (len(MOLECULES), *codec.event_shape) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(codec.from_continuous(x), tokens)
    assert codec.decode(x) == [_canonical(s) for s in MOLECULES]
    # the stereo and the charges survive
    decoded = codec.decode(x)
    assert "[C@H]" in decoded[2] and "/" in decoded[3] and "[N+]" in decoded[1] and "[O-]" in decoded[1]


def test_vocabulary_is_sorted_deterministic_and_padded_with_nop(codec):
    vocab = codec.vocab
    assert vocab[0] == NOP and vocab[1:] == sorted(vocab[1:]) and len(set(vocab)) == len(vocab) == len(codec)
    again, _, _ = SelfiesCodec.fit(list(reversed(MOLECULES)), max_len=32)
    assert again == codec
    tokens, _, _ = codec.encode(["C"])  # one token, then padding
    assert tokens[0, 0] != 0 and (tokens[0, 1:] == 0).all()
    codec.vocab.append("[X]")  # a copy: the codec is unchanged
    assert len(codec.vocab) == len(codec)


def test_fit_and_encode_skip_and_count_bad_molecules(codec):
    long_chain = "C" * 40
    smiles = ["CCO", "not a smiles", long_chain, "c1ccccc1P", None, "O=[N+]([O-])c1ccccc1"]
    tokens, kept, skips = codec.encode(smiles)
    assert kept == [0, 5] and tokens.shape == (2, 32)
    assert (skips.unparsable, skips.too_long, skips.unknown_token, skips.unencodable) == (2, 1, 1, 0)
    assert skips.total == 4 and "unknown_token 1" in skips.summary()
    assert codec.decode_tokens(tokens) == ["CCO", "O=[N+]([O-])c1ccccc1"]

    fitted, kept, skips = SelfiesCodec.fit(smiles, max_len=32)
    assert kept == [0, 3, 5] and (skips.unparsable, skips.too_long) == (2, 1)  # P is learnt, not unknown
    assert "[P]" in fitted.vocab


def test_unencodable_molecules_are_counted():
    # RDKit accepts trivalent iodine; SELFIES' default constraints allow iodine one bond
    _, kept, skips = SelfiesCodec.fit(["CCO", "FI(F)F"], max_len=16)
    assert kept == [0] and skips.unencodable == 1


def test_decode_tokens_never_raises_on_random_indices(codec):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(codec), (200, codec.max_len), generator=gen)
    out = codec.decode_tokens(tokens)
    assert len(out) == 200 and all(s is None or isinstance(s, str) for s in out)
    assert sum(s is not None for s in out) > 150  # SELFIES: almost everything decodes
    assert codec.decode_tokens(torch.zeros(3, codec.max_len, dtype=torch.long)) == [None, None, None]
    with pytest.raises(ValueError):
        codec.decode_tokens(torch.full((1, 4), len(codec)))


def test_decode_tokens_turns_decoder_failures_into_none():
    # a hand-made vocabulary: "[Xyz]" makes selfies.decoder raise, "[Branch1]" alone decodes to ""
    codec = SelfiesCodec([NOP, "[C]", "[Xyz]", "[Branch1]", "[O]"], max_len=4)
    tokens = torch.tensor([[1, 4, 0, 0], [1, 2, 0, 0], [3, 0, 0, 0], [0, 1, 0, 1]])
    assert codec.decode_tokens(tokens) == ["CO", None, None, "CC"]


def test_from_continuous_recovers_tokens_from_noisy_arrays(codec):
    tokens, _, _ = codec.encode(MOLECULES)
    gen = torch.Generator().manual_seed(1)
    x = codec.to_continuous(tokens)
    noisy = x + 0.3 * torch.randn(x.shape, generator=gen)
    assert torch.equal(codec.from_continuous(noisy), tokens)
    assert codec.decode(noisy) == [_canonical(s) for s in MOLECULES]


def test_scale_is_applied():
    codec, _, _ = SelfiesCodec.fit(MOLECULES, max_len=32, scale=2.5)
    tokens, _, _ = codec.encode(MOLECULES[:2])
    x = codec.to_continuous(tokens)
    assert set(x.unique().tolist()) == {-2.5, 2.5}
    assert ((x > 0).sum(-1) == 1).all()
    back = SelfiesCodec.from_dict(json.loads(json.dumps(codec.to_dict())))
    assert back.scale == 2.5 and torch.equal(back.to_continuous(tokens), x)


def test_dict_and_pickle_round_trips(codec):
    data = json.loads(json.dumps(codec.to_dict()))
    back = SelfiesCodec.from_dict(data)
    assert back == codec and hash(back) == hash(codec)
    assert (back.vocab, back.max_len, back.scale, back.event_shape) == (codec.vocab, 32, 1.0, codec.event_shape)
    assert torch.equal(back.encode(MOLECULES)[0], codec.encode(MOLECULES)[0])
    assert pickle.loads(pickle.dumps(codec)) == codec
    assert SelfiesCodec.from_dict({**data, "scale": 2.0}) != codec
    with pytest.raises(ValueError):
        SelfiesCodec.from_dict({**data, "format": "something else"})
    with pytest.raises(ValueError):
        SelfiesCodec.from_dict({**data, "vocab": data["vocab"][1:]})  # no [nop] first


def _field() -> SequenceField:
    torch.manual_seed(0)
    return SequenceField(vocab_size=11, max_len=12, hidden=32, layers=2, heads=4, ff=64, time_dim=16)


def test_sequence_field_shape_and_zero_output_at_init():
    net = _field()
    x, t = torch.randn(5, 12, 11), torch.rand(5)
    out = net(x, t)
    assert out.shape == (5, 12, 11)
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError):
        net(torch.randn(5, 13, 11), t)


def test_sequence_field_learns_after_one_step():
    net = _field()
    x, t = torch.randn(8, 12, 11), torch.rand(8)
    target = torch.randn(8, 12, 11)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = (net(x, t) - target).square().mean()
    loss.backward()
    assert net.out.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    out = net(x, t)
    assert out.abs().sum() > 0
    (out - target).square().mean().backward()
    # with the output layer non-zero, gradients reach the input projection, positions and time MLP
    for p in (net.inp.weight, net.pos, net.time_mlp[0].weight, net.encoder.layers[0].self_attn.in_proj_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_sequence_field_depends_on_time_and_position():
    net = _field()
    with torch.no_grad():
        net.out.weight.normal_()
    x = torch.randn(1, 12, 11).expand(2, -1, -1)
    out = net(x, torch.tensor([0.1, 0.9]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    same = torch.randn(1, 1, 11).expand(1, 12, 11)
    v = net(same, torch.tensor([0.5]))
    assert (v[0, 0] - v[0, 1]).abs().max() > 1e-4  # the position embedding tells positions apart
    shared = net(torch.randn(3, 12, 11), torch.full((3,), 0.3))  # one time for the batch
    assert shared.shape == (3, 12, 11)


def test_sequence_field_model_file_round_trip(tmp_path):
    from energyflow.models import load_model, save_model_file

    net = _field()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    file = save_model_file(tmp_path / "seq.pt", net, path="ot")
    saved = load_model(file)
    assert type(saved.net) is SequenceField and saved.sample_shape == (12, 11)
    x, t = torch.randn(4, 12, 11), torch.rand(4)
    net.eval()
    assert torch.equal(saved.net(x, t), net(x, t))


def test_sequence_field_x1_output_lies_on_the_simplex():
    from domains.molecule.sequence_nets import SequenceField

    torch.manual_seed(0)
    net = SequenceField(7, 5, hidden=16, layers=1, heads=2, ff=16, output="x1", scale=1.5)
    with torch.no_grad():
        net.out.weight.normal_()
        y = net(torch.randn(3, 5, 7), torch.rand(3))
    p = (y / 1.5 + 1) / 2
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(3, 5), atol=1e-5)
    with pytest.raises(ValueError, match="output"):
        SequenceField(7, 5, output="logits")
