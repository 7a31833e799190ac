"""Training losses, by the targets they take.

Hard labels go to `F.cross_entropy` (which smooths them itself); soft targets, which Mixup/CutMix produce already
label-smoothed (`vitkit.data.mixing.Mixup`), go to `soft_target_cross_entropy`. Both compute in float32 whatever
dtype autocast gave the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum_k target_k * log_softmax(logits)_k, for soft (mixed / smoothed) targets.

    Args:
        logits: (B, K) scores.
        target: (B, K) probabilities, rows summing to 1.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: logits and target differ in shape.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against hard labels (B,) smoothed by `label_smoothing`, or soft targets (B, K) as given.

    Soft targets are taken as they are: the mixing that made them has already smoothed them, and smoothing twice
    would be a different recipe.

    Args:
        logits: (B, K) scores.
        target: (B,) class indices, or (B, K) probabilities.
        label_smoothing: in [0, 1); used for hard labels only.

    Returns:
        A float32 scalar, the mean over the batch.

    Raises:
        ValueError: target is neither (B,) nor (B, K).
    """
    if target.ndim == 2:
        return soft_target_cross_entropy(logits, target)
    if target.ndim != 1:
        raise ValueError(f"target must be labels (B,) or soft targets (B, K), got shape {tuple(target.shape)}")
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
