"""Boxes: every conversion between box formats happens here, and nowhere else.

Formats (each a tensor (..., 4), float):
    xyxy     x0, y0, x1, y1: the left/top and right/bottom edges. vitkit's API format (boxes in targets and
             predictions, `make_scenes`). In pixels, x1/y1 are exclusive edges: a box covering pixel columns
             0..9 is x0=0, x1=10, so its width is x1 - x0.
    xywh     x0, y0, width, height: COCO's format, in annotation files and in `--json` results (pixels).
    cxcywh   centre x, centre y, width, height: what DETR predicts, normalised to [0, 1] by the image size.

Pixels <-> normalised: x / W, y / H (and back), for any of the formats (all four numbers are x or y lengths in
the order x, y, x, y).

IoU and GIoU (Rezatofighi et al. 2019) take xyxy boxes in any one unit; degenerate boxes (zero area) are allowed
and have IoU 0 with everything (GIoU then falls back to its enclosing-box term).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(boxes: Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., 4), got {type(boxes).__name__}")
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")


# --- format conversions --------------------------------------------------------------------------------------------
def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(..., 4) x0, y0, x1, y1 -> x0, y0, w, h (COCO), same unit."""
    _check(boxes)
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) x0, y0, w, h (COCO) -> x0, y0, x1, y1, same unit."""
    _check(boxes)
    x0, y0, w, h = boxes.unbind(-1)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) x0, y0, x1, y1 -> cx, cy, w, h, same unit."""
    _check(boxes)
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cx, cy, w, h -> x0, y0, x1, y1, same unit."""
    _check(boxes)
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _size_scale(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """(W, H, W, H) for an image size (H, W) or a (..., 2) tensor of (H, W), broadcastable against `boxes`."""
    if isinstance(size, Tensor):
        if size.shape[-1:] != (2,):
            raise ValueError(f"size must be (H, W) or a (..., 2) tensor of (H, W), got shape {tuple(size.shape)}")
        h, w = size.to(boxes.dtype).unbind(-1)
        return torch.stack([w, h, w, h], dim=-1).to(boxes.device)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be a positive (H, W), got {size!r}")
    h, w = size
    return torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)


def normalize_boxes(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """Pixels -> [0, 1]: divide x by the width and y by the height (any of the formats above).

    Args:
        boxes: (..., 4) in pixels.
        size: the image's (H, W), or a (..., 2) tensor of per-image (H, W) broadcastable against `boxes[..., :2]`.
    """
    _check(boxes)
    return boxes / _size_scale(boxes, size)


def denormalize_boxes(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """[0, 1] -> pixels: multiply x by the width and y by the height (the inverse of `normalize_boxes`)."""
    _check(boxes)
    return boxes * _size_scale(boxes, size)


# --- areas and overlaps ----------------------------------------------------------------------------------------------
def box_area(boxes: Tensor) -> Tensor:
    """Areas (...,) of xyxy boxes (..., 4); an inverted box (x1 < x0 or y1 < y0) has area 0."""
    _check(boxes)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise intersection and union areas (N, M) of xyxy boxes a (N, 4) and b (M, 4)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU (N, M) of xyxy boxes a (N, 4) and b (M, 4); 0 where the union is empty."""
    _check(a, "a")
    _check(b, "b")
    inter, union = _inter_union(a, b)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalised IoU (N, M) in [-1, 1] of xyxy boxes a (N, 4) and b (M, 4) (Rezatofighi et al. 2019).

    GIoU = IoU - |C minus (A union B)| / |C|, C the smallest box enclosing both: unlike IoU it still says how far
    apart two disjoint boxes are, which is what makes 1 - GIoU a useful box loss. Where C is empty (two identical
    points) the enclosing term is 0.
    """
    _check(a, "a")
    _check(b, "b")
    inter, union = _inter_union(a, b)
    tiny = torch.finfo(union.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(union))
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])  # (N, M, 2) the enclosing box
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = wh[..., 0] * wh[..., 1]
    extra = torch.where(enclose > 0, (enclose - union) / enclose.clamp(min=tiny), torch.zeros_like(enclose))
    return iou - extra


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """xyxy boxes (..., 4) in pixels clipped to an image of size (H, W)."""
    _check(boxes)
    h, w = size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
