"""Figures of a run: training curves and a confusion matrix (matplotlib's Agg canvas, no display needed).

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot, so nothing here touches global
pyplot state or the user's backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vitkit._io import atomic_path
from vitkit.train.metrics import History


def _save(fig, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_curves(
    history: History,
    path: str | os.PathLike,
    lr_schedule: Sequence[float] | None = None,
    steps_per_epoch: int | None = None,
) -> None:
    """Three panels: loss (train/val/EMA), accuracy (train/val/EMA), and the learning rate per step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = history["epoch"] if len(history) else []
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_loss", "EMA")):
        if key in history and any(v is not None for v in history[key]):
            ax_loss.plot(epochs, history[key], marker="o", ms=3, label=label)
    segment = "val_miou" in history or "ema_miou" in history  # a segmentation run: pixel accuracy and mIoU
    acc_keys = (
        (("train_pixel_acc", "train pixel acc"), ("val_miou", "val mIoU"), ("ema_miou", "EMA mIoU"))
        if segment
        else (("train_acc", "train"), ("val_acc", "val"), ("ema_acc", "EMA"))
    )
    for key, label in acc_keys:
        if key in history and any(v is not None for v in history[key]):
            ax_acc.plot(epochs, history[key], marker="o", ms=3, label=label)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="mIoU" if segment else "accuracy", xlabel="epoch", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if lr_schedule:
        x = [s / steps_per_epoch for s in range(len(lr_schedule))] if steps_per_epoch else range(len(lr_schedule))
        ax_lr.plot(list(x), list(lr_schedule), color="gray", lw=1, label="schedule")
        if len(history) and "lr" in history:
            ax_lr.plot(epochs, history["lr"], "o", ms=3, color="C3", label="end of epoch")
        ax_lr.legend()
    ax_lr.set(title="learning rate", xlabel="epoch" if steps_per_epoch else "step")
    ax_lr.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(matrix, class_names: Sequence[str], path: str | os.PathLike, title: str = "confusion") -> None:
    """Row-normalised confusion matrix (rows = true class) with counts written in the cells when it is small."""
    import numpy as np
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.float64)
    k = len(m)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * k + 2), 24)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if k <= 40:
        ax.set_xticks(range(k), [str(c) for c in class_names], rotation=90 if k > 10 else 0)
        ax.set_yticks(range(k), [str(c) for c in class_names])
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        int(m[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)


def plot_image_rows(columns: Sequence, titles: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """A grid of images: one column per tensor of `columns` (each (N, C, H, W), 0..1), one row per image, the
    column titles on top (e.g. MAE's original | masked | reconstruction)."""
    from matplotlib.figure import Figure

    n = len(columns[0])
    fig = Figure(figsize=(1.6 * len(columns), 1.6 * n + 0.4))
    axes = fig.subplots(n, len(columns), squeeze=False)
    for j, images in enumerate(columns):
        for i in range(n):
            img = images[i].permute(1, 2, 0).numpy()  # (H, W, C)
            axes[i][j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            axes[i][j].set_axis_off()
        axes[0][j].set_title(titles[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
