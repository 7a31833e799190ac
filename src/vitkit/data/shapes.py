"""A procedural dataset with ground truth for explainability: one coloured shape per image, with its mask and box.

Four classes (circle, square, triangle, star), balanced. Each shape is inscribed in a circle whose diameter is
25-60% of the shorter image side, placed fully inside the image and tilted by up to 20 degrees (triangles and
stars point up). The background is a random texture (smooth noise blended with stripes) between two colours near
a random mean; the shape's colour differs from that mean by at least 96 levels in every channel, so the shape is
always visible but colour alone does not give the class away. Everything is vectorised numpy, generated in
chunks, and fixed by the seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SHAPE_CLASSES = ["circle", "square", "triangle", "star"]
MIN_SIDE = 16  # below this the smallest shapes are a handful of pixels and stop being recognisable
_CHUNK = 256
# Shapes are tilted by at most this much (radians): enough to vary the outline, small enough that a small ViT
# trained from scratch on a few thousand images does not also have to learn rotation invariance.
MAX_TILT = math.radians(20)
_STAR_INNER = 0.5  # inner/outer radius of the star: fatter than a regular star (0.38) so small ones stay stars


def _star_radius(phi: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """Distance from the centre to the star's outline along angle `phi` (0 = towards a point)."""
    sector = 2 * math.pi / 5
    phi = np.mod(phi, sector)
    phi = np.minimum(phi, sector - phi)  # the outline is symmetric about each point: fold into [0, pi/5]
    # The outline there is the segment from the point (1, 0) to the inner corner at angle pi/5 (unit outer radius).
    p2 = np.array([_STAR_INNER * math.cos(sector / 2), _STAR_INNER * math.sin(sector / 2)])
    edge = p2 - np.array([1.0, 0.0])
    normal = np.array([-edge[1], edge[0]])
    return outer * normal[0] / (normal[0] * np.cos(phi) + normal[1] * np.sin(phi))  # ray meets the segment's line


def _masks(labels, cx, cy, radius, angle, height: int, width: int) -> np.ndarray:
    """Boolean masks (n, H, W) of the shapes, tested at pixel centres."""
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    dx = xs[None, None, :] - cx[:, None, None].astype(np.float32)  # (n, 1, W)
    dy = ys[None, :, None] - cy[:, None, None].astype(np.float32)  # (n, H, 1)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # (n, H, W) coordinates in the shape's own frame
    r = radius[:, None, None]
    masks = np.zeros((len(labels), height, width), dtype=bool)
    for cls in range(len(SHAPE_CLASSES)):
        sel = labels == cls
        if not sel.any():
            continue
        uu, vv, rr = u[sel], v[sel], r[sel]
        if cls == 0:  # circle
            masks[sel] = uu * uu + vv * vv <= rr * rr
        elif cls == 1:  # square inscribed in the circle: half side r / sqrt(2)
            half = rr / math.sqrt(2)
            masks[sel] = (np.abs(uu) <= half) & (np.abs(vv) <= half)
        elif cls == 2:  # equilateral triangle: inside all three edges, each at the inradius r / 2
            inside = np.ones(uu.shape, dtype=bool)
            for k in range(3):
                a = math.pi / 2 + 2 * math.pi * k / 3
                inside &= uu * math.cos(a) + vv * math.sin(a) <= rr / 2
            masks[sel] = inside
        else:  # five-pointed star, first point at angle -pi/2 ("up" before rotation)
            rho = np.sqrt(uu * uu + vv * vv)
            phi = np.arctan2(vv, uu) + math.pi / 2
            masks[sel] = rho <= _star_radius(phi, rr)
    return masks


