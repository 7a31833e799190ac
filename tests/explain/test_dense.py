"""Explaining dense models: Seg-Grad-CAM of a class region, the backbone's attention read from the patch queries, and
DETR's per-query cross-attention, on batches of non-square images (32 x 48 with 8 px patches: a 4 x 6 grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.explain.conftest import BACKBONE, detr_model, seg_model
from vitkit.explain import explain
from vitkit.explain.cross_attention import detr_cross_attention, query_detections
from vitkit.explain.dense import (
    _segmentation_targets,
    backbone_attention,
    check_dense_method,
    dense_kind,
    segmentation_cam,
)
from vitkit.explain.maps import rollout_from_attentions
from vitkit.layers import capture_attention
from vitkit.models.detr import ViTDETR
from vitkit.models.segmentation import ViTSegmentation, ViTUNet

H, W = 32, 48  # 4 x 6 patches of 8 px: rows and columns cannot be confused


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(3))


# --- segmentation: Seg-Grad-CAM ----------------------------------------------------------------------------------
def manual_seg_grad_cam(model: nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The definition written out: d(sum of logit k over the pixels predicted k)/d(last block output), per image."""
    out = {}
    hook = model.backbone.blocks[-1].register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
    logits = model(x)
    hook.remove()
    region = logits.argmax(1) == k[:, None, None]
    score = sum((logits[b, k[b]] * region[b]).sum() for b in range(len(x)))
    (g,) = torch.autograd.grad(score, out["a"])
    P = model.backbone.num_prefix_tokens
    a = out["a"][:, P:].detach().reshape(len(x), 4, 6, -1)  # (B, 4, 6, C): row-major patches
    g = g[:, P:].reshape(len(x), 4, 6, -1)
    return F.relu((g.mean(dim=(1, 2), keepdim=True) * a).sum(-1))  # (B, 4, 6)


@pytest.mark.parametrize("head", ["linear", "segmenter"])
def test_segmentation_cam_is_the_region_score_gradient_per_image(images, head):
    model = seg_model(head)
    cam = segmentation_cam(model, images)
    assert cam.maps.shape == (2, 4, 6) and cam.masks.shape == (2, H, W)
    assert torch.allclose(cam.maps, manual_seg_grad_cam(model, images, cam.targets), atol=1e-5)
    assert cam.maps.amax() > 0
    for b in range(2):  # a batch gives each image its own map and target
        alone = segmentation_cam(model, images[b : b + 1])
        assert torch.equal(alone.targets, cam.targets[b : b + 1])
        # rtol 1e-4: a batch of 1 and of 2 take different GEMM blockings (summation orders) on some CPUs; values
        # near 10 then differ by ~1e-4 (seen on an AVX2 EPYC), while another image's map would differ by O(1).
        torch.testing.assert_close(alone.maps[0], cam.maps[b], rtol=1e-4, atol=1e-5)
    share = (cam.masks == cam.targets[:, None, None]).flatten(1).float().mean(1)
    assert torch.allclose(cam.shares, share)


def test_segmentation_cam_of_a_chosen_class_and_of_an_absent_one(images):
    model = seg_model()
    with torch.no_grad():
        masks = model(images).argmax(1)
    present = [int(c) for c in masks.unique()]
    k = present[-1]
    cam = segmentation_cam(model, images, target=k)
    assert cam.targets.tolist() == [k, k]
    assert torch.allclose(cam.maps, manual_seg_grad_cam(model, images, torch.tensor([k, k])), atol=1e-5)
    absent = [c for c in range(3) if c not in present]
    if absent:  # a class predicted nowhere: empty region, zero map
        empty = segmentation_cam(model, images, target=absent[0])
        assert float(empty.maps.abs().sum()) == 0 and float(empty.shares.sum()) == 0
    with pytest.raises(ValueError, match=r"target class 3 is out of range for a model with 3 classes \(use 0..2\)"):
        segmentation_cam(model, images, target=3)


def test_default_target_is_the_most_frequent_object_class_else_background():
    masks = torch.tensor([[[0, 0, 0], [2, 1, 2]], [[0, 0, 0], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]]])
    assert _segmentation_targets(None, masks, 3).tolist() == [2, 0, 1]
    assert _segmentation_targets([1, 2, 0], masks, 3).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="got 2 targets for a batch of 3 images"):
        _segmentation_targets([1, 2], masks, 3)


def test_unet_grad_cam_reads_its_deepest_skip(images):
    torch.manual_seed(0)
    model = ViTUNet("vit_nano_patch4_32", 3, backbone_args=BACKBONE, decoder_channels=4).eval()
    cam = segmentation_cam(model, images)
    assert cam.maps.shape == (2, 4, 6)
    assert torch.allclose(cam.maps, manual_seg_grad_cam(model, images, cam.targets), atol=1e-5)


