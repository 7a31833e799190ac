"""The one image decoder, the decode-size step, and building datasets from lists of files.

Every image that reaches a model (training folders, `evaluate`, `predict`, `explain`, `visualize`, the explorer)
is decoded by `decode_image`: files are fully decoded (so truncated files fail here, not mid-epoch) and turned
upright by their EXIF orientation; every PIL mode, array and tensor becomes 8-bit RGB with 16-bit values rescaled
and transparency composited on white. File datasets then go through `load_image` (shorter side resized to `size`,
centre crop); `vitkit.data.inference` repeats that step for single images so a file gives the same model input
whichever entry point reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

logger = logging.getLogger(__name__)


class BadImageWarning(UserWarning):
    """An image file could not be decoded and was skipped (or, lazily, replaced by a black image)."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

ImageLike = Any  # a path, a PIL image, an (H, W[, C]) array or a (C, H, W) tensor: see `decode_image`


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether `path` has one of the supported image extensions (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Image files named by `paths` (one path or several), where a folder stands for every image file under it.

    A folder is walked recursively and its files are sorted by path; hidden entries (a leading dot) and files
    without an image extension (`IMAGE_EXTENSIONS`) are skipped. A file given by name is kept whatever its
    extension, so the decoder says what is wrong with it.

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: A folder with no image file under it.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):  # one path, not a sequence of one-letter paths
        paths = [paths]
    files: list[str] = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and is_image_file(f)]
            if not found:
                raise ValueError(f"folder {path!r} has no image files (supported: {', '.join(IMAGE_EXTENSIONS)})")
            files += sorted(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image {path!r} does not exist")
    return files


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


def _array_to_pil(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) uint8 / uint16 / float-in-[0, 1] array -> a PIL image that `to_rgb` understands."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.dtype == np.uint16:
        if a.ndim == 3:  # PIL has no 16-bit RGB mode: rescale here the way `to_rgb` does for 16-bit gray
            a = np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        else:
            return Image.fromarray(np.ascontiguousarray(a))  # mode I;16
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 1):
            raise ValueError(
                f"a float image array must hold values in [0, 1], got range [{np.nanmin(a):g}, {np.nanmax(a):g}]"
            )
        a = np.rint(np.nan_to_num(a) * 255).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise TypeError(f"an image array must be uint8, uint16, bool or float in [0, 1], got {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))  # L, RGB or RGBA by shape


def decode_image(image: ImageLike) -> np.ndarray:
    """Any image input -> an upright RGB uint8 array (H, W, 3): the one decoder every entry point uses.

    Args:
        image: An image file path (fully decoded, EXIF orientation applied), a PIL image of any mode (EXIF
            orientation applied), an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8, uint16 or float in
            [0, 1], or a tensor (1|3|4, H, W) of the same dtypes. 16-bit values are rescaled to 8 bits and
            transparency is composited on white (see `to_rgb`).

    Returns:
        A writable uint8 array (H, W, 3).

    Raises:
        FileNotFoundError: A path that is not a file.
        ValueError: An empty file, a bad shape or out-of-range float values; PIL's own error for a corrupt file.
        TypeError: An unsupported input type or dtype.
    """
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {str(image)!r} does not exist")
        if os.path.getsize(image) == 0:
            raise ValueError("empty file (0 bytes)")
        with Image.open(image) as img:
            img.load()  # decode everything now: a truncated file fails here
            return np.array(to_rgb(ImageOps.exif_transpose(img)), dtype=np.uint8)
    if isinstance(image, Image.Image):
        return np.array(to_rgb(ImageOps.exif_transpose(image)), dtype=np.uint8)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be (3, H, W), (1, H, W) or (4, H, W), got shape {tuple(t.shape)}")
        if t.is_floating_point():
            t = t.float()  # numpy has no bfloat16
        image = t.permute(1, 2, 0).numpy()  # (H, W, C)
    if isinstance(image, np.ndarray):
        return np.array(to_rgb(_array_to_pil(image)), dtype=np.uint8)
    raise TypeError(
        f"cannot read an image from {type(image).__name__}; give a path, a PIL image, an (H, W[, C]) array "
        "or a (C, H, W) tensor"
    )


@contextlib.contextmanager
def naming_the_file(image: Any) -> Iterator[None]:
    """Around decoding `image`: a corrupt or unreadable file's error (PIL's OSError, ValueError, the SyntaxError some
    of its plugins raise for a broken file, or its DecompressionBombError for an image too large to decode safely)
    becomes a ValueError that names the file, in one line. A missing file's FileNotFoundError, and errors for inputs
    that are not paths, pass unchanged."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if not isinstance(image, (str, os.PathLike)):
            raise
        raise ValueError(f"cannot decode image {image}: {type(e).__name__}: {e}") from None


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The decode-size step: shorter side resized to `size` (bicubic, aspect kept), central size x size crop.

    Args:
        image: uint8 (H, W, 3).
        size: Side of the square output, in pixels.

    Returns:
        uint8 (size, size, 3).
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(np.ascontiguousarray(image))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image file (`decode_image`) and apply the decode-size step: RGB uint8 (size, size, 3).

    Raises:
        ValueError: The file is empty.
        Exception: Whatever PIL raises for a corrupt, truncated or non-image file.
    """
    return resize_center_crop(decode_image(path), size)
