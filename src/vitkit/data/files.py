"""Building datasets from lists of image files: validate every file (full decode), report the bad ones, keep the
pixels in memory when they fit. The decoding itself is `vitkit.data.images`; the dataset type is
`vitkit.data.dataset`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from vitkit.data.dataset import ImageDataset
from vitkit.data.images import BadImageWarning, load_image

logger = logging.getLogger(__name__)

# Decode into one uint8 tensor when it fits in this many bytes; larger datasets stay lazy (paths only).
# Module-level so a caller (or a test) can change it.
IN_MEMORY_BYTES = 2 * 1024**3


def _try_load(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_image(path, size), None
    except Exception as e:  # every decoder failure is a bad file to report
        return None, f"{type(e).__name__}: {e}"


def report_skipped(skipped: Sequence[tuple[str, str]], source: str) -> None:
    """Warn once, listing the files that were left out and why."""
    if not skipped:
        return
    shown = "\n".join(f"  {p}: {r}" for p, r in skipped[:20])
    more = f"\n  ... and {len(skipped) - 20} more (see DataSplits.skipped)" if len(skipped) > 20 else ""
    warnings.warn(f"skipped {len(skipped)} bad file(s) in {source}:\n{shown}{more}", BadImageWarning, stacklevel=3)


def decode_files(
    paths: Sequence[str], labels: Sequence[int], class_names: list[str], size: int, *, strict: bool, in_memory: bool
) -> tuple[ImageDataset, list[tuple[str, str]]]:
    """Validate every file (full decode) and build a dataset from the good ones.

    Args:
        paths: Image files.
        labels: Class index of each file.
        class_names: Name of each class index.
        size: Side of the square each image is decoded to.
        strict: Raise on the first bad file instead of skipping it.
        in_memory: Keep the decoded pixels (one uint8 tensor) rather than only the paths.

    Returns:
        The dataset of good files, and (path, reason) for each bad one.

    Raises:
        ValueError: With `strict`, naming the first bad file and why it failed.
    """
    n = len(paths)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8) if in_memory else None
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    workers = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        results = pool.map(lambda p: _try_load(p, size), paths)
        for i, (array, reason) in enumerate(tqdm(results, total=n, desc="decoding images", disable=n < 2000)):
            if array is None:
                if strict:
                    raise ValueError(f"cannot decode image {paths[i]}: {reason} (pass strict=False to skip bad files)")
                skipped.append((paths[i], reason))
                continue
            if images is not None:
                images[len(keep)] = torch.from_numpy(array).permute(2, 0, 1)
            keep.append(i)
    finally:
        pool.shutdown(cancel_futures=True)  # after a strict failure, do not decode the rest
    for path, reason in skipped:
        logger.debug("skipping %s: %s", path, reason)
    dataset = ImageDataset(
        labels=[labels[i] for i in keep],
        class_names=class_names,
        images=None if images is None else images[: len(keep)].clone() if skipped else images,
        paths=[paths[i] for i in keep],
        load_size=size,
    )
    return dataset, skipped


def fits_in_memory(count: int, size: int) -> bool:
    """Whether `count` RGB uint8 images of size x size fit in the `IN_MEMORY_BYTES` budget."""
    return count * 3 * size * size <= IN_MEMORY_BYTES


def check_classes_present(dataset: ImageDataset, skipped: Sequence[tuple[str, str]], where: str) -> None:
    """Raise ValueError naming any class left without a single good image."""
    counts = torch.bincount(dataset.labels, minlength=dataset.num_classes)
    empty = [dataset.class_names[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        extra = f" ({len(skipped)} bad file(s) were skipped: see the warning)" if skipped else ""
        raise ValueError(f"class(es) {empty} in {where} have no readable images{extra}")
