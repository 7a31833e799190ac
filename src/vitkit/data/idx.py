"""MNIST and Fashion-MNIST from their IDX files (raw or gzipped).

IDX layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per dimension, then the
values in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (`.gz` is decompressed) into a native-endian numpy array.

    Raises:
        ValueError: Naming the file, for a bad magic number, an unknown dtype code, or a size that does not match
            the header.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read IDX file {path}: {type(e).__name__}: {e}") from None
    if len(data) < 4:
        raise ValueError(f"IDX file {path} is too short for a header ({len(data)} bytes)")
    zero_a, zero_b, code, ndim = data[:4]
    if zero_a or zero_b:
        magic = int.from_bytes(data[:4], "big")
        raise ValueError(f"IDX file {path} has bad magic number 0x{magic:08x} (its first two bytes must be zero)")
    if code not in _IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise ValueError(f"IDX file {path} has unknown dtype code 0x{code:02x} (allowed: {allowed})")
    if ndim == 0:
        raise ValueError(f"IDX file {path} declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header ({ndim} dimensions need {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"IDX file {path}: header says shape {dims} ({expected} bytes of data) but the file has "
            f"{len(data) - header} bytes after the header"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    # "train-images-idx3-ubyte" is the official name; some mirrors use "train-images.idx3-ubyte".
    prefix, kind, suffix = stem.split("-", 2)
    names = [stem, f"{prefix}-{kind}.{suffix}"]
    for folder in (root, root / "raw"):
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    raise ValueError(f"no IDX file {stem}[.gz] in {root} (or {root}/raw)")


def _split(root: Path, prefix: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"IDX file {images_path} should hold uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"IDX file {labels_path} should hold uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    bad = labels[labels >= num_classes]
    if len(bad):
        raise ValueError(f"IDX file {labels_path}: label {int(bad[0])} is outside the class range 0..{num_classes - 1}")
    gray = torch.from_numpy(images)  # (N, H, W)
    return gray[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels.astype(np.int64))


def load_idx_dataset(
    root: str | os.PathLike, class_names: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the train and t10k IDX files in `root` (or `root/raw`) as 3-channel uint8 images.

    Returns:
        train images uint8 (N, 3, H, W), train labels, test images, test labels.
    """
    root = Path(root)
    train_x, train_y = _split(root, "train", len(class_names))
    test_x, test_y = _split(root, "t10k", len(class_names))
    return train_x, train_y, test_x, test_y
