"""Object detection as set prediction (DETR, Carion et al. 2020): Hungarian matching, the set criterion, mAP.

Loaders yield `(images, targets)`: uint8 images (B, 3, H, W) and per image {"boxes": (k, 4) xyxy in pixels,
"labels": (k,)} (`DetectionLoader`, `vitkit.data.detection`). Training augments images and boxes together on the
device (`DetectionTransform`); the model (`vitkit.models.ViTDETR`) predicts Q boxes per image, each with K + 1 class
logits (the last "no object").

Per image, `hungarian_match` pairs each ground-truth box with one prediction, minimising
    cost_class * -p(class) + cost_bbox * L1(cxcywh) + cost_giou * -GIoU      (DETR's 1 / 5 / 2)
with scipy's `linear_sum_assignment`. `SetCriterion` then scores the whole set: cross-entropy over every query
(matched ones to their class, the others to "no object" with weight eos_coef = 0.1), plus L1 (x 5) and 1 - GIoU
(x 2) on the matched boxes, divided by the number of ground-truth boxes in the global batch (over all processes);
the same loss on every earlier decoder layer (auxiliary losses) is added.

Evaluation collects every image's scored boxes and computes COCO mAP / mAP@0.5 with pycocotools
(`vitkit.train.det_metrics`) over the whole split: `collects = True` on the Task interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data.boxes import (
    clip_boxes,
    cxcywh_to_xyxy,
    denormalize_boxes,
    generalized_box_iou,
    normalize_boxes,
    xyxy_to_cxcywh,
)
from vitkit.data.detection import DetectionDataset, DetectionTransform
from vitkit.train.config import TrainConfig
from vitkit.train.loader import BatchLoader
from vitkit.train.tasks.base import Batch, Task

Target = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Matching and loss
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def match_cost(
    logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, cost_class: float, cost_bbox: float,
    cost_giou: float,
) -> Tensor:  # fmt: skip
    """The (Q, m) cost of pairing each of Q predictions with each of m targets of one image.

    Args:
        logits: (Q, K + 1) class logits. boxes: (Q, 4) cxcywh normalised. labels: (m,) classes.
        target_boxes: (m, 4) cxcywh normalised. cost_*: the weights of the three terms.
    """
    prob = logits.float().softmax(-1)  # (Q, K + 1)
    c_class = -prob[:, labels]  # (Q, m): 1 - p, up to a constant that does not change the assignment
    c_bbox = torch.cdist(boxes.float(), target_boxes.float(), p=1)  # (Q, m)
    c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
    return cost_class * c_class + cost_bbox * c_bbox + cost_giou * c_giou


@torch.no_grad()
def hungarian_match(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    targets: Sequence[Target],
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
) -> list[tuple[Tensor, Tensor]]:
    """DETR's optimal one-to-one assignment of predictions to targets, image by image.

    Args:
        pred_logits: (B, Q, K + 1). pred_boxes: (B, Q, 4) cxcywh normalised.
        targets: per image "labels" (m,) and "boxes" (m, 4) cxcywh normalised (m <= Q).
        cost_class, cost_bbox, cost_giou: weights of -p(class), L1 and -GIoU (DETR: 1, 5, 2).

    Returns:
        Per image (prediction indices, target indices), two int64 tensors of length m: prediction
        `pred[i]` is matched to target `tgt[i]`.

    Raises:
        ValueError: an image with more targets than queries.
    """
    from scipy.optimize import linear_sum_assignment

    out = []
    for b, t in enumerate(targets):
        m = len(t["labels"])
        if m > pred_logits.shape[1]:
            raise ValueError(
                f"image {b} has {m} objects but the model has only {pred_logits.shape[1]} queries; raise num_queries"
            )
        if m == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            out.append((empty, empty))
            continue
        cost = match_cost(pred_logits[b], pred_boxes[b], t["labels"], t["boxes"], cost_class, cost_bbox, cost_giou)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


class SetCriterion(nn.Module):
    """DETR's loss: matching, then class cross-entropy over all queries and L1 + GIoU on the matched boxes.

    Args:
        num_classes: K object classes (the logits have K + 1, the last "no object").
        eos_coef: weight of the "no object" class in the cross-entropy (DETR: 0.1; most queries are empty).
        weight_class, weight_bbox, weight_giou: loss weights (DETR: 1, 5, 2); the matching costs are the same.
    """

    def __init__(
        self,
        num_classes: int,
        eos_coef: float = 0.1,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = (weight_class, weight_bbox, weight_giou)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def _layer(self, logits: Tensor, boxes: Tensor, targets: Sequence[Target], num_boxes: float) -> dict[str, Tensor]:
        """(ce, l1, giou) of one decoder layer's output."""
        wc, wb, wg = self.weights
        indices = hungarian_match(logits, boxes, targets, wc, wb, wg)
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(indices)]).to(logits.device)
        pred_idx = torch.cat([p for p, _ in indices]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        target_classes[batch_idx, pred_idx] = matched_labels.to(logits.device)
        ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight.to(logits.device))
        src = boxes[batch_idx, pred_idx].float()  # (M, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)]).float().to(src.device)
        l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = (1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))).sum() / num_boxes
        return {"ce": ce, "l1": l1, "giou": giou}

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Target], num_boxes: float, aux: bool = True
    ) -> dict[str, Tensor]:
        """The losses of a batch.

        Args:
            outputs: the model's dict ("pred_logits", "pred_boxes", "aux_outputs").
            targets: per image "labels" (m,) and "boxes" (m, 4) cxcywh normalised.
            num_boxes: the divisor of the box losses: ground-truth boxes in the global batch per process (>= 1).
            aux: add the auxiliary losses of the earlier decoder layers.

        Returns:
            {"loss": the weighted total, "ce", "l1", "giou": the last layer's unweighted terms}.
        """
        wc, wb, wg = self.weights
        last = self._layer(outputs["pred_logits"], outputs["pred_boxes"], targets, num_boxes)
        total = wc * last["ce"] + wb * last["l1"] + wg * last["giou"]
        if aux:
            for layer in outputs.get("aux_outputs", []):
                part = self._layer(layer["pred_logits"], layer["pred_boxes"], targets, num_boxes)
                total = total + wc * part["ce"] + wb * part["l1"] + wg * part["giou"]
        return {"loss": total, **last}


