"""Segmentation pictures: a predicted (or true) mask blended over its image, with a legend of class colours and pixel
shares (what `vitkit predict` writes for a segmentation checkpoint), and the explanation figures of `vitkit explain`
(image, predicted mask, map)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
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


# ----------------------------------------------------------------------------------------------------------------
# Explanations (`vitkit explain` on a segmentation checkpoint): matplotlib figures as the other explain figures
# ----------------------------------------------------------------------------------------------------------------
def plot_segmentation_explanation(
    image: np.ndarray,
    mask: np.ndarray,
    saliency: Any,
    class_names: Sequence[str],
    title: str | None = None,
    region: np.ndarray | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """The image, its predicted mask over it (with a legend of the classes present) and a map over it.

    Args:
        image: uint8 (H, W, 3), the picture drawn on (any aspect ratio).
        mask: (H, W) predicted class per pixel of `image`.
        saliency: (H', W') map on the model's grid (tensor or array); resized to the image and scaled to [0, 1].
        class_names: name of each class (index 0 = background, left uncoloured).
        title: figure title.
        region: optional (H, W) boolean mask outlined on the map (the region a class-conditioned map explains).
        alpha: opacity of the map.
        cmap: matplotlib colormap of the map.
        save_path: where to write the figure, or None.

    Raises:
        ValueError: image and mask sizes differ.
    """
    from matplotlib.patches import Patch

    from vitkit.viz._common import finish, hide_ticks, new_figure, upsample_map

    k = len(class_names)
    blended = overlay_mask(image, np.asarray(mask), k)
    heat = upsample_map(saliency, image.shape[:2])
    fig = new_figure(10.5, 3.8 * image.shape[0] / image.shape[1] + 0.9)
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(blended)
    axes[1].set_title("predicted mask")
    present = [c for c in range(1, k) if (np.asarray(mask) == c).any()]
    colours = class_colours(k)
    if present:
        handles = [Patch(color=colours[c] / 255.0, label=class_names[c]) for c in present]
        axes[1].legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.02), fontsize=7, ncol=2,
                       framealpha=0.8)  # fmt: skip
    axes[2].imshow(image)
    axes[2].imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    if region is not None and np.asarray(region).any():
        axes[2].contour(np.asarray(region, dtype=float), levels=[0.5], colors="white", linewidths=1.2)
    axes[2].set_title("map")
    for ax in axes:
        hide_ticks(ax)
    if title:
        fig.suptitle(title)
    return finish(fig, save_path)


def save_segmentation_explanations(
    model: Any,
    images: Sequence[Any],
    out_dir: str | os.PathLike,
    method: str = "gradcam",
    layer: int | None = None,
    head: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target: int | None = None,
) -> list[tuple[Path, str]]:
    """Write `<image stem>_<method>.png` for each image: image, predicted mask, map (what `vitkit explain` writes
    for a segmentation checkpoint). Returns (path, one-line description) per image.

    Args:
        model: a `ViTSegmentation` or `ViTUNet`.
        images: image files (or anything `decode_image` takes), explained in one batch.
        out_dir: output folder.
        method: "gradcam" (why the region predicted as `target` is that class) or the backbone's "attention",
            "rollout", "flow" (see `vitkit.explain.dense`).
        layer, head, head_fusion, discard_ratio: as `vitkit.explain.explain`.
        target: the class "gradcam" explains in every image (None = each image's most frequent object class).

    Raises:
        ValueError: a method that does not apply to segmentation (naming those that do), a target for a method
            that does not depend on a class, no images.
    """
    import torch

    from vitkit.explain._common import eval_mode
    from vitkit.explain.dense import backbone_attention, check_dense_method, prepare_dense_images, segmentation_cam

    check_dense_method(model, method)
    if target is not None and method != "gradcam":
        raise ValueError(
            f"target={target} has no effect on method={method!r}, which shows the same map whatever the class; "
            "the segmentation method that explains a chosen class is gradcam"
        )
    displays, x = prepare_dense_images(images, model)
    if method == "gradcam":
        cam = segmentation_cam(model, x, target=target, layer=layer)
        maps, targets, shares = cam.maps, cam.targets.tolist(), cam.shares.tolist()
    else:
        maps = backbone_attention(
            model, x, method, layer=layer, head=head, head_fusion=head_fusion, discard_ratio=discard_ratio
        )
        targets = shares = None
    with eval_mode(model), torch.no_grad():
        logits = model(x).float()  # (B, K, h, w)
    names = model.preprocess.class_names or [f"class {k}" for k in range(model.num_classes)]
    paths = [im for im in images if isinstance(im, (str, os.PathLike))]
    stems = output_stems(paths) if len(paths) == len(images) else [f"image{i}" for i in range(len(images))]
    seen: dict[str, int] = {}
    for i, stem in enumerate(stems):  # the same file given twice: a numeric suffix, so no figure overwrites another
        seen[stem] = seen.get(stem, 0) + 1
        stems[i] = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"
    out_dir = Path(out_dir)
    written = []
    for i, (display, stem) in enumerate(zip(displays, stems, strict=True)):
        size = display.shape[:2]
        up = torch.nn.functional.interpolate(logits[i : i + 1], size=size, mode="bilinear", align_corners=False)
        mask = up.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()  # (H, W), as `vitkit predict` draws it
        if method == "gradcam":
            k = targets[i]
            region = mask == k
            # The share of the outlined pixels at the file's size, as `vitkit predict` counts it (the CAM's own
            # share is at the model's input size and can differ by a few pixels' worth).
            title = f"gradcam: why the outlined pixels are {names[k]} ({region.mean():.1%} of the image)"
            if shares[i] == 0:
                title = f"gradcam: {names[k]} is predicted nowhere (empty region, map all zero)"
            elif not region.any():  # a sliver at the model's input size that vanishes at the file's
                title = f"gradcam: {names[k]} is predicted at the model's input size only (no pixel at the file's)"
        else:
            region = None
            what = method if method != "attention" else f"attention layer {-1 if layer is None else layer}"
            title = f"backbone {what} (mean of the patch queries)"
        path = out_dir / f"{stem}_{method}.png"
        plot_segmentation_explanation(display, mask, maps[i], names, title=title, region=region, save_path=path)
        written.append((path, f"{path}: {title}"))
    return written
