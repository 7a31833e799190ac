"""COCO detection metrics through pycocotools: mAP@[0.5:0.95] and mAP@0.5 of boxes, computed in memory.

    coco_map(predictions, targets)   # -> {"map": ..., "map50": ..., "map75": ..., "n_images", "n_boxes"}

Inputs are per image, in vitkit's API format (xyxy boxes in pixels, class indices 0..K-1); this module converts
them to COCO's (xywh, category ids) and lets `COCOeval` do the matching, the 101-point interpolated precision and
the averaging over IoU thresholds and classes, exactly as COCO's own evaluation server does.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vitkit.data.boxes import xyxy_to_xywh


def _array(value: Any, name: str, shape_tail: tuple[int, ...], index: int) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.size == 0:
        arr = arr.reshape((0, *shape_tail))
    if arr.shape[1:] != shape_tail:
        raise ValueError(
            f"image {index}: {name} must have shape (k, {', '.join(map(str, shape_tail))}), got {arr.shape}"
        )
    return arr


def _boxes_xywh(boxes: np.ndarray) -> np.ndarray:
    return xyxy_to_xywh(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)).numpy()


def coco_map(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    num_classes: int | None = None,
) -> dict[str, Any]:
    """COCO box mAP of predictions against ground truth, image by image.

    Args:
        predictions: per image, "boxes" (k, 4) xyxy in pixels, "scores" (k,), "labels" (k,) class indices.
        targets: per image (same order and length), "boxes" (m, 4) xyxy in pixels and "labels" (m,).
        num_classes: K, the classes a category may be (default: the largest label seen + 1). Classes without a
            ground-truth box in any image are left out of the mean, as COCO does.

    Returns:
        {"map": AP at IoU 0.50:0.95, "map50": AP at IoU 0.5, "map75": AP at IoU 0.75, "n_images", "n_boxes" (ground
        truth)}. Without any ground-truth box the APs are undefined and NaN; with ground truth but no prediction
        they are 0.

    Raises:
        ValueError: lengths that differ, boxes of the wrong shape, labels outside 0..num_classes-1, a score that is
            not finite.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images; give one per image")
    gts, dets = [], []
    max_label = -1
    for i, (p, t) in enumerate(zip(predictions, targets, strict=True)):
        tb, tl = _array(t["boxes"], "target boxes", (4,), i), _array(t["labels"], "target labels", (), i)
        pb, pl = _array(p["boxes"], "predicted boxes", (4,), i), _array(p["labels"], "predicted labels", (), i)
        ps = _array(p["scores"], "scores", (), i)
        if len(tb) != len(tl) or not len(pb) == len(pl) == len(ps):
            raise ValueError(f"image {i}: boxes, labels (and scores) must have the same length")
        if len(ps) and not np.isfinite(ps).all():
            raise ValueError(f"image {i}: scores must be finite")
        gts.append((tb, tl.astype(np.int64)))
        dets.append((pb, pl.astype(np.int64), ps.astype(np.float64)))
        max_label = max([max_label, *tl.tolist(), *pl.tolist()])
    K = num_classes if num_classes is not None else max_label + 1
    for i, ((_, tl), (_, pl, _)) in enumerate(zip(gts, dets, strict=True)):
        bad = [int(v) for v in np.concatenate([tl, pl]) if not 0 <= v < K]
        if bad:
            raise ValueError(f"image {i}: labels {bad} are outside the classes 0..{K - 1}")

    n_boxes = sum(len(tl) for _, tl in gts)
    out: dict[str, Any] = {"n_images": len(targets), "n_boxes": n_boxes}
    if n_boxes == 0:
        return {"map": float("nan"), "map50": float("nan"), "map75": float("nan"), **out}
    if sum(len(pl) for _, pl, _ in dets) == 0:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, **out}

    # Category ids are 1-based (COCO's convention; 0 is not used), image ids the positions.
    annotations = []
    for img, (tb, tl) in enumerate(gts):
        for box, label in zip(_boxes_xywh(tb), tl, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img,
                    "category_id": int(label) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    results = [
        {"image_id": img, "category_id": int(label) + 1, "bbox": [float(v) for v in box], "score": float(score)}
        for img, (pb, pl, ps) in enumerate(dets)
        for box, label, score in zip(_boxes_xywh(pb), pl, ps, strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i} for i in range(len(targets))],
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(K)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats  # [AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...]; -1 = undefined
    return {"map": _defined(s[0]), "map50": _defined(s[1]), "map75": _defined(s[2]), **out}


def _defined(value: float) -> float:
    return float("nan") if value < 0 else float(value)
