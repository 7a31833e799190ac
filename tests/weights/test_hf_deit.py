"""transformers DeiT directories load through `vitkit.load_model` with transformers' logits.

Parity: random tiny transformers models (hidden 32, 2 layers, 2 heads, patch 8, image_size 32, 5 labels) of
`DeiTForImageClassificationWithTeacher` and `DeiTForImageClassification`, saved with `save_pretrained` and read
back from disk. Eval logits agree to max |delta| <= 1e-5 (fp32) at the native 32x32 and at 48x40 (a 6x5 patch
grid; transformers with `interpolate_pos_encoding=True`, vitkit resampling its position table bicubically).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.models import DeiT, DeiTConfig
from vitkit.weights.hf_deit import hf_deit_to_timm

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SIZES = [(32, 32), (48, 40)]


def _hf(tmp_path, cls_name: str, num_labels: int = 5):
    cls = getattr(transformers, cls_name)
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8, num_labels=num_labels)  # fmt: skip
    torch.manual_seed(0)
    hf = cls(config).eval()
    with torch.no_grad():  # transformers inits the tokens and positions to small values: make them matter
        for name in ("cls_token", "distillation_token", "position_embeddings"):
            getattr(hf.base_model.embeddings, name).normal_(0, 0.5)
    hf.save_pretrained(tmp_path / cls_name)
    return hf


@pytest.mark.parametrize("cls_name", ["DeiTForImageClassificationWithTeacher", "DeiTForImageClassification"])
def test_parity_with_transformers(tmp_path, cls_name):
    hf = _hf(tmp_path, cls_name)
    model = vitkit.load_model(tmp_path / cls_name).eval()
    assert type(model) is DeiT and model.family == "deit" and model.num_classes == 5 and model.cfg.distilled
    assert (model.head_dist is not None) == (cls_name == "DeiTForImageClassificationWithTeacher")
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = hf(pixel_values=x, interpolate_pos_encoding=True).logits
            delta = (model(x) - ref).abs().max().item()
        assert delta <= TOL, (size, delta)
        assert ref.abs().max().item() > 10 * TOL  # the logits are not all near zero
    # A native copy round-trips bit-exactly, keeping the head layout.
    vitkit.weights.convert_checkpoint(tmp_path / cls_name, tmp_path / "native", log=None)
    back = vitkit.load_model(tmp_path / "native").eval()
    assert back.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_deit_model_features_are_the_class_token(tmp_path, caplog):
    """A DeiTModel (no head): features = the class token's final state; the pooler is dropped with a warning."""
    hf = _hf(tmp_path, "DeiTModel")
    with caplog.at_level("WARNING", logger="vitkit.weights"):
        model = vitkit.load_model(tmp_path / "DeiTModel").eval()
    assert "dropped the DeiTModel pooler (pooler.dense.bias, pooler.dense.weight)" in caplog.text
    assert model.num_classes == 0 and model.cfg.dist_head is False
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        assert (model(x) - ref).abs().max().item() <= TOL


def test_converter_output_builds_the_model_strictly(tmp_path):
    _hf(tmp_path, "DeiTForImageClassificationWithTeacher")
    d = tmp_path / "DeiTForImageClassificationWithTeacher"
    state = load_file(d / "model.safetensors")
    arch, timm_state = hf_deit_to_timm(state, json.loads((d / "config.json").read_text()))
    assert arch["img_size"] == (32, 32) and arch["distilled"] and arch["dist_head"] and arch["norm_eps"] == 1e-12
    assert {"dist_token", "head.weight", "head_dist.weight", "blocks.1.attn.qkv.weight"} <= set(timm_state)
    DeiT(DeiTConfig(**arch)).load_state_dict(timm_state, strict=True)
    # A transformers config object works as well as config.json.
    assert hf_deit_to_timm(state, transformers.AutoConfig.from_pretrained(d))[0] == arch


def test_converter_refuses_what_it_cannot_read(tmp_path):
    _hf(tmp_path, "DeiTForImageClassification")
    d = tmp_path / "DeiTForImageClassification"
    state = load_file(d / "model.safetensors")
    config = json.loads((d / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type='vit' is not a transformers DeiT"):
        hf_deit_to_timm(state, {**config, "model_type": "vit"})
    with pytest.raises(ValueError, match=r"architecture \['DeiTForMaskedImageModeling'\] is not supported"):
        hf_deit_to_timm(state, {**config, "architectures": ["DeiTForMaskedImageModeling"]})
    with pytest.raises(ValueError, match="says DeiTForImageClassificationWithTeacher but the weights hold the heads"):
        hf_deit_to_timm(state, {**config, "architectures": ["DeiTForImageClassificationWithTeacher"]})
    with pytest.raises(ValueError, match=r"keys with no counterpart .*'encoder\.layer\.0\.extra'"):
        hf_deit_to_timm({**state, "deit.encoder.layer.0.extra": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="position_embeddings has 18 rows, but image_size \\[64, 64\\]"):
        hf_deit_to_timm(state, {**config, "image_size": 64})
    no_dist = {k: v for k, v in state.items() if "distillation_token" not in k}
    with pytest.raises(ValueError, match="has no embeddings.distillation_token"):
        hf_deit_to_timm(no_dist, config)
    # Without `architectures`, the class is read from the heads in the weights.
    arch, _ = hf_deit_to_timm(state, {k: v for k, v in config.items() if k != "architectures"})
    assert arch["dist_head"] is False
