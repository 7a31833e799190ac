"""Mixup / CutMix on batches and label smoothing (the DeiT recipe); the soft-target loss they need lives in
`vitkit.train.losses.soft_target_cross_entropy`.

Both mixes pair image i with image B-1-i (the batch flipped), so no permutation has to be drawn, and draw one
mixing weight per batch from Beta(alpha, alpha) with the global torch RNG (`torch.manual_seed` repeats a run).
"""

from __future__ import annotations

import torch
from torch import Tensor


def smooth_one_hot(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Label-smoothed one-hot targets (B, num_classes): 1 - smoothing + smoothing/K on the label, smoothing/K off it.

    Raises:
        ValueError: A label outside 0..num_classes-1, or smoothing outside [0, 1).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(f"label {bad} is outside the class range 0..{num_classes - 1}")
    off = smoothing / num_classes
    target = torch.full((len(y), num_classes), off, dtype=torch.float32, device=y.device)
    return target.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A random box (y0, y1, x0, x1) covering about 1 - lam of the image, clipped at the borders (as in CutMix)."""
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(0, height, ()).item()), int(torch.randint(0, width, ()).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


class Mixup:
    """Mix each batch with Mixup or CutMix and return soft, label-smoothed targets.

    With probability `prob` a batch is mixed: CutMix with probability `switch_prob` when both alphas are positive,
    otherwise whichever is enabled. CutMix's weight is corrected to the box area actually pasted (boxes are clipped
    at the border). Unmixed batches still get smoothed one-hot targets.

    Args:
        num_classes: Number of classes of the targets.
        mixup_alpha: Beta(alpha, alpha) parameter for Mixup; 0 disables it.
        cutmix_alpha: Beta(alpha, alpha) parameter for CutMix; 0 disables it.
        prob: Probability of mixing a batch at all.
        switch_prob: Probability of CutMix rather than Mixup when both are enabled.
        label_smoothing: Smoothing applied to both targets before mixing.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 disables it), got {value}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def _beta(self, alpha: float) -> float:
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mix a batch.

        Args:
            x: Float images (B, C, H, W), typically already transformed; not modified.
            y: Labels (B,).

        Returns:
            Mixed images (B, C, H, W) and soft targets (B, num_classes) whose rows sum to 1.
        """
        if not x.is_floating_point():
            raise TypeError(f"Mixup needs float images (apply the transform first), got {x.dtype}")
        if x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"expected images (B, C, H, W) and labels (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
        target = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        enabled = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        if not enabled or float(torch.rand(())) >= self.prob:
            return x, target
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or float(torch.rand(())) < self.switch_prob)
        flipped = x.flip(0)
        if use_cutmix:
            lam = self._beta(self.cutmix_alpha)
            y0, y1, x0, x1 = cutmix_box(x.shape[2], x.shape[3], lam)
            mixed = x.clone()
            mixed[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[2] * x.shape[3])  # the share of each image that is its own
        else:
            lam = self._beta(self.mixup_alpha)
            mixed = x * lam + flipped * (1.0 - lam)
        return mixed, target * lam + target.flip(0) * (1.0 - lam)
