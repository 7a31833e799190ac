"""Box formats, areas, IoU and GIoU on hand-made cases with known answers."""

from __future__ import annotations

import pytest
import torch

from vitkit.data.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    denormalize_boxes,
    generalized_box_iou,
    normalize_boxes,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)

XYXY = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 2.0, 9.0, 12.0], [1.5, 3.5, 40.0, 7.0]])


def test_formats_by_hand():
    box = torch.tensor([[2.0, 4.0, 12.0, 10.0]])  # x0, y0, x1, y1
    assert xyxy_to_xywh(box).tolist() == [[2.0, 4.0, 10.0, 6.0]]
    assert xyxy_to_cxcywh(box).tolist() == [[7.0, 7.0, 10.0, 6.0]]
    torch.testing.assert_close(normalize_boxes(box, (20, 40)), torch.tensor([[2 / 40, 4 / 20, 12 / 40, 10 / 20]]))


@pytest.mark.parametrize(("there", "back"), [(xyxy_to_xywh, xywh_to_xyxy), (xyxy_to_cxcywh, cxcywh_to_xyxy)])
def test_round_trips(there, back):
    torch.testing.assert_close(back(there(XYXY)), XYXY)
    torch.testing.assert_close(there(back(XYXY)), XYXY)


def test_normalise_round_trip_and_per_image_sizes():
    torch.testing.assert_close(denormalize_boxes(normalize_boxes(XYXY, (48, 64)), (48, 64)), XYXY)
    sizes = torch.tensor([[10, 20], [100, 50], [8, 40]])  # one (H, W) per box
    n = normalize_boxes(XYXY, sizes)
    torch.testing.assert_close(n[1], torch.tensor([5 / 50, 2 / 100, 9 / 50, 12 / 100]))
    torch.testing.assert_close(denormalize_boxes(n, sizes), XYXY)


def test_area_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [1.0, 1.0, 1.0, 5.0]])
    assert box_area(b).tolist() == [4.0, 4.0, 1.0, 0.0]
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0, 0.0]]))


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 6.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    # Overlap: IoU 1/7, enclosing 3x3 = 9, union 7 -> 1/7 - 2/9. Disjoint side by side: enclosing 6x2 = 12,
    # union 8 -> 0 - 4/12. A point at a corner: union 4 = enclosing -> 0.
    expected = torch.tensor([[1 / 7 - 2 / 9, 1.0, -1 / 3, 0.0]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def test_giou_bounds_and_symmetry():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 5 + 0.1], dim=1)
    giou = generalized_box_iou(boxes, boxes)
    assert giou.min() >= -1 and giou.max() <= 1
    torch.testing.assert_close(giou, giou.T)
    torch.testing.assert_close(torch.diag(giou), torch.ones(20))
    assert (giou <= box_iou(boxes, boxes) + 1e-6).all()  # GIoU is a lower bound of IoU


def test_clip_and_errors():
    assert clip_boxes(torch.tensor([[-3.0, 2.0, 70.0, 80.0]]), (64, 48)).tolist() == [[0.0, 2.0, 48.0, 64.0]]
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        xyxy_to_xywh([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="positive"):
        normalize_boxes(XYXY, (0, 10))
