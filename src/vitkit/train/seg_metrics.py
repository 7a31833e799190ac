"""Semantic segmentation metrics from one confusion matrix: per-class IoU, mIoU, Dice, foreground IoU.

The confusion matrix is a sum over pixels, so matrices of batches, epochs or processes add up (the Task's eval sums
are its entries, all-reduced under DDP as any other sum). Conventions, as mmsegmentation and torchmetrics:

- rows = true class, columns = predicted class; pixels whose target is `ignore_index` (255, the VOC border
  convention) are left out;
- IoU_k = TP / (TP + FP + FN), Dice_k = 2 TP / (2 TP + FP + FN) (= the F1 score of class k over pixels);
- a class absent from both target and prediction has no IoU (NaN) and is left out of the means, which average the
  classes that occur.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vitkit.train.metrics import confusion_matrix

IGNORE_INDEX = 255  # target value of pixels that count for nothing (VOC's object borders, unlabelled areas)


def seg_confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> Tensor:
    """(K, K) int64 pixel counts, rows = true class, columns = predicted class.

    Args:
        pred: predicted class per pixel, any shape (e.g. (B, H, W)), values in 0..K-1.
        target: true class per pixel, the same shape; `ignore_index` pixels are skipped.
        num_classes: K.
        ignore_index: target value to skip; None = every pixel counts.

    Raises:
        ValueError: shapes differ, or a (non-ignored) target or a prediction outside 0..K-1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for what, v in (("target", target), ("prediction", pred)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            bad = int(v.min()) if int(v.min()) < 0 else int(v.max())
            raise ValueError(f"{what} class {bad} is outside 0..{num_classes - 1} (ignore_index={ignore_index})")
    return confusion_matrix(pred, target, num_classes)


def _tp_fp_fn(cm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    cm = torch.as_tensor(cm, dtype=torch.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square (K, K), got {tuple(cm.shape)}")
    tp = cm.diagonal()
    return tp, cm.sum(0) - tp, cm.sum(1) - tp  # FP: predicted k but not k; FN: k but predicted otherwise


def iou_per_class(cm: Tensor) -> Tensor:
    """IoU of each class (K,) float64; NaN for a class absent from target and prediction."""
    tp, fp, fn = _tp_fp_fn(cm)
    union = tp + fp + fn
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def dice_per_class(cm: Tensor) -> Tensor:
    """Dice (pixel F1) of each class (K,) float64; NaN for a class absent from target and prediction."""
    tp, fp, fn = _tp_fp_fn(cm)
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))


def _nanmean(v: Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else math.nan


def mean_iou(cm: Tensor) -> float:
    """mIoU: the mean IoU over the classes that occur (NaN when no pixel was counted)."""
    return _nanmean(iou_per_class(cm))


def mean_dice(cm: Tensor) -> float:
    """Mean Dice over the classes that occur (NaN when no pixel was counted)."""
    return _nanmean(dice_per_class(cm))


def foreground_iou(cm: Tensor, background: int = 0) -> float:
    """IoU of "any object" against background: classes other than `background` merged into one (NaN if none)."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    keep = [k for k in range(cm.shape[0]) if k != background]
    fg_true, fg_pred = cm[keep].sum(1), cm[:, keep].sum(0)
    tp = float(cm[keep][:, keep].sum())  # object pixels predicted as some object
    union = float(fg_true.sum() + fg_pred.sum()) - tp
    return tp / union if union > 0 else math.nan


def pixel_accuracy(cm: Tensor) -> float:
    """Share of counted pixels whose class is right (NaN when none was counted)."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    total = float(cm.sum())
    return float(cm.diagonal().sum()) / total if total > 0 else math.nan


def seg_metrics(cm: Tensor, class_names: list[str] | None = None, background: int = 0) -> dict:
    """Every segmentation metric of a confusion matrix, JSON-ready (NaN becomes None).

    Returns:
        {"miou", "dice", "fg_iou", "pixel_acc", "per_class": {name: {"iou", "dice", "pixels"}}}; "pixels" is the
        count of true pixels of the class.
    """
    cm = torch.as_tensor(cm)
    names = class_names or [str(k) for k in range(cm.shape[0])]
    if len(names) != cm.shape[0]:
        raise ValueError(f"{len(names)} class names for a {cm.shape[0]}-class confusion matrix")

    def clean(v: float) -> float | None:
        return None if math.isnan(v) else v

    iou, dice = iou_per_class(cm), dice_per_class(cm)
    return {
        "miou": clean(mean_iou(cm)),
        "dice": clean(mean_dice(cm)),
        "fg_iou": clean(foreground_iou(cm, background)),
        "pixel_acc": clean(pixel_accuracy(cm)),
        "per_class": {
            n: {"iou": clean(float(iou[k])), "dice": clean(float(dice[k])), "pixels": int(cm[k].sum())}
            for k, n in enumerate(names)
        },
    }
