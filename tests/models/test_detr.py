"""ViTDETR: output shapes on a ViT and a CNN backbone (square and not), gradients, the save/load round trip, the
backbone given as a module or a name, and config errors."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.layers.pos_embed import sincos_2d
from vitkit.models.detr import DETRConfig, ViTDETR, sincos_at

HEAD = dict(num_queries=5, hidden_dim=16, dec_layers=2, dec_heads=2, dec_ffn_dim=32)


def _vit(size=(32, 48)):
    return vitkit.create_model("vit_nano_patch4_32", num_classes=3, img_size=size, patch_size=8, depth=2,
                               embed_dim=16, num_heads=2)  # fmt: skip


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_output_shapes_every_layer_and_gradients(kind, size):
    torch.manual_seed(0)
    backbone = _vit(size) if kind == "vit" else vitkit.create_model("resnet18", num_classes=0)
    model = ViTDETR(backbone, num_classes=3, **HEAD)
    out = model(torch.randn(2, 3, *size))
    assert out["pred_logits"].shape == (2, 5, 4)  # K + 1 = 4 ("no object" last)
    assert out["pred_boxes"].shape == (2, 5, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()  # sigmoid cx, cy, w, h
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 5, 4)
    loss = out["pred_logits"].square().mean() + out["pred_boxes"].mean()
    loss = loss + sum(a["pred_logits"].square().mean() + a["pred_boxes"].mean() for a in out["aux_outputs"])
    loss.backward()
    used = [n for n, p in model.named_parameters() if not n.startswith("backbone.")]
    missing = [n for n in used if model.get_parameter(n).grad is None]
    assert not missing, missing
    if kind == "vit":  # every backbone parameter up to the chosen block learns
        assert all(p.grad is not None for n, p in model.backbone.named_parameters() if not n.startswith("head"))


def test_backbone_module_loses_its_classifier_and_images_change_outputs():
    backbone = _vit()
    assert backbone.num_classes == 3
    model = ViTDETR(backbone, 2, **HEAD).eval()
    assert model.backbone.num_classes == 0 and model.num_classes == 2
    a, b = torch.zeros(1, 3, 32, 48), torch.ones(1, 3, 32, 48)
    assert not torch.allclose(model(a)["pred_logits"], model(b)["pred_logits"])  # the image reaches the decoder


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ViTDETR(_vit(), num_classes=2, category_ids=[3, 7], **HEAD).eval()
    with torch.no_grad():  # the zero-initialised box layer would hide a box head that failed to load
        model.bbox_embed.layers[-1].weight.normal_()
    model.preprocess.class_names = ["cat", "dog"]
    model.save_pretrained(tmp_path / "m")
    loaded = vitkit.load_model(str(tmp_path / "m")).eval()
    assert isinstance(loaded, ViTDETR) and loaded.cfg.category_ids == [3, 7]
    assert loaded.preprocess.class_names == ["cat", "dog"] and loaded.cfg.backbone == "vit_nano_patch4_32"
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_backbone_by_name_and_config_object():
    model = ViTDETR("resnet18", num_classes=4, num_queries=3, hidden_dim=32, dec_heads=2, dec_layers=1)
    assert model.cfg.backbone == "resnet18" and model.backbone.num_classes == 0
    again = ViTDETR(model.describe())
    assert again.cfg == model.describe()
    assert model.is_classifier("decoder.layers.0.mlp.0.weight") and not model.is_classifier("backbone.fc.weight")


def test_reference_points_encode_like_the_memory():
    # A query at the centre of cell (i, j) carries exactly the memory's position encoding of that cell.
    grid = sincos_2d((3, 4), 16)  # (12, 16), rows in (row, column) order
    cells = torch.tensor([[2.0, 1.0]])  # x = column 2, y = row 1
    torch.testing.assert_close(sincos_at(cells, 16), grid[1 * 4 + 2][None])


def test_config_errors():
    with pytest.raises(ValueError, match="not a registered model"):
        DETRConfig(backbone="vit_nope")
    with pytest.raises(ValueError, match="num_queries must be a positive integer"):
        DETRConfig(num_queries=0)
    with pytest.raises(ValueError, match="divisible by dec_heads"):
        DETRConfig(hidden_dim=30, dec_heads=4)
    with pytest.raises(ValueError, match="category_ids must give 4 distinct ids"):
        DETRConfig(category_ids=[1, 1, 2, 3])
    with pytest.raises(ValueError, match="feature_index=5 is out of range"):
        ViTDETR(_vit(), 2, feature_index=5, **HEAD)
    with pytest.raises(TypeError, match="registered model name or an nn.Module"):
        ViTDETR(3.5, 2)
    with pytest.raises(TypeError, match="lacks forward_intermediates"):
        ViTDETR(torch.nn.Linear(2, 2), 2)
