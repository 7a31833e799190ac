"""`vitkit convert` and load_model on vitkit directories: bit-exact round trips through save_pretrained."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vitkit
from tests.weights.conftest import LABELS, MEAN, hf_file_state, hf_to_timm_reference, image_batch
from vitkit.cli import main


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_cli_convert_timm_round_trip_is_bit_exact(hf_nano, tmp_path, astronaut, capsys):
    torch.save(hf_to_timm_reference(hf_file_state(hf_nano[0])), tmp_path / "vit.pth")
    dst = tmp_path / "out"
    assert main(["convert", str(tmp_path / "vit.pth"), str(dst), "--model", "vit_nano_patch4_32"]) == 0
    out = capsys.readouterr().out
    assert "num_heads=4 from model 'vit_nano_patch4_32'" in out and f"wrote {dst}" in out

    x = image_batch(astronaut, 32)
    converted = vitkit.load_model(dst)
    assert torch.equal(
        logits(converted, x), logits(vitkit.load_model(tmp_path / "vit.pth", model_name="vit_nano_patch4_32"), x)
    )
    assert converted.model_name == "vit_nano_patch4_32" and converted.cfg.num_heads == 4
    config = json.loads((dst / "config.json").read_text())
    assert config["format"] == "vitkit" and config["converted_from"]["format"] == "timm"


def test_cli_convert_hf_keeps_preprocessing(hf_cls, tmp_path, astronaut):
    pytest.importorskip("transformers")
    src, hf = hf_cls
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst)]) == 0
    converted = vitkit.load_model(dst)
    assert converted.preprocess.class_names == LABELS and converted.preprocess.mean == pytest.approx(MEAN)
    assert converted.cfg.norm_eps == 1e-12
    x = image_batch(astronaut, 32)
    assert torch.equal(logits(converted, x), logits(vitkit.load_model(src), x))
    with torch.no_grad():
        assert (logits(converted, x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5


def test_cli_convert_refuses_malicious_pickle(tmp_path, capsys):
    import os

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'SENTINEL'}",))

    torch.save({"w": RunsCode()}, tmp_path / "evil.pth")
    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not (tmp_path / "SENTINEL").exists() and not (tmp_path / "out").exists()


def test_convert_refuses_to_overwrite_a_foreign_config(hf_cls, tmp_path):
    src, _ = hf_cls
    with pytest.raises(ValueError, match="refusing to write into .*not a vitkit config"):
        vitkit.weights.convert_checkpoint(src, src)


def test_native_dir_with_img_size_and_num_classes(tmp_path, lines):
    model = vitkit.VisionTransformer(vitkit.ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                                                      num_classes=4))  # fmt: skip
    model.save_pretrained(str(tmp_path / "m"))
    same = vitkit.load_model(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(logits(same, x), logits(model, x))

    big = vitkit.load_model(tmp_path / "m", img_size=48, num_classes=2, log=lines)
    assert big.pos_embed.shape == (1, 1 + 36, 64) and big.preprocess.input_size == (48, 48)
    assert big.head.out_features == 2
    assert torch.equal(big.blocks[0].mlp.fc1.weight.data, model.blocks[0].mlp.fc1.weight.data)
    assert "resampled pos_embed from a 4x4 to a 6x6 grid" in lines.text() and "2-class head" in lines.text()
    assert logits(big, torch.randn(1, 3, 48, 48)).shape == (1, 2)


# Tiny instances of the families whose timm/torchvision state dicts need a registered name to load.
_NAMED_LAYOUTS = {
    "resnet": ("resnet18", dict(depths=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8)),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=2)),
    "convnext": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))),
    "vit_hybrid": ("vit_small_r26_s32_224", dict(embed_dim=32, depth=1, num_heads=2, backbone_args={
        "depths": [1, 1, 1, 1], "widths": [16, 16, 16, 16], "stem_width": 8, "gn_groups": 4})),
    "vit_hybrid_cnn": ("vit_hybrid_cnn_tiny_s4_32", dict(embed_dim=32, depth=1, num_heads=2)),
}  # fmt: skip


@pytest.mark.parametrize("family", list(_NAMED_LAYOUTS))
def test_a_state_dict_of_another_family_without_a_name_says_which_names_to_pass(tmp_path, family):
    """Without model_name such a file went to the ViT importer and failed with a ViT-specific message (a hybrid:
    a list of every backbone key as 'unexpected'); the error now names the family and its registered names."""
    name, args = _NAMED_LAYOUTS[family]
    model = vitkit.create_model(name, **args)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=rf"family '{family}'.*pass model_name= .*one of: .*{name}"):
        vitkit.load_model(tmp_path / "w.pth")


@pytest.mark.parametrize(("crop", "resized"), [(80, 106), (23, 30), (74, 105), (32, 36), (224, 256), (384, 384)])
def test_hf_preprocessor_crop_gives_back_the_same_resize(crop, resized):
    """A preprocessor_config.json (e.g. one `--to hf` wrote) that resizes to `resized` and crops `crop` becomes a
    crop fraction with which vitkit's eval preprocessing, floor(crop / c), resizes to `resized` again; crop / resized
    alone gave one pixel less for 80/106, 23/30 and 74/105."""
    from vitkit.weights._log import as_reporter
    from vitkit.weights.hf import preprocess_from_hf

    for size, crop_size in [({"shortest_edge": resized}, crop), ({"height": resized, "width": resized}, crop)]:
        pre = {"do_center_crop": True, "crop_size": {"height": crop_size, "width": crop_size}, "size": size}
        got = preprocess_from_hf(pre, {}, 0, as_reporter(lambda _: None), model_size=(crop, crop))
        assert math.floor(crop / got.crop_fraction) == resized
        assert got.crop_fraction == pytest.approx(crop / resized, rel=1e-12)
