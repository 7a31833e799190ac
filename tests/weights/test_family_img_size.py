"""`load_model(state_dict_file, model_name=..., img_size=...)` for the families beyond ViT keeps the asked size
(fine-tuning a timm ResNet at 32 px used to train at the registered 224 px)."""

import pytest
import torch

import vitkit


@pytest.mark.parametrize(
    "name, img_size, expect",
    [("resnet18", 32, (32, 32)), ("convnext_tiny", (48, 64), (48, 64)), ("swin_tiny_patch4_window7_224", 64, (64, 64))],
)
def test_state_dict_loads_at_the_asked_size(tmp_path, name, img_size, expect):
    torch.manual_seed(0)
    src = vitkit.create_model(name).eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = vitkit.load_model(tmp_path / "w.pth", model_name=name, img_size=img_size).eval()
    assert tuple(model.preprocess.input_size) == expect
    if hasattr(model.cfg, "img_size"):
        assert tuple(model.cfg.img_size) == expect
    x = torch.randn(1, 3, *expect)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=1e-5)


def test_without_img_size_the_registered_size_stays(tmp_path):
    torch.save(vitkit.create_model("resnet18").state_dict(), tmp_path / "w.pth")
    assert tuple(vitkit.load_model(tmp_path / "w.pth", model_name="resnet18").preprocess.input_size) == (224, 224)


def test_timm_hybrid_state_dict_loads_at_another_size(tmp_path):
    """An R50+ViT-style hybrid state dict (timm keys: patch_embed.backbone.*, patch_embed.proj.*) loads by name; at
    another input size its position table is resampled from the registered 7x7 grid."""
    torch.manual_seed(0)
    src = vitkit.create_model("vit_small_r26_s32_224").eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    same = vitkit.load_model(tmp_path / "w.pth", model_name="vit_small_r26_s32_224").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(same(x), src(x), rtol=0, atol=0)
    lines = []
    bigger = vitkit.load_model(tmp_path / "w.pth", model_name="vit_small_r26_s32_224", img_size=256, log=lines.append)
    assert bigger.pos_embed.shape[1] == 1 + 8 * 8 and tuple(bigger.preprocess.input_size) == (256, 256)
    assert any("resampled pos_embed from a 7x7 to a 8x8 grid" in line for line in lines), lines


def test_native_swin_directory_loads_at_another_size(tmp_path):
    """load_model(vitkit_dir, img_size=...) built the model on the meta device, and Swin's non-persistent
    relative_position_index (computed in __init__, in no state dict) stopped it with an AssertionError."""
    torch.manual_seed(0)
    src = vitkit.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4
    ).eval()
    src.save_pretrained(tmp_path / "swin")
    model = vitkit.load_model(tmp_path / "swin", img_size=(32, 48)).eval()
    assert tuple(model.cfg.img_size) == tuple(model.preprocess.input_size) == (32, 48)
    index = model.layers[0].blocks[0].attn.relative_position_index
    assert torch.equal(index, src.layers[0].blocks[0].attn.relative_position_index)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, args",
    [
        ("resnet18", dict(widths=(8, 8, 8, 8), stem_width=8)),
        ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))),
    ],
)
def test_native_cnn_directory_loads_at_another_size(tmp_path, name, args):
    """A vitkit directory of a CNN family (weights independent of the input size) loads with img_size= as a timm
    file of it does; it was refused ("cannot adapt its weights"), which also stopped `vitkit train --pretrained
    RESNET_RUN --img-size 48`."""
    torch.manual_seed(0)
    src = vitkit.create_model(name, num_classes=3, **args).eval()
    src.save_pretrained(tmp_path / "m")
    model = vitkit.load_model(tmp_path / "m", img_size=48).eval()
    assert tuple(model.preprocess.input_size) == (48, 48)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
