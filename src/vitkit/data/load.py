"""One entry point for every data source: `load_data(spec)` -> train/val/test splits, plus ready-made loaders."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from vitkit.data.cifar import load_cifar
from vitkit.data.dataset import DataSplits, ImageDataset, channel_stats, check_fractions, stratified_split
from vitkit.data.digits import DIGITS_CLASSES, load_digits_images
from vitkit.data.folders import load_csv, load_folder
from vitkit.data.idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, load_idx_dataset
from vitkit.data.images import resize_center_crop
from vitkit.data.shapes import SHAPE_CLASSES, make_shapes

DEFAULT_FILE_LOAD_SIZE = 224
_PREFIXES = ("folder", "csv", "cifar10", "cifar100", "mnist", "fashion-mnist")
SPEC_FORMS = """accepted data specs:
  digits                          scikit-learn's bundled 8x8 handwritten digits
  shapes | shapes:N               procedural circles/squares/triangles/stars with masks and boxes (N images)
  PATH | folder:PATH              a folder of class subfolders, or of train/ val/ test/ folders holding them
  csv:FILE | FILE.csv             a CSV of path,label rows
  cifar10:DIR | cifar100:DIR      the python-pickle CIFAR archive unpacked in DIR
  mnist:DIR | fashion-mnist:DIR   the IDX files (raw or .gz) in DIR"""


def _parse_spec(spec: str) -> tuple[str, str | None]:
    """(source kind, argument) for a data spec, without touching the filesystem beyond the plain-path case."""
    if spec == "digits":
        return "digits", None
    if spec == "shapes" or spec.startswith("shapes:"):
        return "shapes", spec.partition(":")[2] or None
    if spec == "scenes" or spec.startswith("scenes:"):
        raise ValueError(
            f"data spec {spec!r} is segmentation data (a class per pixel): train on it with --task segment, evaluate "
            f"a segmentation checkpoint on it\n{SPEC_FORMS}"
        )
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in _PREFIXES:
        if not rest:
            raise ValueError(f"data spec {spec!r} is missing the path after '{prefix}:'\n{SPEC_FORMS}")
        return prefix, os.path.expanduser(rest)
    path = os.path.expanduser(spec)
    if spec.lower().endswith(".csv"):
        return "csv", path
    if os.path.isdir(path):
        return "folder", path
    if os.path.exists(path):
        raise ValueError(f"data spec {spec!r} is a file but not a .csv: give a folder or a CSV\n{SPEC_FORMS}")
    raise ValueError(f"unknown data spec {spec!r}: not a known source and no such path exists\n{SPEC_FORMS}")


def _resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, 3, size, size) through the same decode-size step as image files."""
    if tuple(images.shape[2:]) == (size, size):
        return images
    hwc = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) view
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i in range(len(images)):
        out[i] = resize_center_crop(hwc[i], size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _in_memory_splits(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor] | None,
    class_names: list[str],
    *,
    spec: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    load_size: int | None,
    masks: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
) -> DataSplits:
    if load_size is not None:
        train_x = _resize_images(train_x, load_size)
        test = None if test is None else (_resize_images(test[0], load_size), test[1])
    full = ImageDataset(labels=train_y, class_names=class_names, images=train_x, masks=masks, boxes=boxes)
    if test is None:
        train_idx, val_idx, test_idx = stratified_split(full.labels, (val_fraction, test_fraction), seed)
        test_ds = full.subset(test_idx)
    else:  # the source's own test split; only val is carved from train
        train_idx, val_idx = stratified_split(full.labels, (val_fraction,), seed)
        test_ds = ImageDataset(labels=test[1], class_names=class_names, images=test[0])
    train, val = full.subset(train_idx), full.subset(val_idx)
    mean, std = channel_stats(train.images)
    return DataSplits(train, val, test_ds, class_names, [], spec, mean, std)


