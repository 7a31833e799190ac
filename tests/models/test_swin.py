"""Swin Transformer v1: registry variants, exact parameter counts, parity with transformers, windows and masks."""

from __future__ import annotations

import json

import pytest
import torch

from tests.models.contract import check_contract
from vitkit.layers import attention_layers, capture_attention
from vitkit.models import SwinConfig, SwinTransformer, create_model, list_models
from vitkit.models.swin import relative_position_index, shift_mask, window_and_shift
from vitkit.weights.hf_swin import hf_swin_to_timm, official_swin_to_timm

VARIANTS = list_models("swin_*")
PARAMS = {
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "swin_base_patch4_window12_384": 87_903_584,
    "swin_large_patch4_window7_224": 196_532_476,
}
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), num_classes=5)


def _tiny(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(SwinConfig(**{"img_size": 64, "window_size": 4, **TINY, **kw})).eval()


def test_registry_has_the_five_variants():
    assert sorted(VARIANTS) == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.num_classes == 1000


@pytest.mark.parametrize("name", VARIANTS)
def test_contract_tiny_non_square(name, tmp_path):
    """The contract at 64x96 (maps 16x24 .. 2x3: padded windows, shifted and clamped ones) with each variant's
    own window size, at tiny widths/depths."""
    torch.manual_seed(0)
    model = create_model(name, **TINY)
    check_contract(model, (64, 96), tmp_path)


def test_preprocess_crop():
    assert create_model("swin_tiny_patch4_window7_224", **TINY).preprocess.crop_fraction == 0.9
    pre = create_model("swin_base_patch4_window12_384", **TINY).preprocess
    assert pre.crop_fraction == 1.0 and pre.input_size == (384, 384)


def _hf_model(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4, num_labels=7
    )
    hf = transformers.SwinForImageClassification(config).eval()
    with torch.no_grad():  # transformers inits the bias tables to zero: make them matter
        for n, p in hf.named_parameters():
            if "relative_position_bias_table" in n or "norm" in n:
                p.add_(torch.randn_like(p) * 0.5)
    hf.save_pretrained(tmp_path / name)
    return transformers.SwinForImageClassification.from_pretrained(tmp_path / name).eval()


@pytest.mark.parametrize("size", [(64, 64), (80, 96)])
def test_parity_with_transformers(tmp_path, size):
    """Logits match transformers' SwinForImageClassification (random tiny config, window 4, depths 2-2-2) with
    max |delta| <= 1e-5 in fp32 at the native 64x64 (last stage 4x4 = one window, unshifted) and at 80x96 (maps
    20x24, 10x12, 5x6: padding before the shift in every stage). A fresh transformers model per size, because
    transformers' Swin keeps the window it clamped on an earlier call; the weights come from the on-disk files."""
    from safetensors.torch import load_file

    hf = _hf_model(tmp_path, "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    arch, timm_state = hf_swin_to_timm(state, config)
    model = SwinTransformer(SwinConfig(**arch)).eval()
    model.load_state_dict(timm_state, strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = model(x)
    assert out.shape == (2, 7)
    assert (out - ref).abs().max().item() <= 1e-5


def test_no_state_changes_between_calls():
    """A small input (maps smaller than the window: clamped) does not change what a later native call returns,
    the failure transformers' Swin has."""
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model(torch.randn(1, 3, 12, 20))  # stage maps 3x5, 2x3, 1x2, 1x1
        model(torch.randn(1, 3, 97, 33))  # sides not multiples of the patch: padded
        after = model(x)
    assert torch.equal(before, after)


def test_shift_mask_values_and_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = shift_mask(8, 8, 4, 2, dtype, "cpu")
        assert m.dtype == dtype and m.shape == (4, 16, 16)
        assert set(m.unique().float().tolist()) == {0.0, -100.0}
    m = shift_mask(8, 8, 4, 2, torch.float32, "cpu")
    assert (m[0] == 0).all()  # the top-left window holds one region after the roll
    assert (m[3] != 0).any()  # the bottom-right window mixes regions that the roll made neighbours


def test_half_precision_forward_runs_and_is_close():
    model = _tiny()
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max().item() < 0.1


def test_window_clamp_rule():
    assert window_and_shift(20, 24, 7, 3) == (7, 3)
    assert window_and_shift(7, 10, 7, 3) == (7, 0)  # shorter side == window: one window row, no shift
    assert window_and_shift(3, 10, 7, 3) == (3, 0)


def test_small_window_reads_centre_of_table():
    """A clamped 3x3 window uses the same bias entries as the same token pairs inside a 5x5 window."""
    big, small = relative_position_index(5, 5), relative_position_index(3, 5)
    pos = [r * 5 + c for r in range(3) for c in range(3)]  # 3x3 tokens inside the 5x5 window
    assert torch.equal(small, big[pos][:, pos])
    assert int(big.max()) == 9 * 9 - 1 and int(big.min()) == 0


def test_capture_declines_windowed_attention():
    model = _tiny()
    assert attention_layers(model) == []
    with pytest.raises(ValueError, match="no global self-attention"):
        with capture_attention(model):
            pass


def test_state_dict_has_no_index_or_mask_and_official_layout_loads():
    model = _tiny()
    state = model.state_dict()
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in state)
    # The official layout: downsample at the end of the previous stage, `head.*`, stored index/mask buffers.
    official = {}
    for k, v in state.items():
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        official[k.replace("head.fc.", "head.")] = v
    official["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    back = _tiny()
    back.load_state_dict(official_swin_to_timm(official), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_adapt_state_dict_resizes_bias_table():
    src = _tiny()
    dst = _tiny(window_size=6)
    state = dst.adapt_state_dict(src.state_dict(), {"window_size": 4})
    dst.load_state_dict(state, strict=True)
    assert dst.layers[0].blocks[0].attn.relative_position_bias_table.shape == (11 * 11, 1)


def test_layer_ids_and_no_weight_decay():
    model = _tiny()
    assert model.num_layer_ids == 5 + 2
    assert model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("layers.0.blocks.0.norm1.weight") == 1
    assert model.layer_id("layers.2.downsample.reduction.weight") == 3  # feeds stage 2's first block (id 3)
    assert model.layer_id("layers.3.blocks.0.mlp.fc1.weight") == 5
    assert model.layer_id("norm.weight") == model.layer_id("head.fc.weight") == 6
    assert model.no_weight_decay() == {
        n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")
    }
    assert len(model.no_weight_decay()) == 5


def test_intermediates_indices_and_norm():
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        last = model.forward_intermediates(x, indices=1, norm=True)
        feats = model.forward_features(x)
        picked = model.forward_intermediates(x, indices=[0, -1], as_maps=False)
    assert len(last) == 1 and torch.equal(last[0], feats)
    assert [t.shape for t in picked] == [(1, 256, 16), (1, 4, 128)]
    with pytest.raises(ValueError, match="n must be in 1..4"):
        model.forward_intermediates(x, indices=5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="depths"):
        SwinConfig(depths=(2, 2), num_heads=(3,))
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        SwinConfig(embed_dim=16, depths=(1,), num_heads=(5,))
    with pytest.raises(ValueError, match="window_size"):
        SwinConfig(window_size=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        _tiny()(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="num_classes"):
        _tiny().reset_classifier(-1)


def test_converter_refuses_unknown_keys_and_types():
    with pytest.raises(ValueError, match="model_type"):
        hf_swin_to_timm({}, {"model_type": "swinv2"})
    with pytest.raises(ValueError, match="unknown transformers Swin keys"):
        hf_swin_to_timm({"swin.foo.bar": torch.zeros(1)}, {"model_type": "swin"})


def test_assigning_a_linear_head_keeps_pooling_and_saves(tmp_path):
    """`model.head = nn.Linear(C, 3)` (the tutorials' way) keeps the pooled head and timm's `head.fc` keys."""
    import vitkit

    model = _tiny()
    model.head = torch.nn.Linear(model.num_features, 3)
    assert model.num_classes == 3 and "head.fc.weight" in model.state_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3)
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(vitkit.load_model(tmp_path / "m").eval()(x), y)
    with pytest.raises(ValueError, match="reset_classifier"):
        model.head = torch.nn.Linear(7, 3)
