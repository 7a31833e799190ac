"""Detections drawn on images: a box, the class name and the score per object, one colour per class (PIL); and the
explanation figures of `vitkit explain` on a detector (matplotlib): DETR's per-query cross-attention with its box."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
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


# ----------------------------------------------------------------------------------------------------------------
# Explanations (`vitkit explain` on a detector): matplotlib figures as the other explain figures
# ----------------------------------------------------------------------------------------------------------------
def _draw_box(ax: Any, d: dict[str, Any], name: str, colour: tuple[int, int, int]) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = d["box"]
    c = tuple(v / 255 for v in colour)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.8))
    ax.text(x0 - 0.5, y0 - 0.5, f"{name} {d['score']:.2f}", color="white", fontsize=7, va="bottom",
            bbox={"facecolor": c, "edgecolor": "none", "pad": 1})  # fmt: skip


def plot_detr_attention(
    image: np.ndarray,
    detections: Sequence[dict[str, Any]],
    maps: Sequence[Any],
    class_names: Sequence[str],
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """DETR's Fig. 6: the image with every drawn box, then per detection its query's map over the image with its box.

    Args:
        image: uint8 (H, W, 3), the picture the boxes are given in (any aspect ratio).
        detections: [{"box": xyxy pixels of `image`, "label", "score"}] (see `query_detections`).
        maps: one (H', W') map per detection (tensor or array), resized to the image and scaled to [0, 1] each.
        class_names: name of each class index.
        title: figure title.
        alpha: opacity of the maps.
        cmap: matplotlib colormap of the maps.
        save_path: where to write the figure, or None.

    Raises:
        ValueError: not one map per detection.
    """
    from vitkit.viz._common import finish, hide_ticks, new_figure, upsample_map

    if len(maps) != len(detections):
        raise ValueError(f"got {len(maps)} maps for {len(detections)} detections (one map per detection)")
    n = len(detections) + 1
    cols = min(n, 4)
    rows = -(-n // cols)
    h, w = image.shape[:2]
    fig = new_figure(3.0 * cols, 3.0 * rows * h / w + 0.5)
    axes = np.asarray(fig.subplots(rows, cols)).reshape(-1)
    axes[0].imshow(image)
    axes[0].set_title("detections", fontsize=9)
    for j, d in enumerate(detections):
        colour = PALETTE[int(d["label"]) % len(PALETTE)]
        name = class_names[int(d["label"])]
        _draw_box(axes[0], d, name, colour)
        ax = axes[j + 1]
        ax.imshow(image)
        ax.imshow(upsample_map(maps[j], (h, w)), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        _draw_box(ax, d, name, colour)
        ax.set_title(f"query {d['query']}" if "query" in d else name, fontsize=9)
    for ax in axes:
        hide_ticks(ax)
    for ax in axes[n:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, save_path)


def save_detection_explanations(
    model: Any,
    images: Sequence[Any],
    out_dir: str | os.PathLike,
    method: str = "cross-attention",
    layer: int | None = None,
    head: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    threshold: float = 0.5,
    max_queries: int = 6,
) -> list[tuple[Path, str]]:
    """Write `<image stem>_<method>.png` per image (what `vitkit explain` writes for a detector); returns (path, one
    line) per image.

    "cross-attention": per detected query (score >= `threshold`, at most `max_queries`; the best query alone when
    none reaches it, said in the title) its decoder cross-attention (layer `layer`, default the last) with its box.
    "attention", "rollout", "flow": the backbone's map over the image beside the detections.

    Raises:
        ValueError: a method that does not apply to detectors (naming those that do), no images, a bad threshold.
    """
    from vitkit.explain.cross_attention import detr_cross_attention, query_detections
    from vitkit.explain.dense import backbone_attention, check_dense_method, prepare_dense_images

    check_dense_method(model, method)
    displays, x = prepare_dense_images(images, model)
    sizes = [d.shape[:2] for d in displays]
    cross = detr_cross_attention(model, x, layer=-1 if layer is None or method != "cross-attention" else layer,
                                 head=head if method == "cross-attention" else None, head_fusion=head_fusion)  # fmt: skip
    shown = query_detections(cross, sizes, threshold=threshold, max_queries=max_queries)
    if method != "cross-attention":
        maps = backbone_attention(
            model, x, method, layer=layer, head=head, head_fusion=head_fusion, discard_ratio=discard_ratio
        )
    names = model.preprocess.class_names or [str(k) for k in range(model.num_classes)]
    out_dir = Path(out_dir)
    written, used = [], set()
    for i, (image, display, dets) in enumerate(zip(images, displays, shown, strict=True)):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(image).stem) if isinstance(image, (str, os.PathLike)) else ""
        stem, k = stem or f"image{i}", 2
        name = f"{stem}_{method}.png"
        while name in used:
            name, k = f"{stem}_{k}_{method}.png", k + 1
        used.add(name)
        below = dets[0]["below_threshold"]
        found = (f"no query scored >= {threshold:g}; the best one shown" if below
                 else f"{len(dets)} detection(s) with score >= {threshold:g}")  # fmt: skip
        if method == "cross-attention":
            title = f"decoder layer {cross.layer} cross-attention; {found}"
            query_maps = [cross.maps[i, d["query"]] for d in dets]
        else:
            what = method if method != "attention" else f"attention layer {-1 if layer is None else layer}"
            title = f"backbone {what} (mean of the patch queries); {found}"
            query_maps = None
        path = out_dir / name
        if query_maps is None:
            _plot_detections_and_map(display, dets, maps[i], names, title, path)
        else:
            plot_detr_attention(display, dets, query_maps, names, title=title, save_path=path)
        written.append((path, f"{path}: {title}"))
    return written


def _plot_detections_and_map(
    image: np.ndarray, detections: Sequence[dict[str, Any]], saliency: Any, class_names: Sequence[str], title: str,
    save_path: Path,
) -> Figure:  # fmt: skip
    """Two panels: the image with its boxes, and one map over the image."""
    from vitkit.viz._common import finish, hide_ticks, new_figure, upsample_map

    h, w = image.shape[:2]
    fig = new_figure(7.0, 3.5 * h / w + 0.5)
    axes = fig.subplots(1, 2)
    axes[0].imshow(image)
    for d in detections:
        _draw_box(axes[0], d, class_names[int(d["label"])], PALETTE[int(d["label"]) % len(PALETTE)])
    axes[0].set_title("detections", fontsize=9)
    axes[1].imshow(image)
    axes[1].imshow(upsample_map(saliency, (h, w)), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1].set_title("map", fontsize=9)
    for ax in axes:
        hide_ticks(ax)
    fig.suptitle(title, fontsize=10)
    return finish(fig, save_path)
