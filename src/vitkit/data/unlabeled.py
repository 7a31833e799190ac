"""Images without labels, for self-supervised pretraining (MAE): a folder of image files, or any data spec with its
labels ignored.

    splits = load_unlabeled("photos/", load_size=64)      # photos/*.jpg, no class subfolders
    splits = load_unlabeled("shapes:2000")                 # any vitkit.data spec: its labels are kept but unused

A flat folder becomes one class named "image" (so the splits, loaders and checkpoints of labelled data apply
unchanged) split at random by `seed`; everything else is `vitkit.data.load_data`.
"""

from __future__ import annotations

import os

import torch

from vitkit.data.dataset import IMAGENET_MEAN, IMAGENET_STD, DataSplits, check_fractions, stratified_split
from vitkit.data.files import decode_files, fits_in_memory, report_skipped
from vitkit.data.images import IMAGE_EXTENSIONS, is_image_file
from vitkit.data.load import DEFAULT_FILE_LOAD_SIZE, load_data

UNLABELED_CLASS = "image"  # the one class name of a flat folder


def flat_image_folder(spec: str | os.PathLike) -> str | None:
    """The folder a spec names when it holds image files directly and no subfolders (None otherwise).

    A folder with subfolders is left to `load_data` (class subfolders, or train/ val/ test/ splits).
    """
    text = os.fspath(spec)
    path = os.path.expanduser(text.removeprefix("folder:"))
    if not os.path.isdir(path):
        return None
    with os.scandir(path) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    if any(e.is_dir() for e in entries) or not any(e.is_file() and is_image_file(e.name) for e in entries):
        return None
    return path


def load_unlabeled(
    spec: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strict: bool = False,
    load_size: int | None = None,
    shapes_size: int = 64,
) -> DataSplits:
    """Train/val/test splits of images whose labels a self-supervised objective ignores.

    Args:
        spec: a folder of image files (no subfolders; one class "image"), or any `load_data` spec (digits,
            shapes[:N], a class-folder tree, csv:FILE, cifar10:DIR ...), whose labels are then unused.
        seed: fixes the random split.
        val_fraction: share held out for validation (the reconstruction loss that picks best/).
        test_fraction: share held out for the final test loss.
        strict: raise on the first unreadable image instead of skipping it.
        load_size: side images are decoded to (default 224 for files).
        shapes_size: side of the procedural shapes images.

    Raises:
        ValueError: as `load_data`; for a flat folder, one without a readable image.
    """
    folder = flat_image_folder(spec)
    text = os.fspath(spec)
    path = os.path.expanduser(text.removeprefix("folder:"))
    if folder is None and text != "digits" and not text.startswith("shapes") and os.path.isdir(path):
        with os.scandir(path) as it:
            if not any(e.is_dir() for e in it if not e.name.startswith(".")):  # load_data would ask for class folders
                raise ValueError(
                    f"folder {path} has no image files ({', '.join(IMAGE_EXTENSIONS)}): pretraining reads a folder "
                    "of images, or a tree of class folders whose labels it ignores"
                )
    if folder is None:
        return load_data(
            spec,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            strict=strict,
            load_size=load_size,
            shapes_size=shapes_size,
        )
    check_fractions(val_fraction, test_fraction)
    size = DEFAULT_FILE_LOAD_SIZE if load_size is None else load_size
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if is_image_file(n) and not n.startswith("."))
    skipped = [
        (os.path.join(folder, n), f"not an image file (supported extensions: {', '.join(IMAGE_EXTENSIONS)})")
        for n in sorted(os.listdir(folder))
        if not n.startswith(".") and not is_image_file(n)
    ]
    if strict and skipped:
        raise ValueError(f"cannot decode image {skipped[0][0]}: {skipped[0][1]} (pass strict=False to skip bad files)")
    dataset, bad = decode_files(
        paths, [0] * len(paths), [UNLABELED_CLASS], size, strict=strict, in_memory=fits_in_memory(len(paths), size)
    )
    skipped += bad
    report_skipped(skipped, folder)
    if len(dataset) == 0:
        raise ValueError(f"no readable image in {folder} ({len(skipped)} file(s) skipped)")
    train_idx, val_idx, test_idx = stratified_split(
        torch.zeros(len(dataset), dtype=torch.long), (val_fraction, test_fraction), seed
    )
    splits = DataSplits(
        dataset.subset(train_idx),
        dataset.subset(val_idx),
        dataset.subset(test_idx),
        [UNLABELED_CLASS],
        skipped,
        os.fspath(spec),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    return splits
