"""SELFIES token sequences as fixed-size continuous arrays, for flow matching on molecules.

A molecule becomes its SELFIES string (Krenn et al., 2020) split into tokens, padded to ``L``
tokens with ``"[nop]"`` (which the SELFIES decoder ignores), each token replaced by its index in
a vocabulary of ``V`` tokens (``"[nop]"`` is index 0).  The continuous relaxation of the indices
``[N, L]`` is ``x = scale · (2 · onehot − 1)`` ``[N, L, V]`` (every entry ``±scale``), the target
of a flow from Gaussian noise.  A sample of any real values decodes by argmax over the last
dimension, tokens, SELFIES string and RDKit canonical SMILES; since every SELFIES string decodes
to a valid molecule, almost every sample does.

SMILES are canonicalised on the way in and on the way out with RDKit's default
``Chem.MolToSmiles(Chem.MolFromSmiles(s))`` (aromatic, isomeric: stereocentres, double-bond
stereo, charges and isotopes are kept).  The aromatic form is encoded rather than a kekulised one:
SELFIES kekulises internally, both round-trip exactly, and the aromatic input gives equal or
shorter token sequences.  So ``decode(to_continuous(encode([s])[0]))`` is the canonical SMILES of
``s``.

RDKit and ``selfies`` are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from energyflow.errors import InputError

from .chem import SkipCounts, quiet_rdkit

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["SelfiesCodec", "SelfiesSkipCounts", "NOP", "CODEC_FORMAT"]

NOP = "[nop]"
CODEC_FORMAT = "energyflow-selfies-codec/1"


@dataclass
class SelfiesSkipCounts(SkipCounts):
    """:class:`~domains.molecule.chem.SkipCounts` with the reasons of the SELFIES codec.

    Besides ``unparsable`` (RDKit cannot read the SMILES): ``unencodable`` (``selfies.encoder``
    raises or returns None, e.g. a valence beyond SELFIES' constraints), ``too_long`` (more than
    ``max_len`` tokens) and ``unknown_token`` (a token outside the codec's vocabulary).
    """

    unencodable: int = 0
    too_long: int = 0
    unknown_token: int = 0


def _canonical(smiles: Any) -> Optional[str]:
    """RDKit's canonical (aromatic, isomeric) SMILES of ``smiles``; None if it cannot be parsed
    or has no atoms.  Call inside :func:`quiet_rdkit`."""
    from rdkit import Chem

    if not isinstance(smiles, str) or not smiles.strip():
        return None
    mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    try:
        return Chem.MolToSmiles(mol)
    except (RuntimeError, ValueError):
        return None


def _tokenise(smiles: Any) -> tuple[Optional[str], list[str]]:
    """``(skip reason or None, SELFIES tokens)`` of one SMILES, canonicalised first."""
    import selfies

    canonical = _canonical(smiles)
    if canonical is None:
        return "unparsable", []
    try:
        encoded = selfies.encoder(canonical)
    except Exception:  # selfies.EncoderError, or anything the encoder trips on
        return "unencodable", []
    if not encoded:
        return "unencodable", []
    return None, list(selfies.split_selfies(encoded))


class SelfiesCodec:
    """SMILES ↔ token indices ``[N, L]`` ↔ continuous arrays ``[N, L, V]`` (module docstring).

    Immutable once built; picklable; :meth:`to_dict` / :meth:`from_dict` store it as plain JSON
    data (e.g. in a model file's ``meta``).  Two codecs are equal when their vocabularies, lengths
    and scales are.

    Args:
        vocab: the ``V`` SELFIES tokens, ``"[nop]"`` first (index 0, the padding), no duplicates.
        max_len: ``L``, the number of tokens of every sequence.
        scale: the magnitude of the continuous values (``x ∈ {−scale, +scale}``).
    """

    def __init__(self, vocab: Sequence[str], max_len: int, scale: float = 1.0):
        vocab = tuple(vocab)
        if not vocab or vocab[0] != NOP:
            raise InputError(f"a SELFIES vocabulary must start with {NOP!r} (the padding, index 0); "
                             f"got {list(vocab[:3])!r}")
        if not all(isinstance(tok, str) and tok for tok in vocab):
            raise InputError("a SELFIES vocabulary must hold non-empty strings")
        if len(set(vocab)) != len(vocab):
            raise InputError("a SELFIES vocabulary must not repeat tokens")
        if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1:
            raise InputError(f"max_len must be a positive integer, got {max_len!r}")
        if isinstance(scale, bool) or not math.isfinite(float(scale)) or float(scale) <= 0:
            raise InputError(f"scale must be a positive finite number, got {scale!r}")
        self._vocab: tuple[str, ...] = vocab
        self._index: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self._max_len = int(max_len)
        self._scale = float(scale)

    # ------------------------------------------------------------------ construction and storage
    @classmethod
    def fit(cls, smiles: Sequence[str], max_len: int = 48, scale: float = 1.0
            ) -> tuple["SelfiesCodec", list[int], SelfiesSkipCounts]:
        """Build the vocabulary from the SELFIES encodings of ``smiles``.

        The vocabulary is ``"[nop]"`` followed by the sorted tokens of the kept molecules, so it
        depends only on the set of kept molecules, not on their order.

        Args:
            smiles: N SMILES (canonicalised before encoding).
            max_len: ``L``; a molecule of more tokens is skipped (``too_long``).
            scale: see the class.

        Returns:
            ``(codec, kept, skips)``: the codec, the indices into ``smiles`` of the kept molecules
            (increasing) and the skipped ones by reason (``unparsable``, ``unencodable``,
            ``too_long``).

        Raises:
            InputError: a bad ``max_len`` / ``scale``, or no molecule could be kept.
        """
        probe = cls([NOP], max_len, scale)  # validates max_len and scale before the work
        skips = SelfiesSkipCounts()
        kept: list[int] = []
        tokens: set[str] = set()
        with quiet_rdkit():
            for i, smi in enumerate(smiles):
                reason, toks = _tokenise(smi)
                if reason is None and len(toks) > probe.max_len:
                    reason = "too_long"
                if reason is not None:
                    skips.add(reason)
                    continue
                kept.append(i)
                tokens.update(toks)
        if not kept:
            raise InputError(f"no molecule could be encoded as SELFIES of at most {probe.max_len} tokens: "
                             f"{skips.summary()}")
        tokens.discard(NOP)
        return cls([NOP, *sorted(tokens)], probe.max_len, probe.scale), kept, skips

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``{"format", "vocab", "max_len", "scale"}``."""
        return {"format": CODEC_FORMAT, "vocab": list(self._vocab), "max_len": self._max_len, "scale": self._scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SelfiesCodec":
        """The codec stored by :meth:`to_dict`.

        Raises:
            InputError: ``data`` is not such a dict (wrong format tag, missing or bad entries).
        """
        if not isinstance(data, Mapping) or data.get("format") != CODEC_FORMAT:
            have = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise InputError(f"not a stored SELFIES codec (format {have!r}; expected {CODEC_FORMAT!r})")
        missing = [k for k in ("vocab", "max_len", "scale") if k not in data]
        if missing:
            raise InputError(f"stored SELFIES codec lacks {missing}")
        if not isinstance(data["vocab"], (list, tuple)):
            raise InputError("stored SELFIES codec: 'vocab' must be a list of tokens")
        return cls(data["vocab"], data["max_len"], data["scale"])

    # ------------------------------------------------------------------ properties
    @property
    def vocab(self) -> list[str]:
        """The ``V`` tokens, index order (a copy)."""
        return list(self._vocab)

    @property
    def max_len(self) -> int:
        """``L``, the tokens per sequence."""
        return self._max_len

    @property
    def scale(self) -> float:
        """The magnitude of the continuous values."""
        return self._scale

    @property
    def event_shape(self) -> tuple[int, int]:
        """``(L, V)``: the shape of one continuous sample."""
        return (self._max_len, len(self._vocab))

    def __len__(self) -> int:
        return len(self._vocab)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SelfiesCodec):
            return NotImplemented
        return (self._vocab, self._max_len, self._scale) == (other._vocab, other._max_len, other._scale)

    def __hash__(self) -> int:
        return hash((self._vocab, self._max_len, self._scale))

    def __repr__(self) -> str:
        return f"SelfiesCodec(V={len(self._vocab)}, max_len={self._max_len}, scale={self._scale:g})"

    # ------------------------------------------------------------------ SMILES → tokens → arrays
    def encode(self, smiles: Sequence[str]) -> tuple["Tensor", list[int], SelfiesSkipCounts]:
        """Token indices of the SMILES this codec can represent.

        Args:
            smiles: N SMILES (canonicalised before encoding).

        Returns:
            ``(tokens, kept, skips)``: a LongTensor ``[N_kept, L]`` padded with 0 (``"[nop]"``),
            the indices into ``smiles`` of its rows, and the skipped molecules by reason
            (``unparsable``, ``unencodable``, ``too_long``, ``unknown_token``).
        """
        import torch

        skips = SelfiesSkipCounts()
        kept: list[int] = []
        rows: list[list[int]] = []
        index, length = self._index, self._max_len
        with quiet_rdkit():
            for i, smi in enumerate(smiles):
                reason, toks = _tokenise(smi)
                if reason is None and len(toks) > length:
                    reason = "too_long"
                if reason is None and any(tok not in index for tok in toks):
                    reason = "unknown_token"
                if reason is not None:
                    skips.add(reason)
                    continue
                kept.append(i)
                rows.append([index[tok] for tok in toks] + [0] * (length - len(toks)))
        tokens = torch.tensor(rows, dtype=torch.long) if rows else torch.zeros(0, length, dtype=torch.long)
        return tokens, kept, skips

    def to_continuous(self, tokens: "Tensor") -> "Tensor":
        """``scale · (2 · onehot(tokens) − 1)``.

        Args:
            tokens: LongTensor ``[N, L]`` of indices in ``[0, V)``.

        Returns:
            float32 ``[N, L, V]`` on ``tokens``' device, every entry ``±scale``.
        """
        import torch

        tokens = self._check_tokens(tokens)
        onehot = torch.nn.functional.one_hot(tokens, len(self._vocab)).to(torch.float32)
        return onehot.mul_(2.0 * self._scale).sub_(self._scale)

    # ------------------------------------------------------------------ arrays → tokens → SMILES
    def from_continuous(self, x: "Tensor") -> "Tensor":
        """The token of each position: argmax over the last dimension.

        Args:
            x: real values ``[N, L, V]`` (a flow's samples, or :meth:`to_continuous`'s output).

        Returns:
            LongTensor ``[N, L]`` on ``x``' device.
        """
        if x.dim() != 3 or x.shape[-1] != len(self._vocab):
            raise InputError(f"expected continuous SELFIES of shape [N, L, {len(self._vocab)}], "
                             f"got {list(x.shape)}")
        return x.argmax(dim=-1)

    def decode_tokens(self, tokens: "Tensor") -> list[Optional[str]]:
        """Canonical SMILES of token sequences; never raises for indices in ``[0, V)``.

        ``"[nop]"`` anywhere in a sequence is ignored.  A sequence whose SELFIES decoder raises,
        or that decodes to an empty molecule or one RDKit cannot sanitise, gives None.

        Args:
            tokens: LongTensor ``[N, L]`` (any length ``L``) of indices in ``[0, V)``.

        Returns:
            N canonical SMILES or None.
        """
        import selfies

        rows = self._check_tokens(tokens).tolist()
        vocab = self._vocab
        out: list[Optional[str]] = []
        with quiet_rdkit():
            for row in rows:
                string = "".join(vocab[i] for i in row if i)
                try:
                    decoded = selfies.decoder(string) if string else ""
                except Exception:  # selfies.DecoderError, or anything the decoder trips on
                    decoded = None
                out.append(_canonical(decoded))
        return out

    def decode(self, x: "Tensor") -> list[Optional[str]]:
        """:meth:`decode_tokens` of :meth:`from_continuous`: ``[N, L, V]`` → N SMILES or None."""
        return self.decode_tokens(self.from_continuous(x))

    def _check_tokens(self, tokens: "Tensor") -> "Tensor":
        import torch

        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"expected token indices of shape [N, L], got {shape}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InputError(f"token indices must be integers, got {tokens.dtype}")
        tokens = tokens.long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= len(self._vocab)):
            raise InputError(f"token indices must lie in [0, {len(self._vocab)}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens
