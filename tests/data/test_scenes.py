"""make_scenes: several shapes per image with semantic masks, visible instance masks and boxes."""

import pytest
import torch

from vitkit.data.shapes import SCENE_CLASSES, SHAPE_CLASSES, make_scenes


def test_scenes_shapes_and_consistency():
    images, semantic, targets = make_scenes(40, 48, 64, seed=3)
    assert images.shape == (40, 3, 48, 64) and images.dtype == torch.uint8
    assert semantic.shape == (40, 48, 64) and semantic.dtype == torch.int64
    assert len(targets) == 40 and SCENE_CLASSES[0] == "background"
    counts = [len(t["labels"]) for t in targets]
    assert min(counts) >= 1 and max(counts) <= 5 and len(set(counts)) > 2
    for sem, t in zip(semantic, targets, strict=True):
        masks, labels, boxes = t["masks"], t["labels"], t["boxes"]
        assert masks.shape == (len(labels), 48, 64) and boxes.shape == (len(labels), 4)
        assert ((labels >= 0) & (labels < len(SHAPE_CLASSES))).all()
        if len(labels):
            # visible instance masks do not overlap, and each carries its class in the semantic mask
            assert masks.sum(0).max() <= 1
            for m, c, b in zip(masks, labels, boxes, strict=True):
                assert (sem[m] == c + 1).all()
                ys, xs = torch.nonzero(m, as_tuple=True)
                assert b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        # every foreground pixel of the semantic mask is a shape pixel; background is 0
        assert (sem >= 0).all() and (sem < len(SCENE_CLASSES)).all()


def test_scenes_are_fixed_by_the_seed_and_overlap_happens():
    a = make_scenes(30, 32, 32, seed=1)
    b = make_scenes(30, 32, 32, seed=1)
    c = make_scenes(30, 32, 32, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # instances left with fewer than 12 visible pixels after occlusion are dropped from the targets
    occluded = sum(int((t["masks"].sum((1, 2)) < 12).sum()) for t in a[2])
    assert occluded == 0


@pytest.mark.parametrize("kw", [{"count": 0}, {"height": 8}, {"min_shapes": 0}, {"min_shapes": 4, "max_shapes": 3}])
def test_scenes_bad_arguments_name_the_value(kw):
    args = {"count": 4, "height": 32, "width": 32, "seed": 0, **kw}
    with pytest.raises(ValueError, match=str(list(kw.values())[-1])):
        make_scenes(**args)


@pytest.mark.parametrize(
    "settings,side",
    [
        ({"img_size": 32}, 32),  # follows the training size: no 64 px scene resized to 32
        ({"img_size": 32, "shapes_size": 48}, 48),  # an explicit shapes_size wins
        ({}, 64),  # neither: 64, as before
        ({"img_size": 8}, 16),  # never below the smallest recognisable side
    ],
)
@pytest.mark.parametrize("task,data", [("segment", "scenes:10"), ("detect", "scenes:10"), ("classify", "shapes:8")])
def test_scenes_and_shapes_follow_img_size_unless_shapes_size_is_given(settings, side, task, data):
    from vitkit.data import load_data
    from vitkit.data.detection import load_detection_data
    from vitkit.data.segmentation import load_segmentation_data
    from vitkit.train.config import resolve_config

    cfg = resolve_config(None, {"task": task, "data": data, "model": "vit_nano_patch4_32", **settings})
    assert cfg.shapes_size == side
    assert resolve_config(cfg.to_dict()).shapes_size == side  # config.yaml records the size drawn (resume)
    loader = {"segment": load_segmentation_data, "detect": load_detection_data, "classify": load_data}[task]
    images = loader(data, shapes_size=cfg.shapes_size).train.images
    assert tuple(images.shape[-2:]) == (side, side)
