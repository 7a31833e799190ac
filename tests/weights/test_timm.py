"""timm-layout state dicts: architecture inferred from shapes, checked against transformers' outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from tests.weights.conftest import hf_file_state, hf_to_timm_reference, image_batch
from vitkit.layers import resample_pos_embed
from vitkit.weights import read_state_dict

pytest.importorskip("transformers")
TOL = 1e-5  # fp32, max abs difference of logits


def save_state(state: dict, path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def nano_state(hf_nano):
    """timm-layout weights of the vit_nano_patch4_32-shaped transformers model."""
    return hf_to_timm_reference(hf_file_state(hf_nano[0]))


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_file_formats_match_transformers_with_model_name(hf_nano, nano_state, tmp_path, astronaut, lines, suffix):
    _, hf = hf_nano
    path = tmp_path / f"vit{suffix}"
    save_state(nano_state, path)
    model = vitkit.load_model(path, model_name="vit_nano_patch4_32", log=lines)
    assert model.cfg.num_heads == 4 and model.model_name == "vit_nano_patch4_32"
    assert "num_heads=4 from model 'vit_nano_patch4_32'" in lines.text()
    assert "assuming ImageNet mean/std" in lines.text()
    x = image_batch(astronaut, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    assert (logits(model, x) - ref).abs().max().item() <= TOL


def test_head_count_guess_is_logged_and_used(hf_head64, tmp_path, astronaut, lines):
    directory, hf = hf_head64
    save_state(hf_to_timm_reference(hf_file_state(directory)), tmp_path / "vit.pth")
    model = vitkit.load_model(tmp_path / "vit.pth", log=lines)
    assert model.cfg.num_heads == 2
    assert "num_heads=2: guessed as embed_dim 128 // 64" in lines.text()
    x = image_batch(astronaut, 32)
    with torch.no_grad():
        assert (logits(model, x) - hf(pixel_values=x).logits).abs().max().item() <= TOL


def test_wrong_guess_without_model_name_changes_the_output(hf_nano, nano_state, tmp_path, astronaut, lines):
    """The guess (128 // 64 = 2 heads) is wrong for a 4-head model: the log says so, and model_name fixes it."""
    save_state(nano_state, tmp_path / "vit.pth")
    guessed = vitkit.load_model(tmp_path / "vit.pth", log=lines)
    assert guessed.cfg.num_heads == 2 and "pass model_name=" in lines.text()
    x = image_batch(astronaut, 32)
    with torch.no_grad():
        assert (logits(guessed, x) - hf_nano[1](pixel_values=x).logits).abs().max().item() > 1e-3


def test_inferred_architecture(nano_state, tmp_path):
    save_state(nano_state, tmp_path / "vit.pth")
    cfg = vitkit.load_model(tmp_path / "vit.pth", model_name="vit_nano_patch4_32").cfg
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.in_chans, cfg.mlp_ratio) == (128, 6, 4, 3, 4.0)
    assert (cfg.num_classes, cfg.img_size, cfg.pool, cfg.class_token, cfg.qkv_bias) == (
        5,
        (32, 32),
        "token",
        True,
        True,
    )


def test_optional_parts_from_key_presence(tmp_path, lines):
    """Registers, distillation token, qk-norm, layer scale and fc_norm are recognised from the keys they add."""
    src = vitkit.VisionTransformer(
        vitkit.ViTConfig(img_size=16, patch_size=8, embed_dim=64, depth=1, num_heads=1, num_classes=3,
                         distilled=True, reg_tokens=2, qk_norm=True, init_values=0.1, fc_norm=True)
    )  # fmt: skip
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    model = vitkit.load_model(tmp_path / "vit.pth", log=lines)
    cfg = model.cfg
    assert (cfg.distilled, cfg.reg_tokens, cfg.qk_norm, cfg.fc_norm, cfg.pool) == (True, 2, True, True, "token")
    assert cfg.init_values is not None
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(logits(model, x), logits(src, x))


def test_containers_and_prefixes_are_unwrapped_and_reported(nano_state, tmp_path, lines):
    ema = {k: v + 1 for k, v in nano_state.items()}
    torch.save({"model": nano_state, "model_ema": ema, "optimizer": {"lr": 0.1}, "epoch": 3}, tmp_path / "a.pth")
    state = read_state_dict(tmp_path / "a.pth", log=lines)
    assert torch.equal(state["norm.weight"], nano_state["norm.weight"])
    assert "using the weights under 'model'" in lines.text() and "EMA weights under 'model_ema'" in lines.text()
    state = read_state_dict(tmp_path / "a.pth", prefer_ema=True)
    assert torch.equal(state["norm.weight"], ema["norm.weight"])

    torch.save({"state_dict": {f"module.{k}": v for k, v in nano_state.items()}}, tmp_path / "b.pth")
    lines.clear()
    model = vitkit.load_model(tmp_path / "b.pth", model_name="vit_nano_patch4_32", log=lines)
    assert torch.equal(model.norm.weight, nano_state["norm.weight"])
    assert "'state_dict'" in lines.text() and "stripped the 'module.' prefix" in lines.text()


