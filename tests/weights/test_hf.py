"""Hugging Face transformers ViT directories: numerical parity with transformers itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vitkit
from tests.weights.conftest import LABELS, MEAN, STD, image_batch

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32, max abs difference of logits / tokens


def test_classifier_matches_transformers(hf_cls, astronaut, lines):
    directory, hf = hf_cls
    model = vitkit.load_model(directory, log=lines).eval()
    x = image_batch(astronaut, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = model(x)
    assert out.shape == (1, 5)
    assert ref.abs().max() > 0.1  # the random weights give logits that differ per class
    assert (out - ref).abs().max().item() <= TOL
    assert model.preprocess.class_names == LABELS
    assert model.preprocess.mean == pytest.approx(MEAN) and model.preprocess.std == pytest.approx(STD)
    assert model.preprocess.input_size == (32, 32)
    assert model.cfg.norm_eps == 1e-12 and model.cfg.num_heads == 4 and model.cfg.mlp_ratio == 2.0


def test_bare_vitmodel_drops_pooler_with_a_warning(hf_bare, astronaut, lines):
    directory, hf = hf_bare
    model = vitkit.load_model(directory, log=lines).eval()
    assert model.num_classes == 0
    assert "dropped the ViTModel pooler" in lines.text() and "pooler.dense.weight" in lines.text()
    assert "no preprocessor_config.json" in lines.text()
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.class_names is None
    x = image_batch(astronaut, 32, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        tokens = model.forward_features(x)
        pooled = model(x)
    assert (tokens - ref).abs().max().item() <= TOL
    assert (pooled - ref[:, 0]).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["saved", "modules"])
def test_pytorch_model_bin_in_both_key_layouts(hf_cls, tmp_path, astronaut, layout):
    """`pytorch_model.bin` with the saved layout (encoder.layer.N.attention.attention.query) or the module layout
    of transformers 5 (layers.N.attention.q_proj)."""
    src, hf = hf_cls
    shutil.copy(src / "config.json", tmp_path / "config.json")
    if layout == "saved":
        from safetensors.torch import load_file

        state = load_file(str(src / "model.safetensors"))
    else:
        state = hf.state_dict()
        assert any(".q_proj." in k for k in state)  # the module layout this test is about
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = vitkit.load_model(tmp_path).eval()
    x = image_batch(astronaut, 32)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max().item() <= TOL


def test_weights_file_inside_hf_dir_loads_the_dir(hf_cls, lines):
    directory, _ = hf_cls
    model = vitkit.load_model(directory / "model.safetensors", log=lines)
    assert model.preprocess.class_names == LABELS
    assert "belongs to the model directory" in lines.text()


def test_hf_state_dict_without_config_is_refused(hf_cls, tmp_path):
    directory, hf = hf_cls
    torch.save(hf.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="Hugging Face transformers state dict.*config.json"):
        vitkit.load_model(tmp_path / "vit.pth")


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))


def test_unsupported_activation_is_refused(hf_cls, tmp_path):
    _edit_config(hf_cls[0], tmp_path / "m", hidden_act="gelu_new")
    with pytest.raises(ValueError, match="hidden_act='gelu_new' is not supported"):
        vitkit.load_model(tmp_path / "m")


def test_unsupported_model_type_is_refused(hf_cls, tmp_path):
    _edit_config(hf_cls[0], tmp_path / "m", model_type="beit")  # 'deit' is read since the DeiT family
    with pytest.raises(ValueError, match="model_type='beit' is not supported"):
        vitkit.load_model(tmp_path / "m")


def test_masked_image_modeling_is_refused(tmp_path):
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    transformers.ViTForMaskedImageModeling(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ViTForMaskedImageModeling"):
        vitkit.load_model(tmp_path)


def test_img_size_resamples_hf_positions(hf_cls, astronaut, lines):
    model = vitkit.load_model(hf_cls[0], img_size=48, log=lines).eval()
    assert model.pos_embed.shape == (1, 1 + 36, 64) and model.preprocess.input_size == (48, 48)
    assert "resampled pos_embed from a 4x4 to a 6x6 grid" in lines.text()
    with torch.no_grad():
        assert torch.isfinite(model(image_batch(astronaut, 48))).all()
