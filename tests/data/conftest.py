"""Small on-disk datasets built per test: image folders, CIFAR pickles, IDX files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def save_solid(path: Path, color, size=(24, 20), mode: str = "RGB", **save_kwargs) -> Path:
    """Write a single-colour image (size is (W, H)) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    """Write an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist(root: Path, n_train: int = 12, n_test: int = 6, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / f"{name}{suffix}", array)
    return arrays


def write_cifar10(folder: Path, per_batch: int = 20, n_test: int = 20, protocol: int = 2, seed: int = 0) -> dict:
    """A miniature CIFAR-10 archive with bytes keys, as the original Python 2 pickles have."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=protocol)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in np.arange(n) % 10],
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = batch
    return batches


def write_cifar100(folder: Path, n_train: int = 40, n_test: int = 20, protocol: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    fine = [f"class_{i:02d}" for i in range(100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, protocol)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        d = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": (np.arange(n) * 7 % 100).astype(np.int64),  # numpy labels, not a list
            "coarse_labels": [0] * n,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol)
        out[name] = d
    return out


@pytest.fixture
def writers() -> SimpleNamespace:
    """The file writers above, as a fixture (test modules cannot import conftest reliably)."""
    return SimpleNamespace(
        save_solid=save_solid,
        write_idx=write_idx,
        write_mnist=write_mnist,
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
    )


@pytest.fixture
def two_class_folder(tmp_path: Path) -> Path:
    """root/{cat,dog}/*.png with 6 solid images per class (cat red, dog blue)."""
    root = tmp_path / "two_class"
    for i in range(6):
        save_solid(root / "cat" / f"c{i}.png", (200 + i, 0, 0))
        save_solid(root / "dog" / f"d{i}.png", (0, 0, 200 + i))
    return root
