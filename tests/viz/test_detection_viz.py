"""Detections drawn on images: boxes land where the detection says, in its class colour; grids tile pictures."""

from __future__ import annotations

import numpy as np
import pytest

from vitkit.viz.detection import PALETTE, detection_grid, draw_detections, save_detection_images


def test_box_outline_is_drawn_in_the_class_colour():
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    det = [{"box": [8, 20, 40, 30], "label": 2, "class": "triangle", "score": 0.9}]
    pic = np.asarray(draw_detections(image, det, scale=1))
    assert pic.shape == (32, 48, 3)
    assert tuple(pic[25, 8]) == PALETTE[2] and tuple(pic[25, 39]) == PALETTE[2]  # left and right edges
    assert tuple(pic[25, 24]) == (0, 0, 0)  # inside stays the image
    assert draw_detections(image, det).size == (48 * 8, 32 * 8)  # upscaled to >= 384 px


def test_save_and_grid(tmp_path):
    image = np.full((16, 16, 3), 90, dtype=np.uint8)
    results = [{"path": "a/x.png", "image": image, "detections": []}, {"path": "b/x.png", "image": image,
                                                                        "detections": []}]  # fmt: skip
    paths = save_detection_images(results, tmp_path)
    assert [p.name for p in paths] == ["x_detections.png", "x_2_detections.png"] and all(p.is_file() for p in paths)
    grid = detection_grid([draw_detections(image, [], scale=2)] * 5, columns=2, gap=1)
    assert grid.size == (2 * 32 + 1, 3 * 32 + 2)
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(image.astype(np.float32), [])
