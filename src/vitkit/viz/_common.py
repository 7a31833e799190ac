"""Helpers shared by the figures: Agg-only figures, saving, and turning tensors into displayable images.

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot, so nothing touches a global figure
registry (no leaked figures in loops, no GUI backend needed); they still display in Jupyter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from vitkit._io import atomic_path
from vitkit.data.images import ImageLike, decode_image
from vitkit.data.inference import prepare_image


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def finish(fig: Figure, save_path: str | os.PathLike | None, dpi: int = 120) -> Figure:
    """Save `fig` as an image when `save_path` is given (atomically, parent folders created) and return it.

    The format follows the file's suffix (PNG without one), as `Figure.savefig` would choose it.
    """
    if save_path is not None:
        path = Path(save_path)
        fmt = path.suffix[1:].lower() or "png"  # the temporary file's own suffix must not choose the format
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    return fig


def to_hwc(image: ImageLike | Tensor) -> np.ndarray:
    """A displayable uint8 (H, W, 3) array from any image input (tensors: (3, H, W), uint8 or float in [0, 1])."""
    return decode_image(image)


def unnormalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """A normalised (3, H, W) float tensor back to a uint8 (H, W, 3) array."""
    m = torch.tensor(mean, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device).view(-1, 1, 1)
    y = (x.detach().float() * s + m).clamp(0, 1)
    return (y * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def model_input(model: nn.Module, image: ImageLike | Tensor) -> tuple[np.ndarray, Tensor]:
    """(uint8 (H, W, 3) display image, normalised (1, 3, H, W) input on the model's device).

    A 4-D float tensor is taken as an already-normalised batch (its first image is used); anything else goes
    through the model's preprocessing (`prepare_image`).
    """
    if isinstance(image, Tensor) and image.ndim == 4:
        if not image.is_floating_point():
            raise TypeError(f"a 4-D image tensor must be a normalised float batch, got {image.dtype}")
        x = image[:1].to(next(model.parameters()).device)
        pre = model.preprocess
        return unnormalize(x[0], pre.mean, pre.std), x
    return prepare_image(image, model)


def upsample_map(saliency: Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (H', W') map resized (bilinear) to `size` and scaled to [0, 1] for display."""
    m = torch.as_tensor(np.asarray(saliency, dtype=np.float32) if not isinstance(saliency, Tensor) else saliency)
    m = m.detach().float().cpu()
    if m.ndim != 2:
        raise ValueError(f"a saliency map must be 2-D (H', W'), got shape {tuple(m.shape)}")
    if tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return scale01(m.numpy())


def scale01(a: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (all zeros for a constant array)."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def hide_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
