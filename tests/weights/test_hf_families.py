"""transformers directories of the non-ViT families load through `vitkit.load_model` (dispatch on model_type)."""

import json

import pytest
import torch

import vitkit
from tests.models.test_convnext import _hf_model as convnext_hf_model
from tests.models.test_resnet import _random_hf as resnet_random_hf
from tests.models.test_swin import _hf_model as swin_hf_model


def test_swin_directory_loads_through_load_model_with_the_same_logits(tmp_path):
    hf = swin_hf_model(tmp_path, "hf_swin")
    lines = []
    model = vitkit.load_model(tmp_path / "hf_swin", log=lines.append).eval()
    assert model.family == "swin" and model.num_classes == 7 and model.preprocess.input_size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5
    # A native copy round-trips bit-exactly.
    vitkit.weights.convert_checkpoint(tmp_path / "hf_swin", tmp_path / "native", log=None)
    with torch.no_grad():
        assert torch.equal(vitkit.load_model(tmp_path / "native").eval()(x), model(x))


def test_resnet_directory_loads_through_load_model_with_the_same_logits(tmp_path):
    hf = resnet_random_hf("bottleneck", [16, 32, 48, 64], 8)
    hf.save_pretrained(tmp_path / "hf_resnet")
    model = vitkit.load_model(tmp_path / "hf_resnet").eval()
    assert model.family == "resnet" and model.num_classes == 6
    x = torch.randn(2, 3, 97, 130)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5


def test_convnext_directory_loads_through_load_model_with_the_same_logits(tmp_path):
    hf, _, _ = convnext_hf_model(tmp_path)
    model = vitkit.load_model(tmp_path / "hf").eval()
    assert model.family == "convnext" and model.num_classes == 5
    x = torch.randn(2, 3, 100, 150)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5


def test_unsupported_model_types_list_the_supported_ones(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        ValueError, match=r"model_type='bert' is not supported; .*'vit', 'convnext', 'deit', 'resnet', 'swin'"
    ):
        vitkit.load_model(d)


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "swin_tiny_patch4_window7_224"])
def test_timm_state_dicts_of_every_family_load_by_name(tmp_path, name):
    # A model of the registered architecture with a 7-class head, saved as a plain timm-layout state dict.
    src = vitkit.create_model(name, num_classes=7).eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = vitkit.load_model(tmp_path / "w.pth", model_name=name).eval()
    assert model.num_classes == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    fc = next(n for n, p in src.named_parameters() if src.is_classifier(n) and p.ndim == 2).rsplit(".", 1)[0]
    headless = {k: v for k, v in src.state_dict().items() if not k.startswith(fc + ".")}  # e.g. keeps head.norm
    torch.save(headless, tmp_path / "features.pth")
    assert vitkit.load_model(tmp_path / "features.pth", model_name=name).num_classes == 0