def test_extra_and_missing_keys_are_listed(nano_state, tmp_path):
    state = dict(nano_state, **{"extra_thing.weight": torch.zeros(3)})
    del state["blocks.1.mlp.fc2.bias"]
    save_state(state, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="missing keys") as e:
        vitkit.load_model(tmp_path / "vit.pth", model_name="vit_nano_patch4_32")
    assert "blocks.1.mlp.fc2.bias" in str(e.value)
    assert "unexpected keys" in str(e.value) and "extra_thing.weight" in str(e.value)


def test_model_name_must_agree_with_the_shapes(nano_state, tmp_path):
    save_state(nano_state, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="embed_dim 128 \\(checkpoint\\) vs 192"):
        vitkit.load_model(tmp_path / "vit.pth", model_name="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown model"):
        vitkit.load_model(tmp_path / "vit.pth", model_name="vit_nope")


def test_positions_without_class_token_row_get_a_zero_row(tmp_path, lines):
    """timm's no_embed_class layout (DINOv2, *_reg* models): pos_embed covers the patch grid only.

    The class token then gets a zero position, which computes exactly the same function."""
    x = torch.randn(2, 3, 32, 32)
    # By name (4 heads, from the registry), and by size alone (heads guessed as width // 64 = 2, so the source
    # has 2 heads there).
    for heads, kwargs in ((4, {"model_name": "vit_nano_patch4_32"}), (2, {"img_size": 32})):
        src = vitkit.create_model("vit_nano_patch4_32", num_classes=10, num_heads=heads).eval()
        with torch.no_grad():
            src.pos_embed[:, :1] = 0  # what "no position for the class token" means in vitkit's layout
        state = dict(src.state_dict(), pos_embed=src.pos_embed.detach()[:, 1:].clone())  # 64 rows: patches only
        save_state(state, tmp_path / "vit.pth")
        with pytest.raises(ValueError, match="pass img_size="):  # 64 rows: 8x8 without a class row, or not square
            vitkit.load_model(tmp_path / "vit.pth")
        lines.clear()
        model = vitkit.load_model(tmp_path / "vit.pth", log=lines, **kwargs).eval()
        assert "no_embed_class" in lines.text()
        assert torch.equal(model(x), src(x))


def test_non_square_grid_needs_img_size(tmp_path):
    src = vitkit.VisionTransformer(vitkit.ViTConfig(img_size=(16, 32), patch_size=8, embed_dim=64, depth=1,
                                                    num_heads=1, num_classes=2))  # fmt: skip
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="not a square grid.*pass img_size="):
        vitkit.load_model(tmp_path / "vit.pth")
    model = vitkit.load_model(tmp_path / "vit.pth", img_size=(16, 32))
    x = torch.randn(1, 3, 16, 32)
    assert torch.equal(logits(model, x), logits(src, x))


def test_img_size_resamples_positions(nano_state, tmp_path, astronaut, lines):
    save_state(nano_state, tmp_path / "vit.pth")
    model = vitkit.load_model(tmp_path / "vit.pth", model_name="vit_nano_patch4_32", img_size=48, log=lines)
    expected = resample_pos_embed(nano_state["pos_embed"], (12, 12), (8, 8), num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 1 + 144, 128)
    assert torch.equal(model.pos_embed.data, expected)
    assert model.cfg.img_size == (48, 48) and model.preprocess.input_size == (48, 48)
    assert "resampled pos_embed from a 8x8 to a 12x12 grid" in lines.text()
    out = logits(model, image_batch(astronaut, 48))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_num_classes_resets_the_head(nano_state, tmp_path, lines):
    save_state(nano_state, tmp_path / "vit.pth")
    model = vitkit.load_model(tmp_path / "vit.pth", model_name="vit_nano_patch4_32", num_classes=3, log=lines)
    assert model.head.out_features == 3 and model.num_classes == 3
    assert torch.equal(model.blocks[0].attn.qkv.weight.data, nano_state["blocks.0.attn.qkv.weight"])
    assert "replaced the 5-class head with a new, randomly initialised 3-class head" in lines.text()
    features = vitkit.load_model(tmp_path / "vit.pth", model_name="vit_nano_patch4_32", num_classes=0)
    assert logits(features, torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_missing_pos_embed_needs_a_name(tmp_path):
    src = vitkit.create_model("vit_small_patch16_224_gap", embed_dim=64, depth=1, num_heads=2, num_classes=2)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="no pos_embed.*model_name="):
        vitkit.load_model(tmp_path / "vit.pth")
