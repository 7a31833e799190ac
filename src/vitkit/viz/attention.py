"""Attention figures: a map over its image, every layer and head at once, attention distance against depth."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from vitkit.data.images import ImageLike
from vitkit.explain.maps import (
    METHODS,
    attention_depth,
    attention_from_attentions,
    check_attention_model,
    check_head,
    check_layer,
    explain,
    forward_with_attention,
)
from vitkit.layers import attention_layers
from vitkit.models.base import has_class_token
from vitkit.viz._common import finish, hide_ticks, model_input, new_figure, scale01, to_hwc, upsample_map
from vitkit.viz.predictions import draw_topk


def plot_attention_overlay(
    image: ImageLike,
    saliency: Tensor | np.ndarray,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """The image, the map, and the map laid over the image.

    Args:
        image: the image the model saw (uint8 (H, W, 3) array, (3, H, W) tensor, PIL image or path).
        saliency: (H', W') patch-grid or (H, W) map; it is resized to the image and scaled to [0, 1].
        title: figure title.
        alpha: opacity of the map in the overlay.
        cmap: matplotlib colormap of the map.
        save_path: where to write the figure, or None.
    """
    img = to_hwc(image)
    heat = upsample_map(saliency, img.shape[:2])
    fig = new_figure(10.5, 3.8 * img.shape[0] / img.shape[1] + 0.6)
    axes = fig.subplots(1, 3)
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(np.asarray(saliency if not isinstance(saliency, Tensor) else saliency.detach().cpu()), cmap=cmap)
    axes[1].set_title("map")
    axes[2].imshow(img)
    axes[2].imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    axes[2].set_title("overlay")
    for ax in axes:
        hide_ticks(ax)
    if title:
        fig.suptitle(title)
    return finish(fig, save_path)


def plot_attention_grid(
    model: nn.Module,
    image: ImageLike | Tensor,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    overlay: bool = False,
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """Class-token attention of every (layer, head): a layers x heads grid of maps, plus a "mean" column.

    Args:
        model: a ViT-style classifier.
        image: an image (preprocessed with the model's settings) or a normalised (1, 3, H, W) tensor.
        layers: which blocks (rows); None = all.
        heads: which heads (columns); None = all.
        overlay: draw each map over the image instead of alone.
        save_path: where to write the figure, or None.
    """
    check_attention_model(model, "attention grids (every layer x head)")
    attn_layers = attention_layers(model)
    depth, num_heads = len(attn_layers), attn_layers[0].num_heads
    layers = list(range(depth)) if layers is None else [check_layer(i, depth) for i in layers]
    heads = list(range(num_heads)) if heads is None else [check_head(h, num_heads) for h in heads]
    img, x = model_input(model, image)
    _, attns, _, _ = forward_with_attention(model, x, layers=layers)
    grid, P, cls = tuple(model.patch_grid(*x.shape[-2:])), model.num_prefix_tokens, has_class_token(model)
    cols = len(heads) + 1
    fig = new_figure(1.4 * cols + 0.6, 1.4 * len(layers) * grid[0] / grid[1] + 0.6)
    axes = np.asarray(fig.subplots(len(layers), cols, squeeze=False))
    for r, (layer, attn) in enumerate(zip(layers, attns, strict=True)):
        for c, head in enumerate([*heads, None]):
            ax = axes[r, c]
            m = attention_from_attentions(attn, grid, P, cls, head=head)[0]
            if overlay:
                ax.imshow(img)
                ax.imshow(upsample_map(m, img.shape[:2]), cmap="jet", alpha=0.5)
            else:
                ax.imshow(scale01(m.cpu().numpy()), cmap="viridis", interpolation="nearest")
            hide_ticks(ax)
            if r == 0:
                ax.set_title("mean" if head is None else f"head {head}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    who = "class token" if cls else "mean patch query"
    fig.suptitle(f"attention from the {who} (each map scaled to its own range)")
    return finish(fig, save_path)


def uniform_attention_distance(grid: tuple[int, int], patch_size: int) -> float:
    """Mean attention distance (pixels) of a head that attends uniformly to every patch: a reference line."""
    gh, gw = grid
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    centres = torch.stack([rows, cols], dim=1).float() * patch_size
    return float(torch.cdist(centres, centres).mean())


def plot_attention_distance(
    distances: Tensor | np.ndarray,
    reference: float | None = None,
    title: str | None = None,
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """Mean attention distance against depth, one dot per head (the ViT paper, Fig. 7 right).

    Args:
        distances: (layers, heads) mean attention distance in pixels (`mean_attention_distance`).
        reference: distance of uniform attention (`uniform_attention_distance`), drawn as a dashed line.
        title: axes title.
        save_path: where to write the figure, or None.
    """
    d = np.asarray(distances.detach().cpu() if isinstance(distances, Tensor) else distances, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"distances must be (layers, heads), got shape {d.shape}")
    L, H = d.shape
    fig = new_figure(6, 4)
    ax = fig.subplots()
    for h in range(H):
        ax.scatter(np.arange(L), d[:, h], s=18, label=f"head {h}")
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=1, label="uniform attention")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(np.arange(L))
    ax.set_ylim(bottom=0)
    ax.set_title(title or "mean attention distance per head")
    if H <= 16:
        ax.legend(fontsize=7, ncols=2 if H > 6 else 1)
    return finish(fig, save_path)


class AttentionVisualizer:
    """Attention figures for one model, from images as they come (files, PIL, arrays, tensors).

        viz = AttentionVisualizer(model, device="cpu")
        viz.visualize_attention("cat.jpg", layer_idx=-1, head_idx=None, save_path="attention.png")

    Images go through the model's own preprocessing (`model.preprocess`: size, crop, mean, std).
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def attention(
        self, image: ImageLike | Tensor, layer_idx: int = -1, head_idx: int | None = None, method: str = "attention"
    ) -> tuple[np.ndarray, Tensor, Tensor]:
        """(the image as the model saw it, the (H', W') map, the class probabilities)."""
        img, x = model_input(self.model, image)
        m = explain(self.model, x, method=method, layer=layer_idx, head=head_idx, upsample=False)[0]
        with torch.no_grad():
            probs = self.model(x).softmax(dim=-1)[0]
        return img, m, probs

    def visualize_attention(
        self,
        image: ImageLike | Tensor,
        layer_idx: int = -1,
        head_idx: int | None = None,
        save_path: str | os.PathLike | None = None,
        method: str = "attention",
        top_k: int = 5,
    ) -> Figure:
        """Image, map, overlay and the top-k predictions for one image.

        Args:
            image: path, PIL image, uint8 (H, W, 3) array, (3, H, W) tensor, or a normalised (1, 3, H, W) batch.
            layer_idx: block for raw attention (negatives from the end).
            head_idx: one head, or None for the mean over heads.
            save_path: where to write the figure, or None.
            method: "attention" (default; for a Swin, one block's window attention on its stage grid), "rollout",
                "flow", "grad-rollout", "relevance" or "gradcam" (`layer_idx` is then the stage).
            top_k: number of predictions listed.
        """
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not allowed; choose one of {', '.join(map(repr, METHODS))}")
        img, m, probs = self.attention(image, layer_idx, head_idx, method)
        heat = upsample_map(m, img.shape[:2])
        fig = new_figure(13, 3.6 * img.shape[0] / img.shape[1] + 0.6)
        axes = fig.subplots(1, 4, width_ratios=[1, 1, 1, 1.2])
        axes[0].imshow(img)
        axes[0].set_title("input")
        axes[1].imshow(scale01(m.cpu().numpy()), cmap="viridis", interpolation="nearest")
        axes[1].set_title(f"{tuple(m.shape)[0]}x{tuple(m.shape)[1]} patch map")
        axes[2].imshow(img)
        axes[2].imshow(heat, cmap="jet", alpha=0.5)
        axes[2].set_title("overlay")
        for ax in axes[:3]:
            hide_ticks(ax)
        draw_topk(axes[3], probs, self.model.preprocess.class_names, k=top_k)
        if method == "attention":
            depth = attention_depth(self.model)
            head = "mean of heads" if head_idx is None else f"head {head_idx}"
            fig.suptitle(f"attention, layer {layer_idx % depth} of {depth}, {head}")
        else:
            fig.suptitle(method)
        return finish(fig, save_path)

    def visualize_layers_heads(
        self, image: ImageLike | Tensor, save_path: str | os.PathLike | None = None, overlay: bool = False
    ) -> Figure:
        """Every layer x head class-token map (see `plot_attention_grid`)."""
        return plot_attention_grid(self.model, image, overlay=overlay, save_path=save_path)