# --- the backbone's self-attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [seg_model, detr_model], ids=["segmentation", "detection"])
def test_backbone_rollout_is_that_of_the_attention_inside_the_dense_model(images, make):
    model = make()
    with torch.no_grad(), capture_attention(model.backbone) as rec:
        model(images)  # the whole dense model: the backbone's blocks see exactly what they see in predict
    P = model.backbone.num_prefix_tokens
    expected = rollout_from_attentions(rec.maps, (4, 6), P, has_class_token=False)
    got = backbone_attention(model, images, "rollout")
    assert got.shape == (2, 4, 6) and torch.allclose(got, expected, atol=1e-6)
    # Read from the mean patch query: the mean over the patch rows of the product, at the patch columns.
    A = [0.5 * a.mean(1) + 0.5 * torch.eye(a.shape[-1]) for a in rec.maps]
    A = [a / a.sum(-1, keepdim=True) for a in A]
    R = A[1] @ A[0]
    assert torch.allclose(got.flatten(1), R[:, P:, P:].mean(1), atol=1e-6)
    attn = backbone_attention(model, images, "attention", layer=0, head=1)
    assert torch.allclose(attn.flatten(1), rec.maps[0][:, 1, P:, P:].mean(1), atol=1e-6)
    assert explain(model, images, method="rollout").shape == (2, H, W)


def test_methods_that_do_not_apply_are_refused_by_name(images):
    seg, det = seg_model(), detr_model()
    assert (dense_kind(seg), dense_kind(det), dense_kind(seg.backbone)) == ("segmentation", "detection", None)
    with pytest.raises(ValueError, match="the segmentation methods are gradcam, attention, rollout, flow"):
        explain(seg, images, method="relevance")
    with pytest.raises(ValueError, match="a detector has no per-pixel logits.*cross-attention, attention, rollout"):
        check_dense_method(det, "gradcam")
    up = explain(seg, images, method="gradcam")
    assert up.shape == (2, H, W)
    assert torch.allclose(F.interpolate(segmentation_cam(seg, images).maps[:, None], (H, W), mode="bilinear")[:, 0], up)


# --- DETR: cross-attention of each query ------------------------------------------------------------------------
def test_cross_attention_is_what_the_decoder_computes(images):
    model = detr_model()
    seen = {}

    def keep_inputs(m, args, kwargs):
        seen["args"] = args

    layer = model.decoder.layers[-1].cross_attn
    hook = layer.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    with torch.no_grad():
        plain = model(images)
        hook.remove()
        _, expected = layer(*seen["args"], need_weights=True, average_attn_weights=False)  # (B, heads, Q, 24)
    out = detr_cross_attention(model, images)
    assert out.maps.shape == (2, 5, 4, 6) and out.layer == 1
    assert torch.allclose(out.maps.flatten(2), expected.mean(1), atol=1e-6)
    assert torch.allclose(out.maps.sum((-2, -1)), torch.ones(2, 5), atol=1e-5)  # a softmax over the grid
    assert torch.allclose(out.boxes, plain["pred_boxes"], atol=1e-5)  # the hooks do not change the outputs
    one = detr_cross_attention(model, images, head=0, upsample_to=(H, W))
    assert one.maps.shape == (2, 5, H, W)
    first = detr_cross_attention(model, images[1:], layer=0)
    assert first.layer == 0 and not torch.allclose(first.maps[0], out.maps[1])
    with pytest.raises(ValueError, match=r"layer 2 is out of range"):
        detr_cross_attention(model, images, layer=2)


def test_query_detections_threshold_order_and_pixels():
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 3.0, 0.0]]]).repeat(2, 1, 1)  # (2, 3, K + 1)
    logits[1] = torch.tensor([0.0, 0.0, 9.0])  # the second image: only "no object"
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0]]).repeat(2, 1, 1)
    from vitkit.explain.cross_attention import DETRCrossAttention

    result = DETRCrossAttention(torch.zeros(2, 3, 4, 6), logits, boxes, layer=0)
    shown = query_detections(result, [(32, 48), (32, 48)], threshold=0.5)
    assert [d["query"] for d in shown[0]] == [0, 2]  # by score; the "no object" query is not drawn
    assert shown[0][0]["box"] == [12.0, 8.0, 36.0, 24.0] and shown[0][1]["label"] == 1
    assert len(shown[1]) == 1 and shown[1][0]["below_threshold"]  # nothing above: the best query, marked
    assert len(query_detections(result, [(32, 48)] * 2, threshold=0.0, max_queries=1)[0]) == 1
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 2"):
        query_detections(result, [(32, 48)] * 2, threshold=2)


# --- vitkit explain on dense checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A segmentation and a detection model directory, and a 40 x 70 image file (stretched to 32 x 32 for them)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("dense")
    seg = seg_model()
    seg.preprocess.class_names = ["background", "disc", "bar"]
    seg.preprocess.crop_fraction = 1.0
    seg.save_pretrained(root / "seg")
    det = detr_model()
    det.preprocess.class_names = ["disc", "bar"]
    det.save_pretrained(root / "det")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(root / "wide.png")
    return root


