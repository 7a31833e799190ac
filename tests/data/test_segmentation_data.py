"""Segmentation data: the scenes split rule, mask folders (palette and index PNGs) with every kind of bad pair
reported by file name or refused under strict, and augmentation that moves image and mask together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.segmentation import (
    SegEvalTransform,
    SegTrainTransform,
    load_mask_folder,
    load_segmentation_data,
    read_class_list,
)
from vitkit.data.shapes import SCENE_CLASSES, make_scenes


def test_scenes_split_is_first_80_then_10_then_10_percent_of_make_scenes():
    splits = load_segmentation_data("scenes:50", seed=3, shapes_size=16)
    images, masks, _ = make_scenes(50, 16, 16, 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 5, 5)
    assert torch.equal(splits.train.images, images[:40]) and torch.equal(splits.test.masks, masks[45:].to(torch.uint8))
    assert splits.class_names == list(SCENE_CLASSES) and splits.skipped == []
    again = load_segmentation_data("scenes:50", seed=3, shapes_size=16)
    assert torch.equal(again.val.masks, splits.val.masks)
    with pytest.raises(ValueError, match=r"scenes:N needs a positive integer N, got 'scenes:x'"):
        load_segmentation_data("scenes:x")
    with pytest.raises(ValueError, match=r"unknown segmentation data spec 'nowhere'"):
        load_segmentation_data("nowhere")


def _palette_png(mask: np.ndarray, path) -> None:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (3 * 253))
    img.save(path)


def _folder(tmp_path, n: int = 6):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nred\ngreen\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((12, 20), np.uint8)
        mask[2:8, 3 + i : 10 + i] = 1 + i % 2
        mask[0, 0] = 255  # ignored
        image = (rng.integers(0, 60, (12, 20, 3)) + mask[..., None].clip(0, 2) * 90).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i}.jpg" if i % 2 else root / "images" / f"img{i}.png")
        if i % 2:
            _palette_png(mask, root / "masks" / f"img{i}.png")
        else:
            Image.fromarray(mask, mode="L").save(root / "masks" / f"img{i}.png")
    return root


def test_a_mask_folder_reads_palette_and_index_masks_at_the_decode_size(tmp_path):
    root = _folder(tmp_path)
    ds, skipped = load_mask_folder(root, size=12)
    assert skipped == [] and len(ds) == 6 and ds.class_names == ["background", "red", "green"]
    assert ds.images.shape == (6, 3, 12, 12) and ds.masks.shape == (6, 12, 12)
    # The mask is cropped like its image (20 -> centre 12 columns: 4..15) with its values intact.
    expected = np.zeros((12, 20), np.uint8)
    expected[2:8, 4:11] = 2
    assert np.array_equal(ds.masks[1].numpy(), expected[:, 4:16])
    assert set(torch.unique(ds.masks).tolist()) == {0, 1, 2}  # 255 sat in the cropped-away corner
    splits = load_segmentation_data(str(root), load_size=12, val_fraction=0.2, test_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 1, 1)


def test_bad_pairs_are_reported_by_file_and_refused_under_strict(tmp_path):
    root = _folder(tmp_path)
    (root / "masks" / "img0.png").unlink()  # an image without its mask
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(root / "masks" / "orphan.png")  # mask, no image
    Image.fromarray(np.zeros((12, 19), np.uint8), mode="L").save(root / "masks" / "img1.png")  # wrong size
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(root / "masks" / "img2.png")  # colour mask
    Image.fromarray(np.full((12, 20), 7, np.uint8), mode="L").save(root / "masks" / "img3.png")  # value 7: no class
    (root / "masks" / "img4.png").write_bytes(b"not a png")  # unreadable
    with pytest.warns(UserWarning, match="skipped 6 bad file"):
        ds, skipped = load_mask_folder(root, size=12)
    assert len(ds) == 1 and ds.paths == [str(root / "images" / "img5.jpg")]
    reasons = {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1]: r for p, r in skipped}
    assert reasons["images/img0.png"].startswith("has no mask")
    assert reasons["masks/orphan.png"].startswith("has no image")
    assert "mask is 19x12 but its image img1.jpg is 20x12" in reasons["masks/img1.png"]
    assert "colour (RGB) mask" in reasons["masks/img2.png"]
    assert "value(s) [7] that are not classes of classes.txt (0..2) nor 255" in reasons["masks/img3.png"]
    assert "cannot be decoded" in reasons["masks/img4.png"]
    with pytest.raises(ValueError, match=r"img0\.png: has no mask.*strict=False"):
        load_mask_folder(root, size=12, strict=True)


def test_files_sharing_a_stem_are_reported_not_paired_silently(tmp_path):
    root = _folder(tmp_path)
    (root / "masks" / "img1.txt").write_text("notes")  # not an image: reported, img1 still pairs
    Image.fromarray(np.zeros((12, 20), np.uint8), mode="L").save(root / "masks" / "img3.bmp")  # two masks for img3
    with pytest.warns(UserWarning, match="skipped 3 bad file"):
        ds, skipped = load_mask_folder(root, size=12)
    reasons = {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1]: r for p, r in skipped}
    assert reasons["masks/img1.txt"].startswith("not an image file")
    assert "shares the stem 'img3' with img3.png" in reasons["masks/img3.bmp"]
    assert "shares the stem 'img3' with img3.bmp" in reasons["masks/img3.png"]
    assert len(ds) == 5 and str(root / "images" / "img3.jpg") not in ds.paths  # no guess at which mask is meant
    with pytest.raises(ValueError, match=r"img1\.txt: not an image file"):
        load_mask_folder(root, size=12, strict=True)


def test_class_list_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"classes\.txt is missing"):
        read_class_list(tmp_path / "classes.txt")
    (tmp_path / "classes.txt").write_text("bg\ncat\ncat\n")
    with pytest.raises(ValueError, match=r"names class\(es\) \['cat'\] more than once"):
        read_class_list(tmp_path / "classes.txt")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"is not a segmentation folder: it needs images/ and masks/"):
        load_segmentation_data(str(tmp_path / "plain"))


def test_augmentation_moves_image_and_mask_together():
    # The image encodes its mask (class k -> grey level 60 k), so after any crop and flip the two must still agree.
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (6, 1, 8, 8), generator=g).to(torch.uint8)
    masks = torch.nn.functional.interpolate(masks.float(), scale_factor=4, mode="nearest")[:, 0].to(torch.uint8)
    images = (masks * 60)[:, None].expand(-1, 3, -1, -1).contiguous()
    torch.manual_seed(1)
    aug = SegTrainTransform((24, 24), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), scale=(0.3, 1.0), hflip=0.5)
    x, m = aug(images, masks)
    assert x.shape == (6, 3, 24, 24) and m.shape == (6, 24, 24) and m.dtype == torch.long
    assert set(torch.unique(m).tolist()) <= {0, 1, 2, 3}  # nearest: no blended class values
    level = x[:, 0] * 255 / 60
    flat = (level - level.round()).abs() < 0.02  # away from class edges, where bilinear blends two levels
    assert flat.float().mean() > 0.5
    assert (level.round()[flat] == m[flat]).float().mean() > 0.97
    # A full-size crop with a certain flip is an exact mirror of both.
    flip = SegTrainTransform((32, 32), (0.0,) * 3, (1.0,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    x, m = flip(images, masks)
    assert torch.equal(m, masks.flip(-1).long())
    assert torch.allclose(x * 255, images.flip(-1).float(), atol=1e-3)
    ev = SegEvalTransform((16, 16), (0.5,) * 3, (0.25,) * 3)(images)
    assert ev.shape == (6, 3, 16, 16)


@pytest.mark.parametrize("width", [13, 15, 17])
def test_folder_masks_are_cropped_exactly_as_their_images(tmp_path, width):
    # Column x of the image is grey 10 x, of the mask class x: after the decode-size centre crop (no resize here, the
    # shorter side already has the size) they must still agree. An odd excess of 3 or 7 columns used to shift the
    # mask one column against the image (floor division against the image's round-half-to-even).
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("\n".join(f"c{k}" for k in range(width)) + "\n")
    cols = np.arange(width, dtype=np.uint8)
    Image.fromarray(np.broadcast_to((cols * 10)[None, :, None], (10, width, 3)).copy()).save(tmp_path / "images/a.png")
    Image.fromarray(np.broadcast_to(cols[None, :], (10, width)).copy()).save(tmp_path / "masks/a.png")
    ds, skipped = load_mask_folder(tmp_path, 10)
    assert not skipped
    image, mask = ds[0]
    assert torch.equal(image[0].long() // 10, mask.long())


@pytest.mark.parametrize("spec", ["shapes:40", "digits", "cifar10:/nowhere"])
def test_classification_data_where_masks_are_needed_is_named_as_such(spec):
    with pytest.raises(ValueError, match=rf"{spec!r} is classification data \(one label per image\)"):
        load_segmentation_data(spec)


def test_scenes_where_labels_are_needed_is_named_as_segmentation_data():
    from vitkit.data import load_data

    with pytest.raises(ValueError, match=r"'scenes:40' is segmentation data .*--task segment"):
        load_data("scenes:40")


# --- COCO instances as semantic masks ---------------------------------------------------------------------------------
def _rle(rows: slice, cols: slice, size=(30, 30)) -> dict:
    from pycocotools import mask as mask_utils

    m = np.zeros(size, dtype=np.uint8, order="F")
    m[rows, cols] = 1
    rle = mask_utils.encode(m)
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _write_coco(root, annotations) -> str:
    import json

    (root / "images").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((30, 30, 3), 90, dtype=np.uint8)).save(root / "images" / name)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 30}, {"id": 2, "file_name": "b.png"}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],  # classes in id order: cat 1, dog 2
    }
    (root / "instances.json").write_text(json.dumps(data))
    return str(root / "instances.json")


def test_coco_instances_become_semantic_masks_smaller_on_top_and_crowd_ignored(tmp_path):
    from pycocotools import mask as mask_utils

    from vitkit.data.segmentation import IGNORE_INDEX, load_coco_masks

    small = [[10, 10, 18, 10, 18, 18, 10, 18]]  # a cat polygon inside the dog
    big = [[2, 2, 26, 2, 26, 26, 2, 26]]
    path = _write_coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": small},  # earlier, but smaller: on top
        {"id": 2, "image_id": 1, "category_id": 7, "segmentation": big},
        {"id": 3, "image_id": 2, "category_id": 3, "segmentation": _rle(slice(5, 15), slice(5, 20))},
        {"id": 4, "image_id": 2, "category_id": 7, "segmentation": _rle(slice(10, 25), slice(0, 30)), "iscrowd": 1},
    ])  # fmt: skip
    ds, skipped = load_coco_masks(path, 30)
    assert skipped == [] and ds.class_names == ["background", "cat", "dog"] and ds.masks.shape == (2, 30, 30)

    def poly(p):  # what pycocotools' COCO.annToMask gives for a polygon
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p, 30, 30))).astype(bool)

    a = np.zeros((30, 30), dtype=np.uint8)
    a[poly(big)] = 2
    a[poly(small)] = 1
    assert np.array_equal(ds.masks[0].numpy(), a) and (a == 1).any() and (a == 2).any()
    b = np.zeros((30, 30), dtype=np.uint8)
    b[10:25, :] = IGNORE_INDEX  # the crowd region, where no instance covers it
    b[5:15, 5:20] = 1
    assert np.array_equal(ds.masks[1].numpy(), b)
    splits = load_segmentation_data(f"coco:{path}", load_size=30, val_fraction=0.0, test_fraction=0.5, seed=0)
    assert (len(splits.train), len(splits.test)) == (1, 1) and splits.class_names == ["background", "cat", "dog"]


def test_coco_bad_segmentation_entries_are_counted_and_strict_names_them(tmp_path):
    import warnings

    from vitkit.data.files import BadImageWarning
    from vitkit.data.segmentation import load_coco_masks

    path = _write_coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": _rle(slice(0, 4), slice(0, 4))},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5]},  # a box is no mask
        {"id": 3, "image_id": 1, "category_id": 99, "segmentation": [[0, 0, 4, 0, 4, 4]]},  # unknown category
        {"id": 4, "image_id": 2, "category_id": 7, "segmentation": _rle(slice(0, 4), slice(0, 4), (10, 10))},
        {"id": 5, "image_id": 2, "category_id": 7, "segmentation": [[1, 2, 3]]},  # too few points
    ])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds, skipped = load_coco_masks(path, 30)
    assert len(ds) == 2 and int((ds.masks[0] == 1).sum()) == 16 and int(ds.masks[1].sum()) == 0
    assert [w for w, _ in skipped] == [f"instances.json: annotations[{i}] (id {i + 1})" for i in (1, 2, 3, 4)]
    reasons = [r for _, r in skipped]
    assert "has no 'segmentation'" in reasons[0] and "unknown category_id 99" in reasons[1]
    assert "RLE size [10, 10] differs from the image's [30, 30]" in reasons[2] and "3 x, y pairs" in reasons[3]
    reports = [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(reports) == 1 and "skipped 4 bad" in str(reports[0].message)
    with pytest.raises(ValueError, match=r"instances.json: annotations\[1\] \(id 2\): has no 'segmentation'"):
        load_segmentation_data(f"coco:{path}", load_size=30, strict=True)


@pytest.mark.parametrize(("scale", "ratio"), [((0.5,), (0.75, 1.33)), ((0.0, 1.0), (0.75, 1.33)), ((0.5, 1.0), (2, 1))])
def test_train_transform_names_a_bad_crop_range(scale, ratio):
    # kornia's own error spoke of tensors ("scale should be a torch.Tensor with length 2 ...")
    from vitkit.data.segmentation import SegTrainTransform

    with pytest.raises(ValueError, match=r"(scale|ratio) must be a \(low, high\) pair with 0 < low <= high"):
        SegTrainTransform((16, 16), (0.5,) * 3, (0.25,) * 3, scale=scale, ratio=ratio)
