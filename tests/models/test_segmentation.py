"""Segmentation heads on every family: (B, K, H, W) logits at the input size (non-square too), gradients that reach
the backbone's first layer, the save/load round trip, UNETR's skip choice and errors that name the bad value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitkit
from vitkit.models.segmentation import (
    SegmentationConfig,
    ViTSegmentation,
    ViTUNet,
    ViTUNetConfig,
    default_skips,
    segmentation_model,
)
from vitkit.weights import load_model

# Tiny members of every family; each accepts 32x48 inputs (multiples of every stride involved).
BACKBONES = {
    "vit": ("vit_nano_patch4_32", {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}),
    "deit": ("deit_tiny_patch16_224", {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"depths": (1, 1), "embed_dim": 16, "num_heads": (1, 2), "window_size": 4, "img_size": 32},
    ),
    "convnext": ("convnext_tiny", {"depths": (1, 1), "dims": (8, 16)}),
    "resnet": ("resnet18", {"depths": (1, 1), "widths": (8, 16), "stem_width": 8}),
    "hybrid": ("vit_hybrid_cnn_tiny_s4_32", {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}),
}
HEADS = ("linear", "segmenter", "unetr")
FIRST_LAYER = ("patch_embed", "stem", "conv1", "features.0", "embed")


def _backbone(family: str) -> nn.Module:
    name, args = BACKBONES[family]
    torch.manual_seed(0)
    return vitkit.create_model(name, num_classes=0, **args)


def _first_param(model: nn.Module) -> tuple[str, torch.Tensor]:
    """The backbone's first parameter in registration order (its patch embedding or stem)."""
    return next((n, p) for n, p in model.named_parameters() if n.startswith("backbone."))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", list(BACKBONES))
def test_every_family_and_head_gives_input_size_logits_and_trains_the_backbone(family, head):
    model = segmentation_model(_backbone(family), 3, head, **({"decoder_channels": 4} if head == "unetr" else {}))
    x = torch.randn(2, 3, 32, 48)  # non-square
    out = model(x)
    assert out.shape == (2, 3, 32, 48)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    name, first = _first_param(model)
    assert first.grad is not None and first.grad.abs().sum() > 0, f"no gradient reaches {name}"
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert head_params and all(p.grad is not None for p in head_params)


@pytest.mark.parametrize("head", HEADS)
def test_save_load_round_trip_rebuilds_backbone_and_head(tmp_path, head):
    backbone = _backbone("vit")
    model = segmentation_model(backbone, 4, head).eval()
    model.preprocess.class_names = ["bg", "a", "b", "c"]
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert type(loaded) is type(model) and loaded.num_classes == 4
    assert loaded.cfg == model.cfg and loaded.cfg.backbone == "vit_nano_patch4_32"
    assert loaded.preprocess.class_names == ["bg", "a", "b", "c"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_pretrained_classifier_backbone_keeps_its_weights_and_loses_its_head():
    torch.manual_seed(0)
    classifier = vitkit.create_model("vit_nano_patch4_32", num_classes=7, depth=1, embed_dim=32, num_heads=2)
    before = {k: v.clone() for k, v in classifier.state_dict().items() if not k.startswith("head")}
    model = ViTSegmentation(classifier, 5)  # the documents' form: ViTSegmentation(vit_model, num_classes)
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.backbone.num_classes == 0
    assert model.cfg.backbone_args["depth"] == 1 and model.cfg.backbone_args["num_classes"] == 0


def test_unetr_skips_follow_the_paper_and_hierarchical_stages():
    vit_b = [{"num_chs": 768, "reduction": 16, "module": f"blocks.{i}"} for i in range(12)]
    assert default_skips(vit_b) == [2, 5, 8, 11]  # UNETR's z3, z6, z9, z12
    vit_p4 = [{"num_chs": 128, "reduction": 4, "module": f"blocks.{i}"} for i in range(6)]
    assert default_skips(vit_p4) == [2, 5]  # log2(4) = 2 skips: strides 4 and 2, then the image at 1
    swin = [{"num_chs": 96 * 2**i, "reduction": 4 * 2**i, "module": f"layers.{i}"} for i in range(4)]
    assert default_skips(swin) == [0, 1, 2, 3]
    model = ViTUNet(_backbone("vit"), 2, skip_indices=[0, -1])
    assert model.indices == [1, 0] and model.decoder.strides == [4, 2]


def test_segmenter_masks_are_cosine_products_normalised_over_classes():
    model = ViTSegmentation(_backbone("vit"), 4, head="segmenter").eval()
    f = torch.randn(2, 32, 8, 8)
    masks = model.head(f)
    assert masks.shape == (2, 4, 8, 8)
    # mask_norm is a LayerNorm over the K classes (unit gain, zero bias at init): zero mean across classes.
    assert torch.allclose(masks.mean(dim=1), torch.zeros(2, 8, 8), atol=1e-5)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"head='mask' is not allowed; choose one of 'linear', 'segmenter'"):
        ViTSegmentation("vit_nano_patch4_32", 3, head="mask")
    with pytest.raises(ValueError, match=r"backbone='vit_nanno_patch4_32' is not a registered model; closest"):
        ViTSegmentation("vit_nanno_patch4_32", 3)
    with pytest.raises(TypeError, match=r"backbone Linear has no forward_intermediates/feature_info"):
        ViTUNet(nn.Linear(3, 3), 3)
    with pytest.raises(ValueError, match=r"feature_index 5 is out of range for a backbone with 2 .* \(use -2..1\)"):
        ViTSegmentation(_backbone("vit"), 3, feature_index=5)
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer, got 0"):
        SegmentationConfig(num_classes=0)
    with pytest.raises(ValueError, match=r"skip_indices must be a non-empty list"):
        ViTUNetConfig(skip_indices=[])
    with pytest.raises(ValueError, match=r"head='fcn' is not allowed; choose one of 'linear', 'segmenter', 'unetr'"):
        segmentation_model("vit_nano_patch4_32", 3, "fcn")
