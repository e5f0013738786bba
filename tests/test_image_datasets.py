"""The image domain's data loaders: shapes, scaling, padding, seeded splits, IDX and ImageFolder
reading, one-line errors, fast offline failure, and lazy imports of the heavy stacks."""
import gzip
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from domains.image.datasets import DATASETS, ImageData, load_image_data, read_idx, shared_data_dir
from energyflow.errors import CorruptFileError, InputError

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An IDX file of unsigned bytes (the MNIST format), optionally gzip-compressed."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def idx_pair(folder: Path, prefix: str, n: int, rng: np.random.Generator, gz: bool = False, shape=(6, 10)):
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, 4, size=n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}images-idx3-ubyte{suffix}", images, gz)
    write_idx(folder / f"{prefix}labels-idx1-ubyte{suffix}", labels, gz)
    return images, labels


def unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
def test_import_leaves_torchvision_and_sklearn_unloaded():
    code = ("import sys, domains.image, domains.image.datasets; "
            "print(sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bad_keys_name_the_key():
    assert "digits" in DATASETS and "folder" in DATASETS
    with pytest.raises(InputError, match="dataset"):
        load_image_data("imagenet")
    with pytest.raises(InputError, match="split"):
        load_image_data("digits", split="validation")
    with pytest.raises(InputError, match="size"):
        load_image_data("digits", size=0)
    with pytest.raises(InputError, match="seed"):
        load_image_data("digits", seed=1.5)


# ----------------------------------------------------------------------------------------------
# digits (scikit-learn)
# ----------------------------------------------------------------------------------------------
def test_digits_shapes_range_and_splits():
    pytest.importorskip("sklearn")
    train, test, full = (load_image_data("digits", split=s) for s in ("train", "test", "all"))
    assert full.images.shape == (1797, 1, 8, 8) and full.image_shape == (1, 8, 8)
    assert full.images.dtype == torch.float32 and full.labels.dtype == torch.int64
    assert full.images.min() == -1.0 and full.images.max() == 1.0
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert full.num_classes == 10 and full.class_names == [str(i) for i in range(10)] and full.name == "digits"
    # together exactly the whole set (as multisets of (image, label) rows: the split is a partition)
    rows = lambda d: [x.numpy().tobytes() + bytes([int(y)]) for x, y in zip(d.images, d.labels)]
    assert sorted(rows(train) + rows(test)) == sorted(rows(full))
    # sklearn's pixel values 0..16 map to x / 8 - 1
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()
    assert torch.equal(full.images[:, 0], raw / 8 - 1)


def test_digits_split_is_seeded():
    pytest.importorskip("sklearn")
    a, b = load_image_data("digits", seed=0), load_image_data("digits", seed=0)
    c = load_image_data("digits", seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    # the train and test parts of one seed partition the indices exactly
    from domains.image.datasets import _split_indices

    tr, te = _split_indices(1797, "train", 0), _split_indices(1797, "test", 0)
    assert len(np.intersect1d(tr, te)) == 0 and len(np.union1d(tr, te)) == 1797


def test_of_classes_and_fingerprint():
    pytest.importorskip("sklearn")
    data = load_image_data("digits", split="all")
    sub = data.of_classes([0, 3])
    assert set(sub.labels.tolist()) == {0, 3}
    assert len(sub) == int(((data.labels == 0) | (data.labels == 3)).sum())
    assert sub.num_classes == 10 and sub.class_names == data.class_names
    assert len(data.of_classes(7)) == int((data.labels == 7).sum())
    with pytest.raises(InputError, match="classes"):
        data.of_classes([10])
    with pytest.raises(InputError, match="classes"):
        data.of_classes([])

    before = data.fingerprint()
    assert data.fingerprint() == before  # cached, stable
    changed = data.images.clone()
    changed[5, 0, 3, 4] += 0.25
    other = ImageData(changed, data.labels.clone(), data.num_classes, data.name, data.class_names)
    assert other.fingerprint() != before
    data.images[5, 0, 3, 4] += 0.25  # in place: the cache notices
    assert data.fingerprint() == other.fingerprint()


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_idx_train_and_t10k_pairs(tmp_path, gz):
    rng = np.random.default_rng(0)
    train_x, train_y = idx_pair(tmp_path, "train-", 12, rng, gz)
    test_x, test_y = idx_pair(tmp_path, "t10k-", 5, rng, gz)
    train = load_image_data("idx", "train", root=str(tmp_path))
    test = load_image_data("idx", "test", root=tmp_path)
    full = load_image_data("idx", "all", root=tmp_path)
    # 6x10 padded (centred, with -1) to 8x16
    assert train.images.shape == (12, 1, 8, 16) and test.images.shape == (5, 1, 8, 16) and len(full) == 17
    assert torch.equal(train.images[:, 0, 1:7, 3:13], unit(train_x))
    assert torch.equal(test.images[:, 0, 1:7, 3:13], unit(test_x))
    border = train.images.clone()
    border[:, :, 1:7, 3:13] = -1.0
    assert bool((border == -1.0).all())
    assert torch.equal(train.labels, torch.from_numpy(train_y.astype(np.int64)))
    assert torch.equal(test.labels, torch.from_numpy(test_y.astype(np.int64)))
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    assert train.num_classes == test.num_classes == full.num_classes == n_classes
    assert torch.equal(full.images, torch.cat([train.images, test.images]))


def test_idx_single_pair_is_split_80_20(tmp_path):
    x, _ = idx_pair(tmp_path, "", 20, np.random.default_rng(1), gz=True, shape=(8, 8))
    train = load_image_data("idx", "train", root=tmp_path, seed=3)
    test = load_image_data("idx", "test", root=tmp_path, seed=3)
    assert len(train) == 16 and len(test) == 4
    full = unit(x)
    found = sorted(int(torch.nonzero((full == img[0]).flatten(1).all(1))[0]) for img in
                   torch.cat([train.images, test.images]))
    assert found == list(range(20))  # disjoint, and together every image


def test_read_idx_values_and_bad_files(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain = write_idx(tmp_path / "a-images-idx3-ubyte", data)
    packed = write_idx(tmp_path / "a-images-idx3-ubyte.gz", data, gz=True)
    assert np.array_equal(read_idx(plain), data) and np.array_equal(read_idx(packed), data)
    big_endian = tmp_path / "ints-idx1"
    big_endian.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + np.array([1, -2, 70000], ">i4").tobytes())
    assert read_idx(big_endian).tolist() == [1, -2, 70000]

    truncated = tmp_path / "train-images-idx3-ubyte"
    truncated.write_bytes(plain.read_bytes()[:-5])
    with pytest.raises(CorruptFileError, match="truncated") as err:
        read_idx(truncated)
    assert str(truncated) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(write_idx(tmp_path / "l", np.zeros(2)).read_bytes())
    with pytest.raises(InputError, match=str(truncated)):
        load_image_data("idx", root=tmp_path)  # the loader names the bad file too

    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x08\x03\x00\x00" + bytes(40))
    with pytest.raises(CorruptFileError, match="magic"):
        read_idx(bad_magic)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(plain.read_bytes() + b"\x00")
    with pytest.raises(CorruptFileError, match="trailing"):
        read_idx(trailing)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(packed.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="gzip"):
        read_idx(cut_gz)
    with pytest.raises(InputError, match="not found"):
        read_idx(tmp_path / "absent")


def test_idx_missing_folder_or_pair(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        load_image_data("idx", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(InputError, match="root"):
        load_image_data("idx")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="no IDX pair"):
        load_image_data("idx", root=tmp_path)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------
def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def test_folder_grayscale_labels_and_values(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    pixels = {}
    for cls, count in (("class_a", 3), ("class_b", 2)):
        for i in range(count):
            pixels[(cls, i)] = rng.integers(0, 256, size=(6, 6))
            write_png(tmp_path / cls / f"{i}.png", pixels[(cls, i)])
    data = load_image_data("folder", "all", root=tmp_path)
    assert data.class_names == ["class_a", "class_b"] and data.num_classes == 2 and data.name == "folder"
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.shape == (5, 1, 8, 8)  # 6x6 grey padded to 8x8
    assert torch.equal(data.images[3, 0, 1:7, 1:7], unit(pixels[("class_b", 0)]))
    assert data.images[:, :, 0].eq(-1).all() and data.images[:, :, :, 7].eq(-1).all()
    train, test = (load_image_data("folder", s, root=tmp_path, seed=0) for s in ("train", "test"))
    assert len(train) == 4 and len(test) == 1
    rgb = load_image_data("folder", "all", root=tmp_path, grayscale=False)
    assert rgb.images.shape == (5, 3, 8, 8) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_folder_rgb_sizes_and_errors(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("PIL")
    rng = np.random.default_rng(1)
    write_png(tmp_path / "cats" / "a.png", rng.integers(0, 256, size=(8, 8, 3)))
    write_png(tmp_path / "dogs" / "b.png", rng.integers(0, 256, size=(8, 8, 3)))
    assert load_image_data("folder", "all", root=tmp_path).image_shape == (3, 8, 8)  # RGB kept
    assert load_image_data("folder", "all", root=tmp_path, grayscale=True).image_shape == (1, 8, 8)
    odd = tmp_path / "dogs" / "c.png"
    write_png(odd, rng.integers(0, 256, size=(12, 10, 3)))
    with pytest.raises(InputError, match="size=") as err:
        load_image_data("folder", "all", root=tmp_path)
    assert str(odd) in str(err.value) and "\n" not in str(err.value)
    resized = load_image_data("folder", "all", root=tmp_path, size=8)
    assert resized.images.shape == (3, 3, 8, 8) and resized.labels.tolist() == [0, 1, 1]
    assert resized.images.min() >= -1 and resized.images.max() <= 1

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="class folders"):
        load_image_data("folder", root=empty)
    (empty / "nothing").mkdir()
    with pytest.raises(InputError, match=str(empty)):
        load_image_data("folder", root=empty)


# ----------------------------------------------------------------------------------------------
# torchvision sets
# ----------------------------------------------------------------------------------------------
def _online() -> bool:
    for host in ("ossci-datasets.s3.amazonaws.com", "yann.lecun.com"):
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return True
        except OSError:
            pass
    return False


def test_torchvision_missing_files_fail_fast(tmp_path):
    pytest.importorskip("torchvision")
    start = time.perf_counter()
    with pytest.raises(InputError, match="download=True") as err:
        load_image_data("mnist", root=tmp_path, download=False)
    assert time.perf_counter() - start < 15
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_torchvision_download_offline_fails_fast(tmp_path):
    pytest.importorskip("torchvision")
    if _online():
        pytest.skip("this machine is online: the offline failure cannot be tested")
    start = time.perf_counter()
    with pytest.raises(InputError, match="could not download dataset=mnist") as err:
        load_image_data("mnist", root=tmp_path, download=True)
    assert time.perf_counter() - start < 30
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_torchvision_mnist_from_raw_files(tmp_path):
    """torchvision's own MNIST reader on tiny raw files: padded 28 -> 32, values and labels kept."""
    pytest.importorskip("torchvision")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    train_x, train_y = idx_pair(raw, "train-", 7, rng, shape=(28, 28))
    idx_pair(raw, "t10k-", 3, rng, shape=(28, 28))
    data = load_image_data("mnist", "train", root=tmp_path)
    assert data.images.shape == (7, 1, 32, 32) and data.num_classes == 10
    assert torch.equal(data.images[:, 0, 2:30, 2:30], unit(train_x))
    assert torch.equal(data.labels, torch.from_numpy(train_y.astype(np.int64)))
    assert len(load_image_data("mnist", "all", root=tmp_path)) == 10


# ----------------------------------------------------------------------------------------------
# the shared MNIST test split
# ----------------------------------------------------------------------------------------------
def _shared_mnist() -> bool:
    shared = shared_data_dir()
    return shared is not None and all((shared / "mnist" / f).is_file()
                                      for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


@pytest.mark.skipif(not _shared_mnist(), reason="the shared MNIST split is not on this machine")
def test_mnist8k_split():
    train, test = load_image_data("mnist8k", "train"), load_image_data("mnist8k", "test")
    assert len(train) == 8000 and len(test) == 2000
    assert train.image_shape == test.image_shape == (1, 32, 32)
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    assert train.images.min() == -1 and train.images.max() == 1
    # disjoint: no test image equals a train image (hash rows)
    key = lambda d: {hash(x.numpy().tobytes()) for x in d.images}
    assert len(key(train) & key(test)) == 0
    assert load_image_data("mnist8k", "train").fingerprint() == train.fingerprint()


def test_mnist8k_missing_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYFLOW_SHARED_DATA", str(tmp_path / "none"))
    assert shared_data_dir() is None
    with pytest.raises(InputError, match="shared MNIST split is not on this machine") as err:
        load_image_data("mnist8k")
    message = str(err.value)
    assert str(tmp_path / "none") in message and "dataset=mnist" in message and "dataset=idx" in message
