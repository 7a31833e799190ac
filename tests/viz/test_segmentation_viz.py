"""Segmentation pictures: overlays tint only object pixels, saved masks read back as the same class indices."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitkit.data.segmentation import read_mask
from vitkit.viz.segmentation import class_colours, overlay_mask, save_mask, save_overlay, save_prediction_grid


def test_overlay_tints_objects_and_keeps_background_and_ignored_pixels():
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2], [255, 1, 0]], np.uint8)
    out = overlay_mask(image, mask, 3, alpha=1.0)
    colours = class_colours(3)
    assert np.array_equal(out[0, 0], image[0, 0]) and np.array_equal(out[1, 0], image[1, 0])  # background, 255
    assert np.array_equal(out[0, 1], colours[1]) and np.array_equal(out[0, 2], colours[2])
    half = overlay_mask(image, mask, 3, alpha=0.5)
    assert np.array_equal(half[0, 1], np.rint((100 + colours[1].astype(float)) / 2).astype(np.uint8))
    with pytest.raises(ValueError, match=r"image \(2, 3\) and mask \(3, 2\) must have the same height and width"):
        overlay_mask(image, mask.T, 3)


def test_saved_mask_reads_back_as_class_indices_and_pictures_are_written(tmp_path):
    mask = np.array([[0, 1, 2, 4], [4, 3, 2, 0]], np.uint8)
    names = ["bg", "a", "b", "c", "d"]
    path = save_mask(mask, names, tmp_path / "m.png")
    assert Image.open(path).mode == "P"
    assert np.array_equal(read_mask(path, len(names)), mask)
    image = np.zeros((2, 4, 3), np.uint8)
    shares = {"bg": 0.25, "a": 0.125, "b": 0.25, "c": 0.125, "d": 0.25}
    overlay = Image.open(save_overlay(image, mask, names, tmp_path / "o.png", shares))
    assert overlay.mode == "RGB" and overlay.width >= 2 * 4 * 64  # enlarged to at least 256 px high
    grid = Image.open(save_prediction_grid([image] * 2, [mask] * 2, [mask] * 2, names, tmp_path / "g.png", scale=2))
    assert grid.width == (3 * 4 + 2 * 4) * 2


def test_output_stems_keep_same_named_inputs_apart(tmp_path):
    from vitkit.viz.segmentation import output_stems

    assert output_stems([tmp_path / "x/scene.png", tmp_path / "y/road.jpg"]) == ["scene", "road"]
    assert output_stems([tmp_path / "a/0.png", tmp_path / "b/0.png", tmp_path / "b/1.png"]) == ["a/0", "b/0", "b/1"]
    assert output_stems([tmp_path / "0.png", tmp_path / "0.jpg"]) == ["0.png", "0.jpg"]


def test_predict_writes_one_overlay_per_image_when_file_names_repeat(tmp_path):
    # A class-folder tree (a/0.png, b/0.png) used to give one overlay per file name, the later image overwriting the
    # earlier one without a word.
    import torch

    from vitkit.cli import main
    from vitkit.models.segmentation import ViTSegmentation

    torch.manual_seed(0)
    ViTSegmentation("vit_nano_patch4_32", 3, backbone_args={"img_size": 16}).save_pretrained(tmp_path / "seg")
    for folder in ("a", "b"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / folder / "0.png")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(tmp_path / "seg"), str(tmp_path / "images"), "--out", str(out)]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "a/0.mask.png", "a/0.overlay.png", "b/0.mask.png", "b/0.overlay.png"
    ]  # fmt: skip