def _boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (n, 4) as x0, y0, x1, y1 with exclusive x1/y1: masks[i, y0:y1, x0:x1] holds the whole shape."""
    cols, rows = masks.any(axis=1), masks.any(axis=2)  # (n, W), (n, H)
    x0, y0 = cols.argmax(axis=1), rows.argmax(axis=1)
    x1 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)
    y1 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def _texture(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Per-pixel blend weights in [0, 1], (n, H, W): smooth noise mixed with stripes of random frequency/angle."""
    grid = int(rng.integers(3, 7))
    coarse = torch.from_numpy(rng.random((n, 1, grid, grid), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[:, 0].numpy()
    freq = rng.uniform(1.5, 6.0, n).astype(np.float32)[:, None, None]  # cycles across the image
    theta = rng.uniform(0, math.pi, n).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * math.pi, n).astype(np.float32)[:, None, None]
    ys = (np.arange(height, dtype=np.float32) / height)[None, :, None]
    xs = (np.arange(width, dtype=np.float32) / width)[None, None, :]
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xs * np.cos(theta) + ys * np.sin(theta)) + phase)
    mix = rng.uniform(0.2, 0.8, n).astype(np.float32)[:, None, None]
    return np.clip(mix * smooth + (1 - mix) * stripes, 0.0, 1.0)


