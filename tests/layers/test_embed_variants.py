"""Patch-embedding and position variants (issue 9): overlap, conv_stem, hybrid's refusal, CPVT's PEG."""

import json

import pytest
import torch
from torch import nn

from vitkit.layers import ConvStemEmbed, OverlapPatchEmbed, PosConv
from vitkit.models import create_model
from vitkit.models.vit import ViTConfig
from vitkit.weights import load_model

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=3, patch_size=4, img_size=16)
# (embed_layer, embed_args, pos_embed): every embedding variant, and the table-free position generator.
VARIANTS = {
    "patch": ("patch", {}, "learn"),
    "overlap": ("overlap", {}, "learn"),
    "overlap_k5": ("overlap", {"kernel_size": 5}, "learn"),
    "conv_stem": ("conv_stem", {}, "learn"),
    "peg": ("patch", {}, "peg"),
    "overlap_peg": ("overlap", {}, "peg"),
}


def _model(variant: str, **kw) -> nn.Module:
    embed, args, pos = VARIANTS[variant]
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", **{**TINY, **kw}, embed_layer=embed, embed_args=args, pos_embed=pos)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_at_two_sizes_and_gradients_reach_the_embedding(variant):
    model = _model(variant)
    for h, w in ((16, 16), (16, 24)):
        out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        assert model.forward_features(torch.randn(1, 3, h, w)).shape == (1, 1 + (h // 4) * (w // 4), 32)
    model(torch.randn(2, 3, 16, 24)).square().sum().backward()
    embed = [(n, p) for n, p in model.named_parameters() if n.startswith(("patch_embed.", "pos_block."))]
    assert embed, "no embedding parameters"
    for name, p in embed:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip_keeps_outputs_and_config(variant, tmp_path):
    model = _model(variant).eval()
    x = torch.randn(2, 3, 16, 24)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.cfg == model.cfg
    arch = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]
    assert (arch["embed_layer"], arch["embed_args"], arch["pos_embed"]) == VARIANTS[variant]


# --- overlap ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("patch", "kernel"), [(1, 1), (2, 3), (4, 7), (8, 13), (16, 25)])
def test_overlap_default_kernel_is_larger_than_the_stride(patch, kernel):
    layer = OverlapPatchEmbed(patch, 3, 8)
    assert layer.proj.kernel_size == (kernel, kernel) and layer.proj.stride == (patch, patch)
    before = (kernel - patch + 1) // 2  # the odd pixel of padding before the patch, the rest after
    assert layer.padding == (before, kernel - patch - before) * 2 and layer.proj.padding == (0, 0)
    assert layer(torch.randn(1, 3, 2 * patch, 3 * patch)).shape == (1, 6, 8)


@pytest.mark.parametrize(("patch", "kernel"), [(4, 4), (4, 5), (4, 6), (4, 8), (8, 11), (16, 31), (3, 5)])
def test_overlap_grid_is_the_plain_vits_for_any_kernel(patch, kernel):
    layer = OverlapPatchEmbed(patch, 3, 8, kernel_size=kernel)
    for h, w in ((patch, patch), (2 * patch, 5 * patch)):
        assert layer(torch.randn(1, 3, h, w)).shape == (1, (h // patch) * (w // patch), 8)


def test_overlap_tokens_see_their_neighbours_pixels():
    layer = OverlapPatchEmbed(4, 1, 8)  # kernel 7, padding 2: 2 pixels before and 1 after each 4x4 patch
    x = torch.zeros(1, 1, 8, 8)
    base = layer(x)
    for col, tokens in ((4, {0, 1}), (3, {0, 1}), (5, {1})):  # first pixels of the second patch, the first's last
        x.zero_()
        x[0, 0, 0, col] = 1.0
        changed = (layer(x) - base).abs().sum(-1)[0]  # (4,) one value per token of the 2x2 grid
        assert {i for i in range(4) if changed[i] > 0} == tokens, col  # a plain patchify changes one token


@pytest.mark.parametrize("kernel", [3, 0, True, 7.0])
def test_overlap_refuses_bad_kernels_by_name(kernel):
    with pytest.raises(ValueError, match=f"kernel_size={kernel!r}"):
        OverlapPatchEmbed(4, 3, 8, kernel_size=kernel)


def test_embed_args_are_checked_by_name():
    with pytest.raises(ValueError, match="unknown option.*'kernl'.*takes 'kernel_size'"):
        ViTConfig(embed_layer="overlap", embed_args={"kernl": 7})
    with pytest.raises(ValueError, match="'patch' takes no options"):
        ViTConfig(embed_args={"kernel_size": 7})
    with pytest.raises(TypeError, match="embed_args must be a dict"):
        ViTConfig(embed_args=[7])


# --- conv stem --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("patch", "convs"), [(2, 1), (4, 2), (8, 3), (16, 4)])
def test_conv_stem_is_the_papers_stack(patch, convs):
    stem = ConvStemEmbed(patch, 3, 64)
    conv = [m for m in stem.stem if isinstance(m, nn.Conv2d)]
    assert len(conv) == convs
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in conv)
    widths = [c.out_channels for c in conv]
    assert all(b == 2 * a for a, b in zip(widths, widths[1:]) if a > 8)  # doubling (from a floor of 8)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stem.stem) == convs
    assert sum(isinstance(m, nn.ReLU) for m in stem.stem) == convs  # ReLU as in Xiao et al.
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == 64


@pytest.mark.parametrize("patch", [1, 3, 6, 12, 14])
def test_conv_stem_refuses_patch_sizes_that_are_not_powers_of_two(patch):
    with pytest.raises(ValueError, match=f"power of two >= 2 .*got {patch}"):
        ConvStemEmbed(patch, 3, 64)


def test_old_convstem_name_loads_as_the_gelu_stem_it_was(tmp_path):
    cfg = ViTConfig(**{**TINY, "embed_layer": "convstem"})
    assert (cfg.embed_layer, cfg.embed_args) == ("conv_stem", {"act": "gelu"})
    # A vit_hybrid_cnn model saved before the rename: its config.json says "convstem".
    model = create_model("vit_hybrid_cnn_tiny_s4_32", embed_dim=32, depth=1, num_heads=2, embed_args={"act": "gelu"})
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["architecture"]["embed_layer"] = "convstem"
    del config["architecture"]["embed_args"]
    path.write_text(json.dumps(config))
    loaded = load_model(tmp_path / "m").eval()
    assert any(isinstance(m, nn.GELU) for m in loaded.patch_embed.stem)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert any(isinstance(m, nn.ReLU) for m in create_model("vit_hybrid_cnn_tiny_s4_32", depth=1).patch_embed.stem)


def test_conv_stem_refuses_unknown_activations():
    with pytest.raises(ValueError, match="act='tanh' is not a conv-stem activation; choose one of 'relu', 'gelu'"):
        ConvStemEmbed(4, 3, 64, act="tanh")


def test_hybrid_by_name_says_how_to_build_one():
    with pytest.raises(TypeError, match=r"embed_layer='hybrid' needs a CNN backbone.*vitkit.HybridViT"):
        create_model("vit_tiny_patch16_224", embed_layer="hybrid")


# --- PEG --------------------------------------------------------------------------------------------------------
def test_peg_is_a_residual_depthwise_conv_that_leaves_prefix_tokens_alone():
    torch.manual_seed(0)
    peg = PosConv(8)
    assert peg.proj.groups == 8 and peg.proj.kernel_size == (3, 3) and peg.proj.bias is not None
    x = torch.randn(2, 2 + 3 * 5, 8)  # two prefix tokens, a 3x5 grid
    y = peg(x, (3, 5), 2)
    assert torch.equal(y[:, :2], x[:, :2])
    maps = x[:, 2:].transpose(1, 2).reshape(2, 8, 3, 5)
    want = maps + nn.functional.conv2d(maps, peg.proj.weight, peg.proj.bias, padding=1, groups=8)
    torch.testing.assert_close(y[:, 2:], want.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="17 tokens, which is not 2 prefix tokens and a 4x4 grid"):
        peg(x, (4, 4), 2)


def test_peg_model_has_no_table_and_sits_after_the_first_block():
    model = _model("peg", reg_tokens=2)
    state = model.state_dict()
    assert "pos_embed" not in state and state["pos_block.proj.weight"].shape == (32, 1, 3, 3)
    assert model.pos_block_index == 1 and model.layer_id("pos_block.proj.weight") == 1
    seen = []
    model.pos_block.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append("block0"))
    model(torch.randn(1, 3, 16, 24))
    assert seen == ["block0", (1, 1 + 2 + 24, 32)]  # after block 0, registers and class token counted as prefix


def _peg_matters(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        before = model(x)
        model.pos_block.proj.weight.add_(1.0)
        return not torch.allclose(model(x), before)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_peg_reaches_the_logits_in_every_path(depth):
    model = _model("peg", depth=depth).eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        fast = model(x)  # inference computes only the class row of the last block
        full = model.forward_head(model.forward_features(x))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # depth 1: the generator goes before the only block, else the class token would never read it
    assert model.pos_block_index == min(1, depth - 1)
    assert _peg_matters(model, x)


def test_peg_under_checkpointing_capture_and_intermediates():
    model = _model("peg", depth=3)
    x = torch.randn(2, 3, 16, 24)
    ref = model(x)
    ref.sum().backward()
    grad = model.pos_block.proj.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.pos_block.proj.weight.grad, grad)
    model.eval()
    logits, maps = model(x, return_attention=True)
    torch.testing.assert_close(logits, ref.detach(), rtol=1e-4, atol=1e-5)
    assert [m.shape for m in maps] == [(2, 2, 25, 25)] * 3
    feats = model.forward_intermediates(x, indices=[0, 2], as_maps=True)
    assert [f.shape for f in feats] == [(2, 32, 4, 6)] * 2


def test_train_flags_carry_the_embedding_and_its_options():
    from vitkit.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--data", "shapes", "--embed-layer", "overlap", "--embed-args", "{kernel_size: 5}"]
    )
    assert (args.embed_layer, args.embed_args) == ("overlap", {"kernel_size": 5})


@pytest.mark.parametrize("variant", ["overlap", "conv_stem", "peg"])
def test_every_explain_method_gives_maps_on_the_patch_grid(variant):
    from vitkit.explain import METHODS, explain

    model = _model(variant).eval()
    x = torch.randn(1, 3, 16, 24)
    for method in METHODS:
        maps = explain(model, x, method=method, upsample=False)
        assert maps.shape == (1, 4, 6) and torch.isfinite(maps).all(), method


def test_a_peg_model_is_not_written_as_a_timm_state_dict():
    from vitkit.weights.export_timm import timm_state_dict

    with pytest.raises(ValueError, match="pos_embed='peg' has no timm counterpart"):
        timm_state_dict(_model("peg"))
