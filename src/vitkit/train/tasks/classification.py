"""Image classification: (image, label) batches, cross-entropy with label smoothing and Mixup/CutMix, accuracy.

Loaders yield `(images, labels)` (or a mapping with "image" and "label"). uint8 image batches are augmented
(train) or resized and normalised (eval) on the training device by `TrainTransform` / `EvalTransform` built from
`model.preprocess` and the recipe; float batches are taken as ready model inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.train.config import TrainConfig
from vitkit.train.losses import classification_loss
from vitkit.train.metrics import topk_correct
from vitkit.train.tasks.base import Batch, Task, to_device


class ClassificationTask(Task):
    """Classify images into `model.num_classes` classes.

    Batch fields: "image" (B, C, H, W), "label" (B,) class indices, and while training "target": the label, or
    soft targets (B, K) when Mixup/CutMix is on. Train columns: train_loss, train_acc; evaluation: loss (plain
    cross-entropy), acc, top5 (None when there are 5 classes or fewer, where it would always be 1).

    Args:
        train_transform: module applied to uint8 train batches; default `TrainTransform` from the recipe and
            `model.preprocess`.
        eval_transform: module applied to uint8 eval batches; default `EvalTransform` from `model.preprocess`.
    """

    metrics = ("loss", "acc", "top5")
    monitor = "val_acc"
    train_sum_keys = ("correct",)
    eval_sum_keys = ("loss", "top1", "top5")
    log_metrics = ("train_acc", "val_loss", "val_acc", "ema_acc")

    def __init__(self, train_transform: nn.Module | None = None, eval_transform: nn.Module | None = None) -> None:
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.mixup = None
        self.label_smoothing = 0.0
        self.num_classes = 0

    def check_model(self, model: nn.Module) -> None:
        n = getattr(model, "num_classes", None)
        if not n:
            raise ValueError("the model has no classifier head (num_classes=0); give it one with reset_classifier(n)")
        self.num_classes = int(n)

    def setup(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.check_model(model)
        self._default_transforms(model, config)
        self.train_transform = self.train_transform.to(device)
        self.eval_transform = self.eval_transform.to(device)
        self.device = device
        self.label_smoothing = config.label_smoothing
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            from vitkit.data.mixing import Mixup

            self.mixup = Mixup(
                self.num_classes,
                config.mixup,
                config.cutmix,
                config.mixup_prob,
                config.mixup_switch_prob,
                config.label_smoothing,
            )

    def _default_transforms(self, model: nn.Module, cfg: TrainConfig) -> None:
        from vitkit.data.inference import eval_transform
        from vitkit.data.transforms import TrainTransform

        pre = getattr(model, "preprocess", None)
        if pre is None:
            if self.train_transform is None or self.eval_transform is None:
                raise ValueError("the model has no `preprocess`; pass train_transform and eval_transform explicitly")
            return
        if self.train_transform is None:
            self.train_transform = TrainTransform(
                pre.input_size,
                pre.mean,
                pre.std,
                scale=cfg.scale,
                ratio=cfg.ratio,
                hflip=cfg.hflip,
                color_jitter=cfg.color_jitter,
                auto_augment=cfg.auto_augment,
                randaug_n=cfg.randaug_n,
                randaug_m=cfg.randaug_m,
                random_erasing=cfg.random_erasing,
                interpolation=pre.interpolation,
            )
        if self.eval_transform is None:
            self.eval_transform = eval_transform(model)  # the one eval preprocessing (vitkit.data.inference)

    # --- batches -----------------------------------------------------------------------------------------------
    def _fields(self, raw: Any) -> Batch:
        if isinstance(raw, Mapping):
            if "image" not in raw or "label" not in raw:
                raise ValueError(f"a classification batch needs 'image' and 'label' fields, got {sorted(raw)}")
            return to_device({"image": raw["image"], "label": raw["label"]}, self.device)
        if not isinstance(raw, (tuple, list)) or len(raw) != 2:
            raise TypeError(
                f"a classification loader must yield (images, labels) or {{'image', 'label'}}, got {type(raw).__name__}"
            )
        return to_device({"image": raw[0], "label": raw[1]}, self.device)

    def train_batch(self, raw: Any) -> Batch:
        batch = self._fields(raw)
        x, y = batch["image"], batch["label"]
        if x.dtype == torch.uint8:
            x = self.train_transform(x)  # augmentation on the device, on the whole batch
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        return {"image": x, "label": y, "target": target}

    def eval_batch(self, raw: Any) -> Batch:
        batch = self._fields(raw)
        if batch["image"].dtype == torch.uint8:
            batch["image"] = self.eval_transform(batch["image"])
        return batch

    # --- training ----------------------------------------------------------------------------------------------
    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        return classification_loss(out, batch["target"], self.label_smoothing)

    def train_sums(self, out: Tensor, batch: Batch) -> dict[str, float]:
        # Against the true label even under Mixup, as timm and DeiT report it.
        return {"correct": int((out.argmax(dim=-1) == batch["label"]).sum())}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"acc": sums["correct"] / max(sums["seen"], 1)}

    def progress(self, sums: Mapping[str, float]) -> dict[str, str]:
        return {"acc": f"{sums['correct'] / max(sums['seen'], 1):.3f}"}

    # --- evaluation --------------------------------------------------------------------------------------------
    def eval_sums(self, out: Tensor, batch: Batch) -> dict[str, float]:
        logits, y = out.float(), batch["label"]
        top1, top5 = topk_correct(logits, y, (1, 5))
        return {"loss": float(F.cross_entropy(logits, y, reduction="sum")), "top1": top1, "top5": top5}

    def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, Any]:
        n = sums["n"]
        has_top5 = self.num_classes > 5
        if n == 0:
            nan = float("nan")
            return {"loss": nan, "acc": nan, "top5": nan if has_top5 else None, "n": 0}
        return {
            "loss": sums["loss"] / n,
            "acc": sums["top1"] / n,
            "top5": sums["top5"] / n if has_top5 else None,
            "n": int(n),
        }
