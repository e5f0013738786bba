"""Image data sets as tensors in ``[-1, 1]``, ready for flow matching or diffusion.

:func:`load_image_data` returns an :class:`ImageData`: ``images`` is float32 ``[N, C, H, W]``
scaled to ``[-1, 1]`` (``-1`` is the background: black), ``labels`` is int64 ``[N]``.  ``H`` and
``W`` are padded with ``-1`` (centred) up to a multiple of 8 (so also of 4), so that a UNet that
halves the resolution up to three times sees whole pixels: MNIST's 28×28 becomes 32×32 (28 is
already a multiple of 4, hence 8), digits' 8×8 and CIFAR-10's 32×32 stay as they are.

======================  ==========================================================  ==================
``dataset``             source                                                      shape
======================  ==========================================================  ==================
``digits``              scikit-learn's ``load_digits`` (1797 images, offline)       ``[1, 8, 8]``
``mnist8k``             the real MNIST test split in ``shared_data_dir()/mnist``,   ``[1, 32, 32]``
                        split 8000 train / 2000 test
``mnist``               torchvision MNIST (``root``, ``download``)                  ``[1, 32, 32]``
``fashion_mnist``       torchvision FashionMNIST (``root``, ``download``)           ``[1, 32, 32]``
``cifar10``             torchvision CIFAR-10 (``root``, ``download``)               ``[3, 32, 32]``
``idx``                 a folder ``root`` of MNIST-format IDX files                 ``[1, H', W']``
``folder``              an ImageFolder tree ``root/<class>/<image files>``          ``[C, H', W']``
======================  ==========================================================  ==================

``split`` is ``"train"``, ``"test"`` or ``"all"``.  Sets without their own split (``digits``,
``mnist8k``, a single IDX pair, ``folder``) are split 80/20 by a permutation drawn from ``seed``:
the same seed gives the same split on every machine, and the two parts are disjoint.

Bad input (an unknown key, a missing folder, a truncated file, data that cannot be downloaded)
raises :class:`~energyflow.errors.InputError` with one line naming the key or file.  Offline,
the torchvision sets fail within seconds, never hang.  torchvision, scikit-learn and Pillow are
imported only inside the loaders that need them.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from energyflow.errors import CorruptFileError, InputError
from energyflow.validation import check_integer

__all__ = ["DATASETS", "ImageData", "load_image_data", "read_idx", "shared_data_dir"]

DATASETS = ("digits", "mnist8k", "mnist", "fashion_mnist", "cifar10", "idx", "folder")
SPLITS = ("train", "test", "all")

BACKGROUND = -1.0          # the padding value: black in [-1, 1]
SIZE_MULTIPLE = 8          # H and W are padded up to a multiple of this (28 -> 32, 8 -> 8)
TEST_FRACTION = 0.2        # of the sets split here (digits, mnist8k, a single IDX pair, folder)
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation while torchvision downloads

_DIGIT_NAMES = [str(i) for i in range(10)]
_TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_SHARED_MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Pillow modes that hold one grey channel (with or without alpha)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


# ----------------------------------------------------------------------------------------------
# The data record
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ImageData:
    """Images in ``[-1, 1]`` with their class labels.

    Attributes:
        images: float32 ``[N, C, H, W]`` in ``[-1, 1]``; ``H`` and ``W`` are multiples of 8
            (padded with the background value ``-1``).
        labels: int64 ``[N]`` in ``0 .. num_classes - 1``.
        num_classes: the number of classes of the whole data set (a subset keeps it).
        name: the data set's key (``"digits"``, ``"mnist8k"``…).
        class_names: ``num_classes`` names, ``class_names[label]``.

    The tensors are treated as the data's contents: :meth:`fingerprint` is cached and recomputed
    only when ``images`` or ``labels`` is replaced or modified in place.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str
    class_names: list[str]
    _fingerprint: Optional[tuple] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4 or self.images.dtype != torch.float32:
            raise InputError(f"ImageData {self.name!r}: images must be a float32 tensor [N, C, H, W], got "
                             f"{getattr(self.images, 'dtype', type(self.images).__name__)} "
                             f"{tuple(getattr(self.images, 'shape', ()))}")
        if not isinstance(self.labels, Tensor) or self.labels.shape != (self.images.shape[0],) \
                or self.labels.dtype != torch.int64:
            raise InputError(f"ImageData {self.name!r}: labels must be an int64 tensor [{self.images.shape[0]}], got "
                             f"{getattr(self.labels, 'dtype', type(self.labels).__name__)} "
                             f"{tuple(getattr(self.labels, 'shape', ()))}")
        self.num_classes = check_integer(self.num_classes, "num_classes", minimum=1)
        self.class_names = [str(c) for c in self.class_names]
        if len(self.class_names) != self.num_classes:
            raise InputError(f"ImageData {self.name!r}: {len(self.class_names)} class_names for "
                             f"num_classes={self.num_classes}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def fingerprint(self) -> str:
        """A content hash of ``images`` and ``labels`` (:func:`energyflow.stages.fingerprint`), for
        stage configurations: the same name with other contents gives another fingerprint."""
        from energyflow.stages import fingerprint

        state = (self.images, getattr(self.images, "_version", 0), self.labels, getattr(self.labels, "_version", 0))
        cached = self._fingerprint
        if cached is None or any(a is not b if isinstance(a, Tensor) else a != b for a, b in zip(cached[0], state)):
            self._fingerprint = (state, fingerprint(self.images, self.labels))
        return self._fingerprint[1]

    def of_classes(self, classes: Sequence[int]) -> "ImageData":
        """The images whose label is in ``classes`` (labels, ``num_classes`` and ``class_names``
        unchanged: a label keeps its meaning)."""
        if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
            classes = [int(classes)]
        if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
            raise InputError(f"classes must be a list of class indices, got {classes!r}")
        wanted = [check_integer(c, "classes") for c in classes]
        if not wanted:
            raise InputError("classes is empty: name at least one class index")
        bad = [c for c in wanted if not 0 <= c < self.num_classes]
        if bad:
            raise InputError(f"classes {bad} out of range for {self.name} (class indices 0..{self.num_classes - 1})")
        keep = torch.isin(self.labels, torch.tensor(wanted, dtype=torch.int64))
        return ImageData(self.images[keep], self.labels[keep], self.num_classes, self.name, list(self.class_names))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def load_image_data(dataset: str, split: str = "train", root: Optional[str] = None, seed: int = 0,
                    download: bool = False, grayscale: Optional[bool] = None,
                    size: Optional[int] = None) -> ImageData:
    """Load an image data set as an :class:`ImageData` in ``[-1, 1]``.

    Args:
        dataset: one of :data:`DATASETS` (see the module docstring).
        split: ``"train"``, ``"test"`` or ``"all"`` (both, train first for the torchvision sets).
        root: ``mnist`` / ``fashion_mnist`` / ``cifar10``: torchvision's folder (default
            ``~/.cache/energyflow/torchvision``); ``idx``: the folder of IDX files; ``folder``:
            the ImageFolder tree; ``mnist8k``: a folder holding ``t10k-images-idx3-ubyte.gz`` and
            ``t10k-labels-idx1-ubyte.gz`` (default ``shared_data_dir()/mnist``); not used by ``digits``.
        seed: the seed of the 80/20 split of the sets split here (ignored by the torchvision sets
            and by an IDX folder with train-/t10k- files, which come split).
        download: let torchvision download a missing ``mnist`` / ``fashion_mnist`` / ``cifar10``
            (ignored by the local sets).
        grayscale: ``True``: one grey channel (ITU-R 601 luma of RGB); ``False``: three channels;
            ``None``: the source's own (for ``folder``: grey when every image is grey).
        size: resize to ``size × size`` before padding (bilinear, antialiased); ``None`` keeps the
            source's size (for ``folder`` all images must then share one size).

    Raises:
        InputError: a bad key or value, a missing folder or file, a corrupt file, data that is not
            here and cannot be downloaded; the one-line message names the key or file.
    """
    if not isinstance(dataset, str) or dataset.strip().lower().replace("-", "_") not in DATASETS:
        raise InputError(f"unknown image data set {dataset!r} (key 'dataset'); valid names are {', '.join(DATASETS)}")
    dataset = dataset.strip().lower().replace("-", "_")
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    seed = check_integer(seed, "seed")
    if size is not None:
        size = check_integer(size, "size", minimum=1)
    if grayscale is not None and not isinstance(grayscale, (bool, np.bool_)):
        raise InputError(f"grayscale must be true, false or null, got {grayscale!r}")
    if not isinstance(download, (bool, np.bool_)):
        raise InputError(f"download must be true or false, got {download!r}")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise InputError(f"root must be a folder path, got {root!r}")

    if dataset == "folder":
        return _load_folder(root, split, seed, grayscale, size)
    if dataset == "digits":
        if root is not None:
            raise InputError(f"root is not used by dataset=digits (scikit-learn ships it), got root={root!r}")
        images, labels, names = _digits()
        images, labels = _take(images, labels, split, seed)
    elif dataset == "mnist8k":
        images, labels, names = _mnist8k(root)
        images, labels = _take(images, labels, split, seed)
    elif dataset == "idx":
        images, labels, names = _idx_folder(root, split, seed)
    else:
        images, labels, names = _torchvision(dataset, split, root, bool(download))
    images = _adjust(images, grayscale, size)
    return ImageData(_pad(images), labels, len(names), dataset, names)


def shared_data_dir() -> Optional[Path]:
    """The shared data folder: ``$ENERGYFLOW_SHARED_DATA`` if set, else ``<repo root>/../shared/data``
    (the repo root is the folder holding the ``domains`` package); ``None`` if it does not exist."""
    path = _shared_candidate()
    return path if path.is_dir() else None


def _shared_candidate() -> Path:
    env = os.environ.get("ENERGYFLOW_SHARED_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed (detected from its first bytes).

    Returns the array in native byte order with the shape the header declares.

    Raises:
        InputError: ``path`` is missing or unreadable.
        CorruptFileError: a bad magic number or type code, a truncated header, or a length that
            does not match the declared shape (truncated or trailing bytes); the message names ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"IDX file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read IDX file {path}: {err.strerror or err}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise CorruptFileError(f"IDX file {path} is a truncated or corrupt gzip file ({err})") from None
    if len(raw) < 4:
        raise CorruptFileError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise CorruptFileError(f"IDX file {path} has a bad magic number 0x{raw[:4].hex()} (expected 0x0000, a type "
                               f"code 08/09/0b/0c/0d/0e and a number of dimensions >= 1)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise CorruptFileError(f"IDX file {path} is truncated: its header declares {ndim} dimensions but the file "
                               f"has {len(raw)} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    count = math.prod(shape)
    expected = start + count * dtype.itemsize
    if len(raw) != expected:
        what = "is truncated" if len(raw) < expected else "has trailing bytes"
        raise CorruptFileError(f"IDX file {path} {what}: {len(raw)} bytes where shape {list(shape)} of "
                               f"{dtype.name} needs {expected}")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable native-order copy


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[N, H, W]`` images and int64 ``[N]`` labels, checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InputError(f"IDX file {images_path} holds {images.dtype} {list(images.shape)}; expected unsigned "
                         f"bytes [N, H, W] (an idx3-ubyte image file)")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(f"IDX file {labels_path} holds {labels.dtype} {list(labels.shape)}; expected integer "
                         f"labels [N] (an idx1-ubyte label file)")
    if len(labels) != len(images):
        raise InputError(f"IDX files {images_path} and {labels_path} disagree: {len(images)} images but "
                         f"{len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise InputError(f"IDX file {labels_path} holds negative labels (min {int(labels.min())})")
    return images, labels.astype(np.int64)


_IDX_IMAGES = re.compile(r"^(?P<prefix>.*?)images.*idx3", re.IGNORECASE)
_IDX_LABELS = re.compile(r"^(?P<prefix>.*?)labels.*idx1", re.IGNORECASE)


def _idx_pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """``prefix -> (images file, labels file)`` for the IDX pairs in ``folder`` (a plain file is
    preferred over its .gz twin)."""
    found: dict[str, dict[str, Path]] = {"images": {}, "labels": {}}
    for path in sorted(folder.iterdir(), key=lambda p: (p.name.lower().endswith(".gz"), p.name)):
        if not path.is_file():
            continue
        for kind, pattern in (("images", _IDX_IMAGES), ("labels", _IDX_LABELS)):
            match = pattern.match(path.name)
            if match:
                found[kind].setdefault(match.group("prefix").lower(), path)
    return {p: (found["images"][p], found["labels"][p]) for p in sorted(found["images"]) if p in found["labels"]}


def _idx_folder(root: Any, split: str, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    folder = _require_dir(root, "idx", "a folder of MNIST-format IDX files (*images*idx3* and *labels*idx1*)")
    pairs = _idx_pairs(folder)
    train = [p for p in pairs if p.startswith("train")]
    test = [p for p in pairs if p.startswith(("t10k", "test"))]
    if not pairs:
        raise InputError(f"no IDX pair in {folder}: expected an '*images*idx3*' and a '*labels*idx1*' file "
                         f"(optionally .gz), e.g. train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    if len(train) == 1 and len(test) == 1:
        parts = {"train": pairs[train[0]], "test": pairs[test[0]]}
        chosen = ("train", "test") if split == "all" else (split,)
        loaded = {s: _read_idx_pair(*parts[s]) for s in chosen}
        if split == "all" and loaded["train"][0].shape[1:] != loaded["test"][0].shape[1:]:
            raise InputError(f"IDX files {parts['train'][0]} and {parts['test'][0]} hold images of different sizes "
                             f"{list(loaded['train'][0].shape[1:])} and {list(loaded['test'][0].shape[1:])}")
        images = np.concatenate([loaded[s][0] for s in chosen])
        labels = np.concatenate([loaded[s][1] for s in chosen])
        # the other split's labels count too, so that train and test agree on num_classes
        others = [read_idx(parts[s][1]) for s in ("train", "test") if s not in loaded]
        num_classes = 1 + max(int(np.max(lab, initial=0)) for lab in [labels, *others])
        return _to_unit(images), torch.from_numpy(labels), [str(i) for i in range(num_classes)]
    if len(pairs) > 1:
        listed = ", ".join(f"{pairs[p][0].name}+{pairs[p][1].name}" for p in pairs)
        raise InputError(f"{folder} holds several IDX pairs ({listed}); expected one pair, or one train- and one "
                         f"t10k- pair")
    images, labels = _read_idx_pair(*next(iter(pairs.values())))
    num_classes = int(np.max(labels, initial=0)) + 1
    images, labels = _take(_to_unit(images), torch.from_numpy(labels), split, seed)
    return images, labels, [str(i) for i in range(num_classes)]


# ----------------------------------------------------------------------------------------------
# The loaders
# ----------------------------------------------------------------------------------------------
def _digits() -> tuple[Tensor, Tensor, list[str]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("dataset=digits needs scikit-learn: pip install 'energyflow[image]' (or scikit-learn)") \
            from None
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1) / 8.0 - 1.0
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images.contiguous(), labels, list(_DIGIT_NAMES)


def _mnist8k(root: Any) -> tuple[Tensor, Tensor, list[str]]:
    if root is not None:
        folder = Path(root).expanduser()
    else:
        shared = shared_data_dir()
        folder = (shared if shared is not None else _shared_candidate()) / "mnist"
    paths = [folder / name for name in _SHARED_MNIST_FILES]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"the shared MNIST split is not on this machine: {missing[0]} is missing (looked in "
                         f"{folder}; set ENERGYFLOW_SHARED_DATA or root=); use dataset=mnist with download=True, "
                         f"or dataset=idx with root=<a folder of MNIST IDX files>")
    images, labels = _read_idx_pair(*paths)
    if len(labels) and labels.max() > 9:
        raise InputError(f"IDX file {paths[1]} holds labels up to {int(labels.max())}; MNIST has 0..9")
    return _to_unit(images), torch.from_numpy(labels), list(_DIGIT_NAMES)


def _torchvision(dataset: str, split: str, root: Any, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise InputError(f"dataset={dataset} needs torchvision: pip install 'energyflow[image]' (or torchvision)") \
            from None
    folder = Path(root).expanduser() if root is not None else Path("~/.cache/energyflow/torchvision").expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"root {folder} for dataset={dataset} is a file, not a folder")
    cls = getattr(tvd, _TORCHVISION_SETS[dataset])
    images, labels, names = [], [], []
    for part in (("train", "test") if split == "all" else (split,)):
        source = _torchvision_part(cls, dataset, part, folder, download)
        data = torch.as_tensor(np.asarray(source.data))
        data = data.permute(0, 3, 1, 2) if data.dim() == 4 else data.unsqueeze(1)  # CIFAR is [N, H, W, 3]
        images.append(data.float().div_(127.5).sub_(1.0))
        labels.append(torch.as_tensor(np.asarray(source.targets), dtype=torch.int64))
        names = list(_DIGIT_NAMES) if dataset == "mnist" else [str(c) for c in source.classes]
    return torch.cat(images).contiguous(), torch.cat(labels), names


def _torchvision_part(cls: Any, dataset: str, part: str, folder: Path, download: bool) -> Any:
    """One split of a torchvision data set; missing files or no network give one InputError line."""
    import pickle
    from urllib.error import URLError

    if not download:
        try:
            return cls(str(folder), train=part == "train", download=False)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
            reason = "its files are missing" if "not found" in str(err) else _one_line(err)
            raise InputError(f"dataset={dataset} ({part} split) is not in root {folder} ({reason}); pass "
                             f"download=True on a machine with internet access, or copy torchvision's files for "
                             f"{dataset} there" + (", or use dataset=mnist8k / dataset=idx with root=<IDX files>"
                                                    if dataset == "mnist" else "")) from None
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib has no timeout of its own: never hang on a dead network
    try:
        return cls(str(folder), train=part == "train", download=True)
    except (URLError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise InputError(f"could not download dataset={dataset} into root {folder} ({_one_line(err)}); without "
                         f"internet access, fetch it elsewhere and copy it into {folder}, then use download=False"
                         + (", or use dataset=mnist8k / dataset=idx with root=<IDX files>"
                            if dataset == "mnist" else "")) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _load_folder(root: Any, split: str, seed: int, grayscale: Optional[bool], size: Optional[int]) -> ImageData:
    folder = _require_dir(root, "folder", "an ImageFolder tree root/<class>/<image files>")
    if not any(entry.is_dir() for entry in folder.iterdir()):
        raise InputError(f"folder {folder} has no class folders: dataset=folder expects root/<class>/<image files>")
    try:
        from PIL import Image
        from torchvision.datasets import ImageFolder
    except ImportError:
        raise InputError("dataset=folder needs torchvision and Pillow: pip install 'energyflow[image]'") from None
    try:
        listing = ImageFolder(str(folder))  # only its sorted (file, class) listing; files are decoded below
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"folder {folder}: {_one_line(err)}") from None
    files = [Path(p) for p, _ in listing.samples]
    labels = torch.tensor([c for _, c in listing.samples], dtype=torch.int64)

    # headers of every image (cheap): sizes must agree unless resized, and modes decide grayscale
    modes, first = [], None
    for path in files:
        try:
            with Image.open(path) as im:
                modes.append(im.mode)
                if size is None:
                    if first is None:
                        first = (path, im.size)
                    elif im.size != first[1]:
                        raise InputError(f"image {path} is {im.size[0]}x{im.size[1]} but {first[0]} is "
                                         f"{first[1][0]}x{first[1][1]}: pass size= to resize all images under "
                                         f"{folder} to one size")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"image {path} cannot be read ({_one_line(err)})") from None
    if grayscale is None:
        grayscale = all(mode in _GRAY_MODES for mode in modes)

    keep = _split_indices(len(files), split, seed)
    if len(keep) == 0:
        raise InputError(f"the {split} split of folder {folder} is empty ({len(files)} images in all)")
    arrays = [_decode(Image, files[i], "L" if grayscale else "RGB", size) for i in keep]
    pixels = torch.from_numpy(np.stack(arrays))
    pixels = pixels.unsqueeze(1) if grayscale else pixels.permute(0, 3, 1, 2)
    images = _pad(pixels.float().div_(127.5).sub_(1.0).contiguous())
    return ImageData(images, labels[torch.from_numpy(keep)], len(listing.classes), "folder", list(listing.classes))


def _decode(Image: Any, path: Path, mode: str, size: Optional[int]) -> np.ndarray:
    """One image file as uint8 ``[H, W]`` (mode ``L``) or ``[H, W, 3]`` (``RGB``)."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits (convert() would clip it)
                im = Image.fromarray(np.round(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8))
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"image {path} cannot be read ({_one_line(err)})") from None


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _require_dir(root: Any, dataset: str, what: str) -> Path:
    if root is None:
        raise InputError(f"dataset={dataset} needs root=: {what}")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise InputError(f"root {folder} for dataset={dataset} is not a folder"
                         + ("" if folder.exists() else " (it does not exist)") + f"; expected {what}")
    return folder


def _split_indices(n: int, split: str, seed: int) -> np.ndarray:
    """Sorted indices of ``split`` within ``n`` items: a seeded permutation, the first 20 % test."""
    if split == "all":
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * TEST_FRACTION)
    return np.sort(order[n_test:] if split == "train" else order[:n_test])


def _take(images: Tensor, labels: Tensor, split: str, seed: int) -> tuple[Tensor, Tensor]:
    if split == "all":
        return images, labels
    keep = torch.from_numpy(_split_indices(len(labels), split, seed))
    return images[keep].contiguous(), labels[keep]


def _to_unit(pixels: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W]`` → float32 ``[N, 1, H, W]`` in ``[-1, 1]``."""
    return torch.from_numpy(pixels).unsqueeze(1).float().div_(127.5).sub_(1.0)


def _adjust(images: Tensor, grayscale: Optional[bool], size: Optional[int]) -> Tensor:
    """Channel conversion (luma ↔ grey repeated) and resizing of ``[N, C, H, W]`` in ``[-1, 1]``."""
    if grayscale and images.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype)
        images = torch.einsum("nchw,c->nhw", images, luma).unsqueeze(1)
    elif grayscale is False and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if size is not None and tuple(images.shape[-2:]) != (size, size) and len(images):
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True).clamp_(-1.0, 1.0)
    return images.contiguous()


def _pad(images: Tensor) -> Tensor:
    """Pad ``H`` and ``W`` (centred, with :data:`BACKGROUND`) up to a multiple of :data:`SIZE_MULTIPLE`."""
    h, w = images.shape[-2:]
    dh, dw = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
    if dh == 0 and dw == 0:
        return images
    return torch.nn.functional.pad(images, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=BACKGROUND)


def _one_line(err: BaseException) -> str:
    """The most telling line of an exception message (the last non-empty one, e.g. urllib's reason)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text[:200]
