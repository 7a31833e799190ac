"""CIFAR-10 / CIFAR-100 from the official python-pickle archives, unpickled without running arbitrary code.

A pickle can call any importable function while it loads. These files only ever hold dicts of numpy arrays,
lists, ints and bytes, so `safe_load_pickle` resolves just the handful of numpy globals that rebuild an array and
refuses every other global before it is imported, let alone called.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

_ARRAY = np.zeros(1, dtype=np.uint8)


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); allow exactly that.
    if encoding.lower().replace("-", "") not in {"latin1", "iso88591"}:
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} (only latin1 is used)")
    return codecs.encode(obj, encoding, errors)


# The callables numpy's own __reduce__ hands to pickle, taken from numpy rather than imported by (private) name.
_RECONSTRUCT = _ARRAY.__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct: protocols 0-4
_FROMBUFFER = _ARRAY.__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer: protocol 5, Python 3.8+'s default
_SCALAR = np.float64(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar: numpy scalars such as np.int64 labels
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = _RECONSTRUCT
    _ALLOWED_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = _FROMBUFFER
    _ALLOWED_GLOBALS[(f"{_module}.multiarray", "scalar")] = _SCALAR


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': dataset pickles may only contain numpy arrays, "
                "lists, numbers and strings"
            ) from None


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a data file (Python 2 or 3) that holds only numpy arrays and plain containers.

    Raises:
        ValueError: Naming the file, if it asks for any other global or is not a valid pickle.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"unsafe or invalid pickle {path}: {e}") from None
    except Exception as e:  # truncated or garbled pickles raise all sorts
        raise ValueError(f"cannot read pickle {path}: {type(e).__name__}: {e}") from None


def _get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{path} should hold a dict, got {type(d).__name__}")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise ValueError(f"{path} has no '{key}' entry (keys: {[k.decode() if isinstance(k, bytes) else k for k in d]})")


def _batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = safe_load_pickle(path)
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, labels_key, path))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise ValueError(f"{path}: 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: '{labels_key}' should be {len(data)} integers, got {labels.dtype} {labels.shape}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"{path}: label {int(bad[0])} is outside the class range 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _find_dir(root: Path, marker: str, subdir: str) -> Path:
    for candidate in (root, root / subdir):
        if (candidate / marker).is_file():
            return candidate
    raise ValueError(f"no CIFAR data in {root}: expected {root}/{marker} or {root}/{subdir}/{marker}")


def load_cifar(
    root: str | os.PathLike, variant: Literal["cifar10", "cifar100"]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Read the official python-pickle CIFAR archive unpacked in `root` (or in its cifar-10-batches-py/ etc.).

    Returns:
        train images uint8 (N, 3, 32, 32), train labels, test images, test labels, class names.
    """
    root = Path(root)
    if variant == "cifar10":
        folder = _find_dir(root, "batches.meta", "cifar-10-batches-py")
        names_key, labels_key = "label_names", "labels"
        meta_path, train_files, test_file = (
            folder / "batches.meta",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
        )
    elif variant == "cifar100":
        folder = _find_dir(root, "meta", "cifar-100-python")
        names_key, labels_key = "fine_label_names", "fine_labels"
        meta_path, train_files, test_file = folder / "meta", ["train"], "test"
    else:
        raise ValueError(f"unknown CIFAR variant {variant!r}: use 'cifar10' or 'cifar100'")
    class_names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in _get(safe_load_pickle(meta_path), names_key, meta_path)
    ]
    for name in [*train_files, test_file]:
        if not (folder / name).is_file():
            raise ValueError(f"CIFAR file {folder / name} is missing")
    train = [_batch(folder / name, labels_key, len(class_names)) for name in train_files]
    test_x, test_y = _batch(folder / test_file, labels_key, len(class_names))
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return (
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(np.array(test_x)),  # a copy: arrays unpickled from bytes are read-only
        torch.from_numpy(test_y),
        class_names,
    )
