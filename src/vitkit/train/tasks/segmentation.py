"""Semantic segmentation: (image, mask) batches, per-pixel cross-entropy (+ optional Dice), mIoU from a confusion matrix.

Loaders yield `(images uint8 (B, 3, H, W), masks (B, H, W))` (or a mapping with "image" and "mask"), as
`BatchLoader` does over a `vitkit.data.segmentation.SegmentationDataset`. Train batches are cropped and flipped
together (`SegTrainTransform`), eval batches only resized and normalised (`SegEvalTransform`); predictions are
scored at the masks' own resolution. Mask value 255 (`IGNORE_INDEX`) counts for nothing.

The evaluation sums are the K x K confusion matrix entries (plus the loss and pixel count), so the metrics of a
split are exact whatever the batching and the number of processes: DDP sums them like any other Task sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.train.config import TrainConfig
from vitkit.train.seg_metrics import IGNORE_INDEX, foreground_iou, mean_dice, mean_iou, seg_confusion_matrix
from vitkit.train.tasks.base import Batch, Task, to_device


def soft_dice_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1.0) -> Tensor:
    """1 - the soft Dice between softmax probabilities and one-hot targets (V-Net's loss), averaged over classes and
    images.

    Per image, so the loss of a batch is the mean of its images' losses: the same whether a global batch runs in one
    process or is split across DDP processes (a Dice over the whole batch would change with the split).

    Args:
        logits: (B, K, H, W).
        target: (B, H, W) class indices; `ignore_index` pixels are left out.
        eps: smoothing added to numerator and denominator (a class absent from an image and predicted nowhere in it
            scores 1, not 0/0).
    """
    k = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.float().softmax(dim=1) * valid
    onehot = F.one_hot(target.clamp(max=k - 1).long(), k).permute(0, 3, 1, 2).float() * valid  # (B, K, H, W)
    inter = (probs * onehot).sum(dim=(2, 3))  # (B, K)
    denom = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


class SegmentationTask(Task):
    """Classify every pixel into `model.num_classes` classes (class 0 = background for `fg_iou`).

    Batch fields: "image" (B, C, H, W) and "mask" (B, H, W) long. Train columns: train_loss, train_pixel_acc;
    evaluation: loss (cross-entropy per counted pixel), miou, dice (mean over the classes that occur), fg_iou (any
    object against background), pixel_acc.

    Args:
        train_transform: called as `train_transform(images_uint8, masks)` -> (float images, long masks); default
            `SegTrainTransform` from the recipe (scale, ratio, hflip) and `model.preprocess`.
        eval_transform: uint8 images -> float model inputs; default `SegEvalTransform` from `model.preprocess`.
        dice_weight: weight of the soft Dice term added to the cross-entropy (0 = plain cross-entropy); None = the
            recipe's `dice_weight`.
    """

    metrics = ("loss", "miou", "dice", "fg_iou", "pixel_acc")
    monitor = "val_miou"
    train_sum_keys = ("pix_correct", "pixels")
    log_metrics = ("train_pixel_acc", "val_loss", "val_miou", "val_fg_iou", "ema_miou")

    def __init__(
        self,
        train_transform: nn.Module | None = None,
        eval_transform: nn.Module | None = None,
        dice_weight: float | None = None,
    ) -> None:
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.dice_weight = dice_weight
        self.label_smoothing = 0.0
        self.num_classes = 0
        self.eval_sum_keys = ("loss", "pixels")
        self.last_confusion: Tensor | None = None

    def check_model(self, model: nn.Module) -> None:
        n = getattr(model, "num_classes", None)
        if not n or n < 2:
            raise ValueError(
                f"segmentation needs a model with at least 2 classes (background + objects), got num_classes={n}; "
                "build one with vitkit.models.segmentation.ViTSegmentation / ViTUNet"
            )
        self.num_classes = int(n)
        k = self.num_classes
        self.eval_sum_keys = ("loss", "pixels", *(f"cm_{i}_{j}" for i in range(k) for j in range(k)))

    def setup(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        from vitkit.data.segmentation import SegEvalTransform, SegTrainTransform

        self.check_model(model)
        pre = getattr(model, "preprocess", None)
        if pre is None and (self.train_transform is None or self.eval_transform is None):
            raise ValueError("the model has no `preprocess`; pass train_transform and eval_transform explicitly")
        if self.train_transform is None:
            self.train_transform = SegTrainTransform(
                pre.input_size, pre.mean, pre.std, scale=config.scale, ratio=config.ratio, hflip=config.hflip
            )
        if self.eval_transform is None:
            self.eval_transform = SegEvalTransform(pre.input_size, pre.mean, pre.std)
        self.train_transform = self.train_transform.to(device)
        self.eval_transform = self.eval_transform.to(device)
        self.device = device
        self.label_smoothing = config.label_smoothing
        if self.dice_weight is None:
            self.dice_weight = config.dice_weight

    # --- batches -----------------------------------------------------------------------------------------------
    def _fields(self, raw: Any) -> Batch:
        if isinstance(raw, Mapping):
            if "image" not in raw or "mask" not in raw:
                raise ValueError(f"a segmentation batch needs 'image' and 'mask' fields, got {sorted(raw)}")
            image, mask = raw["image"], raw["mask"]
        elif isinstance(raw, (tuple, list)) and len(raw) == 2:
            image, mask = raw
        else:
            raise TypeError(
                f"a segmentation loader must yield (images, masks) or {{'image', 'mask'}}, got {type(raw).__name__}"
            )
        if mask.ndim != 3 or mask.shape[0] != image.shape[0] or mask.shape[1:] != image.shape[2:]:
            raise ValueError(f"masks {tuple(mask.shape)} must be (B, H, W) for images {tuple(image.shape)}")
        return to_device({"image": image, "mask": mask}, self.device)

    def train_batch(self, raw: Any) -> Batch:
        batch = self._fields(raw)
        x, m = batch["image"], batch["mask"]
        if x.dtype == torch.uint8:
            x, m = self.train_transform(x, m)  # crop and flip image and mask together, on the device
        return {"image": x, "mask": m.long()}

    def eval_batch(self, raw: Any) -> Batch:
        batch = self._fields(raw)
        if batch["image"].dtype == torch.uint8:
            batch["image"] = self.eval_transform(batch["image"])
        batch["mask"] = batch["mask"].long()
        return batch

    @staticmethod
    def _at_mask_size(out: Tensor, mask: Tensor) -> Tensor:
        """Logits at the masks' resolution (eval inputs may have been resized to the model's size)."""
        if out.shape[-2:] == mask.shape[-2:]:
            return out
        return F.interpolate(out, size=mask.shape[-2:], mode="bilinear", align_corners=False)

    # --- training ----------------------------------------------------------------------------------------------
    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        logits, target = self._at_mask_size(out.float(), batch["mask"]), batch["mask"]
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target)
        return loss

    def train_sums(self, out: Tensor, batch: Batch) -> dict[str, float]:
        target = batch["mask"]
        valid = target != IGNORE_INDEX
        pred = self._at_mask_size(out, target).argmax(dim=1)
        return {"pix_correct": int(((pred == target) & valid).sum()), "pixels": int(valid.sum())}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"pixel_acc": sums["pix_correct"] / max(sums["pixels"], 1)}

    def progress(self, sums: Mapping[str, float]) -> dict[str, str]:
        return {"pix": f"{sums['pix_correct'] / max(sums['pixels'], 1):.3f}"}

    # --- evaluation --------------------------------------------------------------------------------------------
    def eval_sums(self, out: Tensor, batch: Batch) -> dict[str, float]:
        target = batch["mask"]
        logits = self._at_mask_size(out.float(), target)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        cm = seg_confusion_matrix(logits.argmax(dim=1), target, self.num_classes).cpu()
        sums = {"loss": float(loss), "pixels": int(cm.sum())}
        k = self.num_classes
        sums.update({f"cm_{i}_{j}": int(cm[i, j]) for i in range(k) for j in range(k)})
        return sums

    def confusion(self, sums: Mapping[str, float]) -> Tensor:
        """The (K, K) confusion matrix (rows = true class) held in summed `eval_sums`."""
        k = self.num_classes
        return torch.tensor([[sums[f"cm_{i}_{j}"] for j in range(k)] for i in range(k)], dtype=torch.float64)

    def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, Any]:
        pixels = sums["pixels"]
        if sums["n"] == 0 or pixels == 0:
            self.last_confusion = None  # not the previous split's matrix
            nan = float("nan")
            return {"loss": nan, "miou": nan, "dice": nan, "fg_iou": nan, "pixel_acc": nan, "n": int(sums["n"])}
        cm = self.confusion(sums)
        self.last_confusion = cm  # per-class IoU of the last evaluation, for summaries (the sums are all-reduced)
        return {
            "loss": sums["loss"] / pixels,
            "miou": mean_iou(cm),
            "dice": mean_dice(cm),
            "fg_iou": foreground_iou(cm),
            "pixel_acc": float(cm.diagonal().sum() / cm.sum()),
            "n": int(sums["n"]),
        }
