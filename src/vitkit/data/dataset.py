"""The two containers every data source returns: an `ImageDataset` per split, and the `DataSplits` that hold them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vitkit.data.images import BadImageWarning, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(eq=False)
class ImageDataset(torch.utils.data.Dataset):
    """Images with integer labels, either held in memory or decoded lazily from files.

    `dataset[i]` is `(uint8 tensor (3, H, W), int label)`. In-memory datasets hold every image in `images`; lazy
    ones (`images is None`) decode `paths[i]` on access with the same pipeline the folder loader uses (RGB, EXIF
    orientation, shorter side resized to `load_size`, centre crop), so batches always stack.

    Attributes:
        labels: Class index of each image, LongTensor (N,).
        class_names: Name of each class index.
        images: uint8 tensor (N, 3, H, W), or None for a lazy dataset.
        paths: Source file of each image, or None. An in-memory dataset decoded from files keeps its paths as a record
            of where each image came from; `images` always takes precedence.
        load_size: Side of the square a lazy dataset decodes to; for in-memory datasets the image side (or None).
        masks: Object mask per image, bool (N, H, W): only for the `shapes` source, else None.
        boxes: Object box per image as (x0, y0, x1, y1) pixels with exclusive x1/y1, LongTensor (N, 4): only for
            `shapes`, else None.
    """

    labels: Tensor
    class_names: list[str]
    images: Tensor | None = None
    paths: list[str] | None = None
    load_size: int | None = None
    masks: Tensor | None = None
    boxes: Tensor | None = None

    def __post_init__(self) -> None:
        labels = self.labels if isinstance(self.labels, Tensor) else np.asarray(self.labels)
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        self.class_names = [str(c) for c in self.class_names]
        n = len(self.labels)
        if self.images is None and self.paths is None:
            raise ValueError("ImageDataset needs `images` (an in-memory uint8 tensor) or `paths` (files to decode)")
        if self.images is not None:
            if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8:
                got = self.images.dtype if isinstance(self.images, Tensor) else type(self.images).__name__
                raise TypeError(f"images must be a uint8 tensor (N, 3, H, W), got {got}")
            if self.images.ndim != 4 or self.images.shape[1] != 3:
                raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(self.images.shape)}")
            if len(self.images) != n:
                raise ValueError(f"{len(self.images)} images but {n} labels")
        else:
            if self.load_size is None or int(self.load_size) <= 0:
                raise ValueError(f"a lazy ImageDataset (paths only) needs a positive load_size, got {self.load_size}")
        if self.paths is not None:
            self.paths = [str(p) for p in self.paths]
            if len(self.paths) != n:
                raise ValueError(f"{len(self.paths)} paths but {n} labels")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            bad = int(self.labels.min()) if int(self.labels.min()) < 0 else int(self.labels.max())
            raise ValueError(f"label {bad} is outside the class range 0..{len(self.class_names) - 1}")
        if self.masks is not None and (self.masks.dtype != torch.bool or self.masks.ndim != 3 or len(self.masks) != n):
            raise ValueError(f"masks must be bool (N={n}, H, W), got {self.masks.dtype} {tuple(self.masks.shape)}")
        if self.boxes is not None and tuple(self.boxes.shape) != (n, 4):
            raise ValueError(f"boxes must have shape (N={n}, 4), got {tuple(self.boxes.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = int(self.labels[index])
        if self.images is not None:
            return self.images[index], label
        return _decode_or_black(self.paths[index], int(self.load_size)), label

    def __repr__(self) -> str:
        where = "in memory" if self.images is not None else "lazy from files"
        h, w = self.image_size
        return f"ImageDataset({len(self)} images {h}x{w}, {self.num_classes} classes, {where})"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images `__getitem__` returns."""
        if self.images is not None:
            return int(self.images.shape[2]), int(self.images.shape[3])
        return int(self.load_size), int(self.load_size)

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> ImageDataset:
        """A new dataset with the items at `indices`, in that order (tensors are indexed, not shared views)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        return ImageDataset(
            labels=self.labels[idx],
            class_names=list(self.class_names),
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx.tolist()],
            load_size=self.load_size,
            masks=None if self.masks is None else self.masks[idx],
            boxes=None if self.boxes is None else self.boxes[idx],
        )


def _decode_or_black(path: str, size: int) -> Tensor:
    # Files are validated when the dataset is built, so this only fails if one changed since: a DataLoader worker
    # must not die mid-epoch for that, so warn (naming the file) and hand back a black image instead.
    try:
        return torch.from_numpy(load_image(path, size)).permute(2, 0, 1).contiguous()
    except Exception as e:  # any decoder failure means the same thing here
        warnings.warn(
            f"could not decode {path} ({type(e).__name__}: {e}); using a black image", BadImageWarning, stacklevel=2
        )
        return torch.zeros(3, size, size, dtype=torch.uint8)


@dataclass(eq=False)
class DataSplits:
    """Train/val/test datasets of one source, plus what a training run needs to know about them.

    Attributes:
        train: Training split.
        val: Validation split (carved from train by seed where the source has none).
        test: Test split (the source's official one where it has one).
        class_names: Name of each class index, shared by the three splits.
        skipped: (path, reason) of every file that could not be decoded and was left out.
        source: The spec the data came from, e.g. "digits" or "cifar10:/data/cifar".
        mean: Per-channel mean on the 0..1 scale: computed on train for in-memory sources, ImageNet's for files.
        std: Per-channel standard deviation, like `mean`.
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    class_names: list[str]
    skipped: list[tuple[str, str]]
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (
            f"DataSplits(source={self.source!r}, classes={len(self.class_names)}, train={len(self.train)}, "
            f"val={len(self.val)}, test={len(self.test)}, skipped={len(self.skipped)})"
        )


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions are in [0, 1) and leave something to train on."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training data, got {val_fraction} + {test_fraction}"
        )


def stratified_split(labels: Tensor | np.ndarray, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, ...]:
    """Split indices per class into len(fractions) + 1 parts: the remainder first, then one part per fraction.

    Each class is shuffled with `seed` and cut so every part gets round(n_class * fraction) of it; a part with a
    positive fraction gets at least one image of each class that has at least len(fractions) + 1 of them, and the
    remainder always keeps at least one. Indices in each part are sorted, so datasets keep their source order.

    Args:
        labels: Class index per item.
        fractions: Fraction of every class for each extra part, e.g. (val_fraction, test_fraction).
        seed: Seed for the per-class shuffles; the same seed gives the same split.

    Returns:
        Index arrays (remainder, part_1, ..., part_k).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        counts = [int(round(len(idx) * f)) for f in fractions]
        if len(idx) > len(fractions):
            counts = [max(c, 1) if f > 0 else c for c, f in zip(counts, fractions)]
        while sum(counts) >= len(idx) and any(counts):  # never take the last training image of a class
            counts[int(np.argmax(counts))] -= 1
        start = 0
        for p, c in enumerate(counts, start=1):
            parts[p].append(idx[start : start + c])
            start += c
        parts[0].append(idx[start:])
    return tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts)


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W) on the 0..1 scale, accumulated in float64 chunks."""
    if len(images) == 0:
        raise ValueError("cannot compute normalisation statistics of an empty image set")
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float()
        total += x.sum(dim=(0, 2, 3)).double()  # float32 within a chunk is exact enough (cascade summation)
        total_sq += (x * x).sum(dim=(0, 2, 3)).double()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count / 255.0
    mean_sq = total_sq / count / 255.0**2
    std = (mean_sq - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)  # a constant channel must not give 0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