def make_shapes(
    count: int, height: int, width: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate `count` shape images.

    Args:
        count: Number of images (classes are balanced to within one image).
        height: Image height in pixels, at least 16.
        width: Image width in pixels, at least 16.
        seed: Fixes every image; the same (count, height, width, seed) always gives the same data.

    Returns:
        images uint8 (N, 3, H, W), labels int64 (N,), masks bool (N, H, W), boxes int64 (N, 4) as x0, y0, x1, y1
        with exclusive x1/y1.
    """
    if count < len(SHAPE_CLASSES):
        raise ValueError(f"shapes needs at least {len(SHAPE_CLASSES)} images (one per class), got {count}")
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"shapes images must be at least {MIN_SIDE} pixels on each side, got {height}x{width}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(SHAPE_CLASSES))
    side = min(height, width)
    radius = rng.uniform(0.25, 0.6, count) * side / 2
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    angle = rng.uniform(-MAX_TILT, MAX_TILT, count)
    bg_mean = rng.uniform(0, 255, (count, 3))
    bg_spread = rng.uniform(-40, 40, (count, 3))
    bg_a = np.clip(bg_mean + bg_spread, 0, 255).astype(np.float32)
    bg_b = np.clip(bg_mean - bg_spread, 0, 255).astype(np.float32)
    # Adding 96..160 modulo 256 moves each channel at least 96 levels away from the mean, up or down.
    fg = np.mod(bg_mean + rng.uniform(96, 160, (count, 3)), 256).astype(np.float32)

    images = np.empty((count, height, width, 3), dtype=np.uint8)
    masks = np.empty((count, height, width), dtype=bool)
    for start in range(0, count, _CHUNK):
        sl = slice(start, min(start + _CHUNK, count))
        n = sl.stop - sl.start
        mask = _masks(labels[sl], cx[sl], cy[sl], radius[sl], angle[sl], height, width)
        t = _texture(rng, n, height, width)[..., None]  # (n, H, W, 1)
        img = t * (bg_a - bg_b)[sl, None, None, :] + bg_b[sl, None, None, :]  # (n, H, W, 3)
        np.copyto(img, fg[sl, None, None, :], where=mask[..., None])
        img += 6.0 * rng.standard_normal((n, height, width, 1), dtype=np.float32)  # grain on shape and background
        np.clip(img, 0, 255, out=img)
        images[sl] = np.rint(img, out=img)
        masks[sl] = mask
    boxes = _boxes(masks)
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels.astype(np.int64)),
        torch.from_numpy(masks),
        torch.from_numpy(boxes),
    )


# --- scenes: several shapes per image, for segmentation and detection -------------------------------------------

SCENE_CLASSES = ["background", *SHAPE_CLASSES]  # semantic mask values: 0 = background, 1 + shape class
_SCENE_MIN_PIXELS = 12  # an instance with fewer visible pixels than this (occluded) is dropped from the targets


def make_scenes(
    count: int, height: int, width: int, seed: int, min_shapes: int = 1, max_shapes: int = 5
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Generate `count` scenes of 1-5 shapes each (overlap allowed; later shapes are drawn over earlier ones).

    Same shapes, textures and colour rule as `make_shapes`, each shape with its own colour, inscribed in a circle
    whose diameter is 20-45% of the shorter side and placed fully inside the image. Instances are what is visible:
    a shape's mask minus what later shapes cover; one left with fewer than 12 visible pixels is dropped from the
    targets (and its pixels count as whatever covers them or as the shape itself in the semantic mask).

    Args:
        count: Number of images, at least 1.
        height: Image height in pixels, at least 16.
        width: Image width in pixels, at least 16.
        seed: Fixes every image; the same arguments always give the same data.
        min_shapes: Fewest shapes drawn per image (1 <= min_shapes <= max_shapes).
        max_shapes: Most shapes drawn per image (at most 10).

    Returns:
        images uint8 (N, 3, H, W); semantic masks int64 (N, H, W) with 0 = background and 1 + the shape class
        (`SCENE_CLASSES`); per image a dict with "labels" int64 (k,) shape classes 0-3 (`SHAPE_CLASSES`),
        "boxes" float32 (k, 4) tight boxes of the visible pixels as x0, y0, x1, y1 in pixels (exclusive x1/y1,
        i.e. the pixel edges), "masks" bool (k, H, W) visible instance masks.
    """
    if count < 1:
        raise ValueError(f"scenes needs at least 1 image, got {count}")
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"scene images must be at least {MIN_SIDE} pixels on each side, got {height}x{width}")
    if not 1 <= min_shapes <= max_shapes <= 10:
        raise ValueError(
            f"need 1 <= min_shapes <= max_shapes <= 10, got min_shapes={min_shapes}, max_shapes={max_shapes}"
        )
    rng = np.random.default_rng(seed)
    per_image = rng.integers(min_shapes, max_shapes + 1, count)
    total = int(per_image.sum())
    owner = np.repeat(np.arange(count), per_image)  # (total,) which image each shape belongs to
    labels = rng.integers(0, len(SHAPE_CLASSES), total)
    side = min(height, width)
    radius = rng.uniform(0.2, 0.45, total) * side / 2
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    angle = rng.uniform(-MAX_TILT, MAX_TILT, total)
    bg_mean = rng.uniform(0, 255, (count, 3))
    bg_spread = rng.uniform(-40, 40, (count, 3))
    bg_a = np.clip(bg_mean + bg_spread, 0, 255).astype(np.float32)
    bg_b = np.clip(bg_mean - bg_spread, 0, 255).astype(np.float32)
    fg = np.mod(bg_mean[owner] + rng.uniform(96, 160, (total, 3)), 256).astype(np.float32)  # one colour per shape

    images = np.empty((count, height, width, 3), dtype=np.uint8)
    semantic = np.zeros((count, height, width), dtype=np.int64)
    targets: list[dict[str, torch.Tensor]] = []
    starts = np.concatenate([[0], np.cumsum(per_image)])
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        n = stop - start
        t = _texture(rng, n, height, width)[..., None]  # (n, H, W, 1)
        img = t * (bg_a - bg_b)[start:stop, None, None, :] + bg_b[start:stop, None, None, :]  # (n, H, W, 3)
        lo, hi = starts[start], starts[stop]
        shape_masks = _masks(labels[lo:hi], cx[lo:hi], cy[lo:hi], radius[lo:hi], angle[lo:hi], height, width)
        for i in range(n):
            a, b = starts[start + i] - lo, starts[start + i + 1] - lo
            visible = shape_masks[a:b].copy()  # (k, H, W), drawn in order: later ones cover earlier ones
            for j in range(b - a):
                np.copyto(img[i], fg[lo + a + j], where=shape_masks[a + j][..., None])
                semantic[start + i][shape_masks[a + j]] = labels[lo + a + j] + 1
                visible[:j] &= ~shape_masks[a + j]
            keep = visible.reshape(b - a, -1).sum(1) >= _SCENE_MIN_PIXELS
            vis = visible[keep]
            targets.append(
                {
                    "labels": torch.from_numpy(labels[lo + a : lo + b][keep].astype(np.int64)),
                    "boxes": torch.from_numpy(_boxes(vis).astype(np.float32).reshape(-1, 4)),
                    "masks": torch.from_numpy(vis),
                }
            )
        img += 6.0 * rng.standard_normal((n, height, width, 1), dtype=np.float32)
        np.clip(img, 0, 255, out=img)
        images[start:stop] = np.rint(img, out=img)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(semantic), targets
