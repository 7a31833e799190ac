"""What the model says and what it trains on: top-k prediction bars, one image through the training augmentations."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor, nn

from vitkit.data.images import ImageLike
from vitkit.viz._common import finish, hide_ticks, new_figure, to_hwc, unnormalize


def draw_topk(ax: Axes, probs: Tensor | np.ndarray, class_names: Sequence[str] | None = None, k: int = 5) -> None:
    """Horizontal bars of the k most probable classes on `ax`, best at the top."""
    p = torch.as_tensor(np.asarray(probs.detach().cpu() if isinstance(probs, Tensor) else probs, dtype=np.float32))
    if p.ndim != 1:
        raise ValueError(f"probabilities must be one vector (classes,), got shape {tuple(p.shape)}")
    if class_names is not None and len(class_names) != p.numel():
        raise ValueError(f"{len(class_names)} class names for {p.numel()} classes")
    k = max(1, min(int(k), p.numel()))
    values, idx = p.topk(k)
    names = [class_names[i] if class_names is not None else f"class {i}" for i in idx.tolist()]
    y = np.arange(k)[::-1]
    ax.barh(y, values.numpy(), color="tab:blue")
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    for yi, v in zip(y, values.tolist(), strict=True):
        ax.text(min(v + 0.02, 0.8), yi, f"{v:.1%}", va="center", fontsize=8)
    ax.set_title(f"top-{k} predictions")


def plot_topk(
    probs: Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    k: int = 5,
    image: ImageLike | None = None,
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """Top-k prediction bars, with the image beside them when given.

    Args:
        probs: class probabilities (classes,) (apply softmax to logits first).
        class_names: name of each class, or None for "class i".
        k: number of bars.
        image: the image to show on the left, or None.
        save_path: where to write the figure, or None.
    """
    if image is None:
        fig = new_figure(5, 0.45 * k + 1.2)
        draw_topk(fig.subplots(), probs, class_names, k)
    else:
        fig = new_figure(9, max(3.5, 0.45 * k + 1.2))
        ax_img, ax_bars = fig.subplots(1, 2, width_ratios=[1, 1.3])
        ax_img.imshow(to_hwc(image))
        hide_ticks(ax_img)
        draw_topk(ax_bars, probs, class_names, k)
    return finish(fig, save_path)


def plot_augmentations(
    image: ImageLike | Tensor,
    transform: nn.Module,
    n: int = 8,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """The same image through a training transform `n` times (the original first).

    Args:
        image: one image (path, PIL, uint8 (H, W, 3) array or (3, H, W) tensor).
        transform: maps a uint8 batch (B, 3, H, W) to a normalised float batch, e.g. `vitkit.data.transforms.
            TrainTransform`.
        n: number of augmented copies.
        seed: seeds the augmentations (the global torch RNG is left as it was).
        mean, std: the transform's normalisation, to undo it for display; read from `transform.normalize` when
            not given.
        save_path: where to write the figure, or None.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of augmented copies, got {n}")
    norm = getattr(transform, "normalize", None)
    if mean is None or std is None:
        if norm is None or not hasattr(norm, "mean"):
            raise ValueError("pass mean and std: the transform has no `normalize` module to read them from")
        mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    original = to_hwc(image)
    batch = torch.from_numpy(original).permute(2, 0, 1)[None].repeat(n, 1, 1, 1)  # (n, 3, H, W) uint8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = transform(batch)
    cols = min(n + 1, 5)
    rows = -(-(n + 1) // cols)
    fig = new_figure(2.2 * cols, 2.2 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    axes[0].imshow(original)
    axes[0].set_title("original", fontsize=8)
    for i in range(n):
        axes[i + 1].imshow(unnormalize(out[i], tuple(mean), tuple(std)))
        axes[i + 1].set_title(f"augmented {i + 1}", fontsize=8)
    for ax in axes:
        hide_ticks(ax)
    for ax in axes[n + 1 :]:
        ax.set_axis_off()
    fig.suptitle(f"training augmentations ({type(transform).__name__})")
    return finish(fig, save_path)
