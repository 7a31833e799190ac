"""How a ViT sees an image before any attention: the patch grid, the patch-embedding filters, the position table."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from vitkit.data.images import ImageLike
from vitkit.explain._common import UnsupportedModelError
from vitkit.layers import check_image_size, sincos_2d
from vitkit.models.base import model_label
from vitkit.viz._common import finish, hide_ticks, new_figure, to_hwc


def _family(model: nn.Module) -> str:
    family = getattr(model, "family", None)
    return f" (family {family})" if family else ""


def _exploded(image: np.ndarray, patch: int, gap: int) -> np.ndarray:
    """The patches of an (H, W, 3) image laid out with `gap` white pixels between them."""
    H, W, _ = image.shape
    gh, gw = H // patch, W // patch
    out = np.full((gh * (patch + gap) - gap, gw * (patch + gap) - gap, 3), 255, dtype=np.uint8)
    for r in range(gh):
        for c in range(gw):
            y, x = r * (patch + gap), c * (patch + gap)
            out[y : y + patch, x : x + patch] = image[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
    return out


def plot_patch_grid(image: ImageLike, patch_size: int, save_path: str | os.PathLike | None = None) -> Figure:
    """The image under its patch grid, and the same patches pulled apart into the tokens the model reads.

    Args:
        image: a path, PIL image, uint8 (H, W, 3) array or (3, H, W) tensor; both sides must be multiples of
            `patch_size` (crop or resize first).
        patch_size: side of a square patch in pixels.
        save_path: where to write the figure (PNG, PDF, ... by extension), or None.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    img = to_hwc(image)
    H, W, _ = img.shape
    gh, gw = check_image_size(H, W, (patch_size, patch_size))
    fig = new_figure(10, 5 * H / max(W, 1) + 0.6)
    ax_grid, ax_tokens = fig.subplots(1, 2)
    ax_grid.imshow(img)
    for r in range(1, gh):
        ax_grid.axhline(r * patch_size - 0.5, color="white", lw=0.8)
    for c in range(1, gw):
        ax_grid.axvline(c * patch_size - 0.5, color="white", lw=0.8)
    if gh * gw <= 64:  # number the patches in the order they become tokens (row-major) when there is room
        for i in range(gh * gw):
            r, c = divmod(i, gw)
            ax_grid.text(c * patch_size + 2, r * patch_size + 2, str(i), color="white", fontsize=7, va="top")
    ax_grid.set_title(f"{H}x{W} image, {patch_size} px patches: {gh}x{gw} = {gh * gw} tokens")
    hide_ticks(ax_grid)
    gap = max(1, patch_size // 8)
    ax_tokens.imshow(_exploded(img, patch_size, gap))
    ax_tokens.set_title("each patch is flattened and linearly projected to one token")
    hide_ticks(ax_tokens)
    return finish(fig, save_path)


def visualize_patch_embedding(image: ImageLike, patch_size: int, save_path: str | os.PathLike | None = None) -> Figure:
    """The tutorial's name for `plot_patch_grid`: the image cut into its patch grid."""
    return plot_patch_grid(image, patch_size, save_path=save_path)


def plot_patch_embedding_filters(
    model: nn.Module, num_components: int = 28, save_path: str | os.PathLike | None = None
) -> Figure:
    """Principal components of the patch-embedding filters, as in the ViT paper (Fig. 7, left).

    Each of the D convolution filters is a (C, p, p) patch; the leading principal components of the D filters
    show the basis the model projects patches onto (trained models show smooth, Gabor-like bases). Each
    component is scaled to [0, 1] on its own for display.
    """
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise UnsupportedModelError(
            f"the patch-embedding filter figure needs a patch-embedding convolution (`patch_embed.proj`, as ViT and "
            f"Swin have); {model_label(model)}{_family(model)} has none"
        )
    before = next((n for n in ("backbone", "stem") if hasattr(model.patch_embed, n)), None)
    if before is not None:  # a hybrid: the projection reads feature maps, its "filters" are 1x1 over CNN channels
        raise UnsupportedModelError(
            f"the patch-embedding filter figure draws filters that read pixels; {model_label(model)}{_family(model)} "
            f"projects the {proj.in_channels}-channel feature map of its CNN {before} (`patch_embed.{before}`) to "
            "tokens, so its `patch_embed.proj` has no pixel filters to draw"
        )
    w = proj.weight.detach().float().cpu()  # (D, C, p, p)
    D, C, ph, pw = w.shape
    flat = w.reshape(D, -1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)  # rows of vh: principal directions
    k = max(1, min(int(num_components), vh.shape[0]))
    explained = (s**2) / (s**2).sum().clamp_min(1e-12)
    cols = min(7, k)
    rows = -(-k // cols)
    fig = new_figure(1.3 * cols, 1.3 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        hide_ticks(ax)
        if i >= k:
            ax.set_axis_off()
            continue
        comp = vh[i].reshape(C, ph, pw)
        comp = (comp - comp.min()) / (comp.max() - comp.min()).clamp_min(1e-12)
        shown = comp.permute(1, 2, 0).numpy() if C == 3 else comp.mean(dim=0).numpy()
        ax.imshow(shown, cmap=None if C == 3 else "gray", interpolation="nearest")
        ax.set_title(f"PC{i + 1} {explained[i]:.0%}", fontsize=7)
    fig.suptitle(f"patch-embedding filters: first {k} principal components of {D} filters ({C}x{ph}x{pw})")
    return finish(fig, save_path)


def position_table(model: nn.Module) -> tuple[torch.Tensor, tuple[int, int]]:
    """The patch rows of the model's position embedding at its native grid: ((H'*W', D), (H', W'))."""
    if not hasattr(model, "native_grid") or not hasattr(model.cfg, "pos_embed"):
        raise UnsupportedModelError(
            f"the position-embedding figure needs a ViT position table; {model_label(model)}{_family(model)} has none"
        )
    grid = tuple(model.native_grid)
    kind = model.cfg.pos_embed
    if kind == "learn":
        table = model.pos_embed.detach()[0, model.num_pos_prefix :]
    elif kind == "sincos":
        table = sincos_2d(grid, model.embed_dim)
    else:
        raise ValueError(f"this model has no position embedding (pos_embed={kind!r}); nothing to plot")
    return table.float().cpu(), grid


def plot_position_embedding_similarity(model: nn.Module, save_path: str | os.PathLike | None = None) -> Figure:
    """Cosine similarity of each patch's position embedding to every other's, as in the ViT paper (Fig. 7, centre).

    Cell (r, c) of the big grid is a small H' x W' map: how similar position (r, c) is to each position. A
    learned table that has picked up 2-D structure shows a bright spot at each cell's own place and row/column
    stripes. Works for non-square native grids.
    """
    table, (gh, gw) = position_table(model)
    sim = F.normalize(table, dim=-1) @ F.normalize(table, dim=-1).T  # (H'*W', H'*W')
    gap = 1
    mosaic = np.full((gh * (gh + gap) - gap, gw * (gw + gap) - gap), np.nan, dtype=np.float32)
    for i in range(gh * gw):
        r, c = divmod(i, gw)
        y, x = r * (gh + gap), c * (gw + gap)
        mosaic[y : y + gh, x : x + gw] = sim[i].reshape(gh, gw).numpy()
    fig = new_figure(7, 7 * gh / gw + 0.4)
    ax = fig.subplots()
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    step = max(1, gw // 8)
    ax.set_xticks([c * (gw + gap) + (gw - 1) / 2 for c in range(0, gw, step)], [str(c + 1) for c in range(0, gw, step)])
    step = max(1, gh // 8)
    ax.set_yticks([r * (gh + gap) + (gh - 1) / 2 for r in range(0, gh, step)], [str(r + 1) for r in range(0, gh, step)])
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(f"position embedding similarity ({gh}x{gw} grid, {model.cfg.pos_embed})")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    return finish(fig, save_path)