def test_cli_explain_segmentation_and_detection(checkpoints, tmp_path, capsys):
    from vitkit.cli import main

    image = str(checkpoints / "wide.png")
    assert main(["explain", image, "--checkpoint", str(checkpoints / "seg"), "--target", "bar", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    assert "why the outlined pixels are bar" in capsys.readouterr().out
    assert (tmp_path / "wide_gradcam.png").stat().st_size > 5000
    assert main(["explain", image, image, "--checkpoint", str(checkpoints / "det"), "--threshold", "0", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "decoder layer 1 cross-attention; 5 detection(s) with score >= 0" in printed
    assert (tmp_path / "wide_cross-attention.png").is_file() and (tmp_path / "wide_2_cross-attention.png").is_file()
    assert main(["explain", image, "--checkpoint", str(checkpoints / "det"), "--method", "rollout", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    assert (tmp_path / "wide_rollout.png").is_file()


def test_explain_counts_the_region_share_at_the_files_size_as_predict_does(checkpoints, tmp_path):
    """The 40 x 70 file runs at 32 x 32: explain's "% of the image" is the share of the outlined pixels at the file's
    size, the number `vitkit predict` prints for that class."""
    import re

    from vitkit.models.serialization import load_native
    from vitkit.train.seg_run import predict_masks
    from vitkit.viz.segmentation import save_segmentation_explanations

    image = str(checkpoints / "wide.png")
    model = load_native(checkpoints / "seg")
    predicted = predict_masks(model, [image], device="cpu")[0]
    for target in range(3):
        ((_, line),) = save_segmentation_explanations(model, [image], tmp_path, target=target)
        share = predicted["shares"][predicted["class_names"][target]]
        if share == 0:
            continue
        found = re.search(r"\(([\d.]+)% of the image\)", line)
        assert found, line
        shown = float(found.group(1))
        assert shown == pytest.approx(100 * share, abs=0.051), (line, share)


@pytest.mark.parametrize(
    "which,argv,message",
    [
        ("seg", ["--method", "relevance"], "the segmentation methods are gradcam, attention, rollout, flow"),
        ("seg", ["--threshold", "0.3"], "--threshold applies to detectors"),
        ("seg", ["--method", "rollout", "--target", "1"], "the segmentation method that explains a chosen class"),
        ("det", ["--target", "1"], "--target applies to classifiers and segmentation models"),
        ("det", ["--tome", "2"], "--tome is for classifiers"),
    ],
)
def test_cli_explain_dense_refusals(checkpoints, tmp_path, capsys, which, argv, message):
    from vitkit.cli import main

    rc = main(["explain", str(checkpoints / "wide.png"), "--checkpoint", str(checkpoints / which), "--out",
               str(tmp_path), *argv])  # fmt: skip
    assert rc == 2 and message in capsys.readouterr().err


def test_dense_models_on_other_families():
    """A Swin backbone: Seg-Grad-CAM on its last stage, one block's window attention, rollout refused by name; a
    ResNet under DETR: cross-attention over its stride-32 map."""
    from vitkit.explain.maps import attention_map

    sw = dict(img_size=32, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4)
    model = ViTSegmentation("swin_tiny_patch4_window7_224", 3, backbone_args=sw).eval()
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    cam = segmentation_cam(model, x)
    assert cam.maps.shape == (2, 4, 6) and float(cam.maps.sum()) > 0  # the stride-8 stage of a 32 x 48 input
    attn = backbone_attention(model, x, "attention", layer=0)
    assert torch.allclose(attn, attention_map(model.backbone, x, layer=0))
    with pytest.raises(ValueError, match="rollout maps of a dense model's backbone need global self-attention"):
        backbone_attention(model, x, "rollout")
    torch.manual_seed(0)
    det = ViTDETR("resnet18", 2, hidden_dim=16, dec_layers=1, dec_heads=2, dec_ffn_dim=16, num_queries=3).eval()
    assert detr_cross_attention(det, torch.randn(1, 3, 64, 96)).maps.shape == (1, 3, 2, 3)


def test_inputs_are_those_of_predict(checkpoints):
    """The same input as `vitkit predict`: a detector takes the whole file even when its run recorded a decode size
    (its boxes are in the file's pixels), a segmentation model its run's decode-size step."""
    from vitkit.data.images import decode_image, resize_center_crop
    from vitkit.explain.dense import prepare_dense_images

    image = checkpoints / "wide.png"  # 40 x 70
    det, seg = detr_model(), seg_model()
    det.preprocess.load_size = seg.preprocess.load_size = 36
    (shown,), x = prepare_dense_images([image], det)
    assert shown.shape == (40, 70, 3) and x.shape == (1, 3, 32, 32)
    (shown,), _ = prepare_dense_images([image], seg)
    assert np.array_equal(shown, resize_center_crop(decode_image(image), 36))
