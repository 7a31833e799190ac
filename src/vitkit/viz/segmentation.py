"""Segmentation pictures: a predicted (or true) mask blended over its image, with a legend of class colours and pixel
shares (what `vitkit predict` writes for a segmentation checkpoint)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitkit._io import atomic_path

# Class 0 (background) is left uncoloured; objects take matplotlib's tab10 colours in order.
_TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def class_colours(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: black for class 0 (background), then tab10 cycled."""
    colours = [(0, 0, 0)] + [_TAB10[(k - 1) % len(_TAB10)] for k in range(1, num_classes)]
    return np.array(colours[:num_classes], dtype=np.uint8).reshape(-1, 3)


def overlay_mask(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.55) -> np.ndarray:
    """The image (H, W, 3) uint8 with every non-background pixel of `mask` (H, W) tinted by its class colour.

    Raises:
        ValueError: image and mask sizes differ, or alpha is outside [0, 1].
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} must have the same height and width")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = class_colours(num_classes)
    tint = colours[np.clip(mask, 0, num_classes - 1)].astype(np.float32)
    out = image.astype(np.float32)
    objects = (mask > 0) & (mask < num_classes)  # background and ignored (255) pixels keep the image
    out[objects] = (1 - alpha) * out[objects] + alpha * tint[objects]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    shares: Mapping[str, float] | None = None,
    min_side: int = 256,
) -> Path:
    """Write a PNG: the image and its overlay side by side (enlarged with nearest to at least `min_side` px high),
    above a legend of the classes present (colour, name, share of the pixels). Written atomically.

    Returns:
        The path written.
    """
    k = len(class_names)
    blended = overlay_mask(image, mask, k)
    scale = max(1, int(np.ceil(min_side / image.shape[0])))
    pair = np.concatenate([image, np.full((image.shape[0], 2, 3), 255, np.uint8), blended], axis=1)
    pair = np.asarray(Image.fromarray(pair).resize((pair.shape[1] * scale, pair.shape[0] * scale), Image.NEAREST))
    shown = [c for c in range(k) if shares is None or shares.get(class_names[c], 0.0) > 0]
    row_h = 16
    canvas = Image.new("RGB", (pair.shape[1], pair.shape[0] + row_h * len(shown) + 6), (255, 255, 255))
    canvas.paste(Image.fromarray(pair), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = class_colours(k)
    for i, c in enumerate(shown):
        y = pair.shape[0] + 3 + i * row_h
        draw.rectangle([4, y + 2, 16, y + 12], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
        share = f"  {100 * shares[class_names[c]]:.1f}% of pixels" if shares is not None else ""
        draw.text((22, y), f"{class_names[c]}{share}", fill=(0, 0, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def save_mask(mask: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Write `mask` (H, W) as a palette PNG whose indices are the classes (the format the mask folders read back),
    coloured as the overlays. Written atomically."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    palette = class_colours(len(class_names)).reshape(-1).tolist()
    img.putpalette(palette + [255, 255, 255] * (256 - len(class_names)))
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_prediction_grid(
    images: Sequence[np.ndarray],
    true_masks: Sequence[np.ndarray],
    pred_masks: Sequence[np.ndarray],
    class_names: Sequence[str],
    path: str | os.PathLike,
    scale: int = 3,
) -> Path:
    """Write a PNG with one row per image: the image, the true mask over it, the predicted mask over it (enlarged
    `scale` times with nearest), and a legend row of the class colours. Written atomically.

    Raises:
        ValueError: the three sequences differ in length or are empty.
    """
    if not images or not len(images) == len(true_masks) == len(pred_masks):
        raise ValueError(f"need as many images, true and predicted masks (and at least one): "
                         f"{len(images)}, {len(true_masks)}, {len(pred_masks)}")  # fmt: skip
    k = len(class_names)
    gap = 4
    rows = []
    for image, truth, pred in zip(images, true_masks, pred_masks):
        sep = np.full((image.shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([image, sep, overlay_mask(image, truth, k), sep, overlay_mask(image, pred, k)], 1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    grid = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (grid.width, grid.height + 36), (255, 255, 255))
    canvas.paste(grid, (0, 20))
    draw = ImageDraw.Draw(canvas)
    third = (grid.width + 2 * gap * scale) // 3
    for i, title in enumerate(("image", "true mask", "predicted mask")):
        draw.text((i * third + 4, 4), title, fill=(0, 0, 0))
    x = 4
    for c, colour in enumerate(class_colours(k)[1:], start=1):
        draw.rectangle([x, grid.height + 24, x + 10, grid.height + 34], fill=tuple(int(v) for v in colour))
        draw.text((x + 14, grid.height + 23), class_names[c], fill=(0, 0, 0))
        x += 14 + 7 * len(class_names[c]) + 12
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def output_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """File names (without extension) for the pictures of `paths`, distinct for distinct inputs.

    The input's stem when the stems are all different (`scene.png` -> `scene`); otherwise its path relative to the
    inputs' common folder (`a/0.png`, `b/0.png` -> `a/0`, `b/0`), with the extension kept where that still collides
    (`0.png`, `0.jpg` -> `0.png`, `0.jpg`), so that no picture overwrites another.
    """
    resolved = [Path(p).resolve() for p in paths]
    stems = [p.stem for p in resolved]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    relative = [p.relative_to(root) for p in resolved]
    names = [str(r.with_suffix("")) for r in relative]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in relative]