def load_data(
    spec: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strict: bool = False,
    load_size: int | None = None,
    shapes_size: int = 64,
    shapes_count: int = 2000,
    shapes_hw: tuple[int, int] | None = None,
) -> DataSplits:
    """Load a dataset and split it into train/val/test.

    Args:
        spec: Which data: "digits", "shapes" / "shapes:N", a folder PATH / "folder:PATH", "csv:FILE" / FILE.csv,
            "cifar10:DIR", "cifar100:DIR", "mnist:DIR" or "fashion-mnist:DIR" (see `SPEC_FORMS`).
        seed: Fixes the split (and the shapes images): the same seed always gives the same splits.
        val_fraction: Share of each class held out for validation.
        test_fraction: Share of each class held out for testing; ignored by sources with an official test split
            (CIFAR, MNIST) and by folders that have a test/ folder.
        strict: Raise ValueError on the first unreadable image file instead of skipping and reporting it.
        load_size: Side of the square images are decoded to. Default 224 for folders and CSVs; other sources keep
            their native size unless it is given (then shorter side resized and centre-cropped). Not for shapes.
        shapes_size: Side of the shapes images.
        shapes_count: Number of shapes images when the spec is plain "shapes".
        shapes_hw: (H, W) of the shapes images, overriding `shapes_size` for non-square images.

    Returns:
        The splits, class names, skipped files and normalisation statistics.

    Raises:
        ValueError: Unknown spec, missing path, empty dataset, a class without images, fewer than 2 classes,
            an out-of-range label, a malformed file, or (with `strict`) an unreadable image.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data spec must be a string or path, got {type(spec).__name__}\n{SPEC_FORMS}")
    spec = os.fspath(spec).strip()
    check_fractions(val_fraction, test_fraction)
    if load_size is not None and (not isinstance(load_size, int) or load_size <= 0):
        raise ValueError(f"load_size must be a positive integer or None, got {load_size!r}")
    kind, arg = _parse_spec(spec)
    common = dict(spec=spec, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, load_size=load_size)

    if kind == "digits":
        images, labels = load_digits_images()
        return _in_memory_splits(images, labels, None, DIGITS_CLASSES, **common)

    if kind == "shapes":
        if load_size is not None:
            raise ValueError(f"load_size={load_size} does not apply to shapes: use shapes_size or shapes_hw")
        count = shapes_count
        if arg is not None:
            if not arg.isdigit() or int(arg) <= 0:
                raise ValueError(f"shapes:N needs a positive integer N, got {spec!r}")
            count = int(arg)
        height, width = shapes_hw if shapes_hw is not None else (shapes_size, shapes_size)
        images, labels, masks, boxes = make_shapes(count, int(height), int(width), seed)
        return _in_memory_splits(images, labels, None, SHAPE_CLASSES, masks=masks, boxes=boxes, **common)

    assert arg is not None  # every other kind carries a path
    if not os.path.exists(arg):
        raise ValueError(f"path {arg!r} (from data spec {spec!r}) does not exist")
    if kind in ("folder", "csv"):
        if kind == "folder" and not os.path.isdir(arg):
            raise ValueError(f"{arg!r} is not a folder (from data spec {spec!r})")
        loader = load_folder if kind == "folder" else load_csv
        size = DEFAULT_FILE_LOAD_SIZE if load_size is None else load_size
        splits = loader(
            arg, load_size=size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, strict=strict
        )
        splits.source = spec
        return splits

    if not os.path.isdir(arg):
        raise ValueError(f"{kind} needs a folder, but {arg!r} is not one (from data spec {spec!r})")
    if kind in ("cifar10", "cifar100"):
        train_x, train_y, test_x, test_y, class_names = load_cifar(arg, kind)
    else:
        class_names = MNIST_CLASSES if kind == "mnist" else FASHION_MNIST_CLASSES
        train_x, train_y, test_x, test_y = load_idx_dataset(arg, class_names)
    return _in_memory_splits(train_x, train_y, (test_x, test_y), class_names, **common)


def get_data_loaders(
    data_dir: str = "digits", batch_size: int = 128, img_size: int = 32, seed: int = 0, num_workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of uint8 batches `(images (B, 3, H, W), labels (B,))`.

    Apply `TrainTransform` / `EvalTransform` to the batches (on any device) to get model inputs.

    Args:
        data_dir: Any `load_data` spec.
        batch_size: Images per batch.
        img_size: Decode size for file-based sources (folders, CSVs); in-memory sources keep their native size.
        seed: Seeds the split and the train shuffle, so two runs see the same batches in the same order.
        num_workers: DataLoader worker processes.

    Returns:
        (train_loader, val_loader); the train loader reshuffles every epoch, the val loader keeps order.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kind, _ = _parse_spec(os.fspath(data_dir).strip())
    splits = load_data(data_dir, seed=seed, load_size=img_size if kind in ("folder", "csv") else None)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers)
    val = DataLoader(splits.val, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train, val
