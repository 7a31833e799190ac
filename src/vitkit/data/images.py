"""Decoding image files into RGB uint8 arrays of one size, and building datasets from lists of files.

Every file goes through `load_image`: open, full decode (so truncated files fail here, not mid-epoch), EXIF
orientation, conversion of every PIL mode to 8-bit RGB, shorter side resized to `size`, centre crop.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from vitkit.data.dataset import BadImageWarning, ImageDataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Decode into one uint8 tensor when it fits in this many bytes; larger datasets stay lazy (paths only).
# Module-level so a caller (or a test) can change it.
IN_MEMORY_BYTES = 2 * 1024**3
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether `path` has one of the supported image extensions (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: transparency is composited on white, 16/32-bit values are rescaled."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert("L") clips 16-bit values at 255 instead of rescaling, which turns most images white.
        values = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 65535 / 257 == 255
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if values.size and values.max() <= 1.0:  # float images are usually 0..1
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic, aspect kept), then crop the central size x size square."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image file to an RGB uint8 array (size, size, 3).

    Raises:
        ValueError: The file is empty.
        Exception: Whatever PIL raises for a corrupt, truncated or non-image file.
    """
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as img:
        img.load()  # decode everything now: a truncated file fails here
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    return np.array(resize_center_crop(img, size), dtype=np.uint8)


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