@torch.no_grad()
def postprocess(outputs: Mapping[str, Tensor], sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Model outputs -> per image every query's box in pixels, score and label (DETR's PostProcess).

    The score is the highest probability among the K real classes (softmax over K + 1), the label its class; no
    threshold and no NMS (set prediction makes duplicates rare; mAP wants every scored box). Boxes are clipped to
    the image (a centre near an edge with a large width would otherwise reach past it).

    Args:
        outputs: "pred_logits" (B, Q, K + 1), "pred_boxes" (B, Q, 4) cxcywh normalised.
        sizes: per image the (H, W) to scale the boxes to.

    Returns:
        Per image {"boxes": float32 (Q, 4) xyxy pixels, "scores": (Q,), "labels": int64 (Q,)}, sorted by score.
    """
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # (B, Q, K)
    scores, labels = prob.max(-1)
    out = []
    for b, size in enumerate(sizes):
        boxes = clip_boxes(denormalize_boxes(cxcywh_to_xyxy(outputs["pred_boxes"][b].float()), tuple(size)), size)
        order = scores[b].argsort(descending=True)
        out.append({"boxes": boxes[order], "scores": scores[b][order], "labels": labels[b][order]})
    return out


def _global_box_count(count: int, device: torch.device) -> float:
    """Ground-truth boxes per process in the global batch (DETR's num_boxes): summed over DDP processes, divided
    by their number (DDP averages the gradients), at least 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return max(float(t.item()) / dist.get_world_size(), 1.0)
    return max(float(count), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Data loading
# ----------------------------------------------------------------------------------------------------------------
class DetectionLoader(BatchLoader):
    """`BatchLoader`'s order, sharding and exact resume for a `DetectionDataset`: yields (uint8 images (b, 3, H, W),
    [targets]) batches."""

    def __init__(self, dataset: DetectionDataset, batch_size: int, **kwargs: Any) -> None:
        if not isinstance(dataset, DetectionDataset):
            raise TypeError(f"DetectionLoader needs a DetectionDataset, got {type(dataset).__name__}")
        super().__init__(dataset, batch_size, **kwargs)  # type: ignore[arg-type]

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[Tensor, list[Target]]]:  # type: ignore[override]
        for idx in self.local_indices(start_batch):
            if len(idx):
                yield self.dataset.batch(idx)


# ----------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------
class DetectionTask(Task):
    """Train a `ViTDETR` on (images, targets) batches with DETR's set criterion; evaluate COCO mAP.

    Batch fields: "image" (B, C, H, W) normalised, "targets" per image {"labels" (m,), "boxes" (m, 4) cxcywh
    normalised, "boxes_xyxy" (m, 4) in pixels of the model input}. Train columns: train_loss and the last
    layer's unweighted train_ce, train_l1, train_giou; evaluation: loss (the total without auxiliary terms),
    map (COCO AP@[0.5:0.95]), map50 (AP@0.5), map75.

    Args:
        eos_coef, weight_class, weight_bbox, weight_giou: see `SetCriterion` (DETR's defaults).
        max_zoom, hflip: training augmentation (see `DetectionTransform`); hflip None = the recipe's.
    """

    metrics = ("loss", "map", "map50", "map75")
    monitor = "val_map50"
    train_sum_keys = ("ce", "l1", "giou")
    eval_sum_keys = ("loss",)
    log_metrics = ("train_giou", "val_loss", "val_map", "val_map50", "ema_map50")
    collects = True

    def __init__(
        self,
        eos_coef: float = 0.1,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        max_zoom: float = 1.25,
        hflip: float | None = None,
    ) -> None:
        self.criterion_args = dict(
            eos_coef=eos_coef, weight_class=weight_class, weight_bbox=weight_bbox, weight_giou=weight_giou
        )
        self.max_zoom = max_zoom
        self.hflip = hflip
        self._last: dict[str, float] = {}

    def check_model(self, model: nn.Module) -> None:
        if getattr(model, "family", None) != "detr":
            raise ValueError(
                f"task='detect' trains a detector (vitkit.models.ViTDETR), got {type(model).__name__}; wrap the "
                "backbone: ViTDETR(backbone, num_classes)"
            )

    def setup(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.check_model(model)
        pre = model.preprocess
        self.size = tuple(pre.input_size)
        hflip = config.hflip if self.hflip is None else self.hflip
        self.train_transform = DetectionTransform(
            self.size, pre.mean, pre.std, train=True, max_zoom=self.max_zoom, hflip=hflip
        ).to(device)
        self.eval_transform = DetectionTransform(self.size, pre.mean, pre.std).to(device)
        self.criterion = SetCriterion(model.num_classes, **self.criterion_args).to(device)
        self.num_classes = model.num_classes
        self.device = device

    # --- batches -----------------------------------------------------------------------------------------------
    def _fields(self, raw: Any, transform: DetectionTransform) -> Batch:
        if not isinstance(raw, (tuple, list)) or len(raw) != 2 or not isinstance(raw[1], (list, tuple)):
            raise TypeError(
                f"a detection loader must yield (images, [targets]) (e.g. DetectionLoader), got {type(raw).__name__}"
            )
        images = raw[0].to(self.device, non_blocking=self.device.type == "cuda")
        images, targets = transform(images, [{k: v.to(self.device) for k, v in t.items()} for t in raw[1]])
        for t in targets:
            t["boxes_xyxy"] = t["boxes"]
            t["boxes"] = xyxy_to_cxcywh(normalize_boxes(t["boxes"], self.size))  # what the model predicts
        return {"image": images, "targets": targets}  # type: ignore[dict-item]

    def train_batch(self, raw: Any) -> Batch:
        return self._fields(raw, self.train_transform)

    def eval_batch(self, raw: Any) -> Batch:
        return self._fields(raw, self.eval_transform)

    def batch_size(self, batch: Batch) -> int:
        return len(batch["image"])

    # --- training ----------------------------------------------------------------------------------------------
    def loss(self, out: Any, batch: Batch) -> Tensor:
        targets = batch["targets"]
        num_boxes = _global_box_count(sum(len(t["labels"]) for t in targets), self.device)
        losses = self.criterion(out, targets, num_boxes)
        self._last = {k: float(losses[k].detach()) for k in ("ce", "l1", "giou")}
        return losses["loss"]

    def train_sums(self, out: Any, batch: Batch) -> dict[str, float]:
        n = self.batch_size(batch)
        return {k: v * n for k, v in self._last.items()}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        seen = max(sums["seen"], 1)
        return {k: sums[k] / seen for k in self.train_sum_keys}

    def progress(self, sums: Mapping[str, float]) -> dict[str, str]:
        return {"giou": f"{sums['giou'] / max(sums['seen'], 1):.3f}"}

    # --- evaluation --------------------------------------------------------------------------------------------
    def eval_sums(self, out: Any, batch: Batch) -> dict[str, float]:
        targets = batch["targets"]
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        loss = self.criterion(out, targets, num_boxes, aux=False)["loss"]
        return {"loss": float(loss) * self.batch_size(batch)}

    def eval_collect(self, out: Any, batch: Batch) -> list[Any]:
        dets = postprocess(out, [self.size] * self.batch_size(batch))
        return [
            (
                {k: v.cpu().numpy() for k, v in d.items()},
                {"boxes": t["boxes_xyxy"].cpu().numpy(), "labels": t["labels"].cpu().numpy()},
            )
            for d, t in zip(dets, batch["targets"], strict=True)
        ]

    def eval_metrics(self, sums: Mapping[str, float], collected: list[Any] | None = None) -> dict[str, Any]:
        from vitkit.train.det_metrics import coco_map

        n = sums["n"]
        if n == 0:
            nan = float("nan")
            return {"loss": nan, "map": nan, "map50": nan, "map75": nan, "n": 0}
        collected = collected or []
        scores = coco_map([p for p, _ in collected], [t for _, t in collected], self.num_classes)
        return {
            "loss": sums["loss"] / n,
            "map": scores["map"],
            "map50": scores["map50"],
            "map75": scores["map75"],
            "n": int(n),
        }
