"""Detections drawn on images: a box, the class name and the score per object, one colour per class (PIL)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vitkit._io import atomic_write_bytes

# Tableau-10: distinct on light and dark backgrounds, and the same colour for a class in every picture.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def draw_detections(image: np.ndarray, detections: Sequence[dict[str, Any]], scale: int | None = None) -> Image.Image:
    """An RGB picture of `image` with each detection's box and "class score" label.

    Args:
        image: uint8 (H, W, 3).
        detections: [{"box": [x0, y0, x1, y1] pixels of `image`, "label": class index, "class": name, "score"}].
        scale: integer upscaling before drawing (nearest), so boxes and text are legible on tiny images; None picks
            the smallest factor that makes the longer side at least 384 pixels.

    Raises:
        ValueError: an image that is not (H, W, 3) uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if scale is None:
        scale = max(1, -(-384 // max(h, w)))
    pic = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(pic)
    font = ImageFont.load_default()
    for d in detections:
        colour = PALETTE[int(d["label"]) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) * scale for v in d["box"])
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(2, scale // 2))
        text = f"{d['class']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + (right - left) + 4, ty + (bottom - top) + 2], fill=colour)
        draw.text((x0 + 2, ty), text, fill=(255, 255, 255), font=font)
    return pic


def save_detection_images(results: Sequence[dict[str, Any]], out: str | os.PathLike) -> list[Path]:
    """Write `<out>/<image stem>_detections.png` for each `predict_detection` result (atomically); a stem used
    twice gets a numeric suffix. Returns the paths written."""
    out = Path(out)
    paths: list[Path] = []
    used: set[str] = set()
    for r in results:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(r["path"]).stem) or "image"
        name, i = f"{stem}_detections.png", 2
        while name in used:
            name, i = f"{stem}_{i}_detections.png", i + 1
        used.add(name)
        buf = io.BytesIO()
        draw_detections(r["image"], r["detections"]).save(buf, format="PNG")
        atomic_write_bytes(out / name, buf.getvalue())
        paths.append(out / name)
    return paths


def detection_grid(pictures: Sequence[Image.Image], columns: int = 4, gap: int = 4) -> Image.Image:
    """Pictures (e.g. from `draw_detections`) tiled row by row on white, each cell the size of the largest."""
    if not pictures:
        raise ValueError("no pictures to tile")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    w = max(p.width for p in pictures)
    h = max(p.height for p in pictures)
    rows = -(-len(pictures) // columns)
    cols = min(columns, len(pictures))
    grid = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (255, 255, 255))
    for i, p in enumerate(pictures):
        grid.paste(p, ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return grid
