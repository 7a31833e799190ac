"""Hybrid CNN-ViTs: the ResNetV2 backbone, the paper's R50/R26 hybrids (timm names, counts, key layout),
`HybridViT` over zoo backbones, `HybridCNNViT`, save/load and errors.

transformers 5 no longer ships ViTHybrid (`ViTHybridForImageClassification` was removed), so there is no
transformers parity test here; the layout is tested against timm's key names and shapes instead.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from tests.models.contract import check_contract
from vitkit.models import HybridCNNViT, HybridViT, ResNet, ResNetConfig, create_model, list_models
from vitkit.models.registry import model_family
from vitkit.models.resnetv2 import StdConv2dSame

HYBRIDS = [n for n in list_models() if model_family(n) == "vit_hybrid"]
CNN_VITS = [n for n in list_models() if model_family(n) == "vit_hybrid_cnn"]
RESNETV2S = [n for n in list_models() if model_family(n) == "resnetv2"]
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)


def _tiny_rv2(n_stages: int) -> dict:
    """A tiny ResNetV2: one block per stage, narrow, GroupNorm(4) so the widths and their quarters divide."""
    return {"depths": [1] * n_stages, "widths": [16, 16, 32, 32][:n_stages], "stem_width": 8, "gn_groups": 4}


def test_variants_registered():
    assert HYBRIDS == ["vit_base_r50_s16_224", "vit_base_r50_s16_384", "vit_small_r26_s32_224"]
    assert RESNETV2S == ["resnetv2_r50_s16", "resnetv2_r26_s32"]
    assert CNN_VITS == ["vit_hybrid_cnn_tiny_s4_32", "vit_hybrid_cnn_small_s4_32", "vit_hybrid_cnn_small_s8_64"]
    assert vitkit.HybridViT is HybridViT and vitkit.HybridCNNViT is HybridCNNViT


# --- the contract, every registered variant at tiny sizes, non-square input ---------------------------------------
@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_contract_tiny_non_square(name, tmp_path):
    torch.manual_seed(0)
    n_stages = 3 if "r50" in name else 4
    model = create_model(name, num_classes=5, img_size=64, backbone_args=_tiny_rv2(n_stages), **TINY_VIT)
    stride = 16 if "s16" in name else 32
    assert model.feature_info[-1]["reduction"] == stride
    check_contract(model, (2 * stride, 3 * stride), tmp_path)


@pytest.mark.parametrize("name", CNN_VITS)
def test_cnn_vit_contract_tiny_non_square(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **TINY_VIT)
    stride = model.cfg.patch_size
    assert model.feature_info[0]["reduction"] == stride and model.num_classes == 10
    check_contract(model, (4 * stride, 6 * stride), tmp_path)


@pytest.mark.parametrize("name", RESNETV2S)
def test_resnetv2_contract_tiny_non_square(name, tmp_path):
    torch.manual_seed(0)
    n_stages = 3 if "r50" in name else 4
    model = create_model(name, num_classes=4, **_tiny_rv2(n_stages))
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32][:n_stages]
    check_contract(model, (64, 96), tmp_path)


# --- exact sizes and timm's layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, num_classes, params",
    [
        # timm's default for this name is its headless `orig_in21k` weights (num_classes=0): the 97,890,112.
        ("vit_base_r50_s16_224", 0, 97_890_112),
        ("vit_base_r50_s16_224", 1000, 97_890_112 + 768 * 1000 + 1000),
        ("vit_base_r50_s16_384", 1000, 98_950_952),
        ("vit_small_r26_s32_224", 1000, 36_431_912),
    ],
)
def test_parameter_counts_exact(name, num_classes, params):
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == params


def timm_hybrid_state(depths, widths, stem, dim, depth, classes, grid, in_chans=3):
    """A state dict in timm's layout (`vision_transformer_hybrid.py` over `resnetv2.py`, preact=False), written
    from timm's source: key names and shapes, random values."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid[0] * grid[1], dim)}
    bb = "patch_embed.backbone."
    shapes[bb + "stem.conv.weight"] = (stem, in_chans, 7, 7)
    shapes[bb + "stem.norm.weight"] = shapes[bb + "stem.norm.bias"] = (stem,)
    prev = stem
    for i, (d, out) in enumerate(zip(depths, widths)):
        mid = out // 4
        for j in range(d):
            p = f"{bb}stages.{i}.blocks.{j}."
            if j == 0:  # ResNetStage gives the first block a DownsampleConv, whatever the stride
                shapes[p + "downsample.conv.weight"] = (out, prev, 1, 1)
                shapes[p + "downsample.norm.weight"] = shapes[p + "downsample.norm.bias"] = (out,)
            shapes[p + "conv1.weight"] = (mid, prev if j == 0 else out, 1, 1)
            shapes[p + "conv2.weight"] = (mid, mid, 3, 3)
            shapes[p + "conv3.weight"] = (out, mid, 1, 1)
            for k, c in (("norm1", mid), ("norm2", mid), ("norm3", out)):
                shapes[p + k + ".weight"] = shapes[p + k + ".bias"] = (c,)
        prev = out
    shapes["patch_embed.proj.weight"] = (dim, prev, 1, 1)
    shapes["patch_embed.proj.bias"] = (dim,)
    for b in range(depth):
        p = f"blocks.{b}."
        for k, shape in {
            "norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim),
            "mlp.fc2.bias": (dim,),
        }.items():  # fmt: skip
            shapes[p + k] = shape
    shapes["norm.weight"] = shapes["norm.bias"] = (dim,)
    shapes["head.weight"], shapes["head.bias"] = (classes, dim), (classes,)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_timm_state_dict_loads_strictly():
    """A state dict with timm's keys and shapes loads with `load_state_dict(strict=True)` and lands where named."""
    depths, widths = [1, 2, 1], [16, 16, 32]
    state = timm_hybrid_state(depths, widths, stem=8, dim=32, depth=2, classes=5, grid=(4, 4))
    model = create_model(
        "vit_base_r50_s16_224", img_size=64, num_classes=5,
        backbone_args={"depths": depths, "widths": widths, "stem_width": 8, "gn_groups": 4}, **TINY_VIT,
    )  # fmt: skip
    model.load_state_dict(state, strict=True)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_full_size_key_layout_matches_timm():
    """The full R50+ViT-B/16 has exactly timm's keys and shapes (on the meta device)."""
    state = timm_hybrid_state([3, 4, 9], [256, 512, 1024], stem=64, dim=768, depth=12, classes=1000, grid=(14, 14))
    with torch.device("meta"):
        model = create_model("vit_base_r50_s16_224")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in state.items()}


def test_std_conv_same_matches_tf_same_padding():
    """Weight standardisation (biased variance, eps 1e-8 as timm's hybrids) and TensorFlow 'SAME' padding
    (the odd pixel on the bottom/right for stride 2), checked against an independent computation."""
    torch.manual_seed(0)
    conv = StdConv2dSame(3, 4, 3, stride=2)
    assert conv.eps == 1e-8 and conv.bias is None
    w = conv.weight
    w_std = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-8)
    for size, pad in ((8, (0, 1, 0, 1)), (7, (1, 1, 1, 1))):
        x = torch.randn(1, 3, size, size)
        want = F.conv2d(F.pad(x, pad), w_std, stride=2)
        torch.testing.assert_close(conv(x), want)
        assert want.shape[-1] == -(-size // 2)


# --- HybridViT over zoo backbones -----------------------------------------------------------------------------------
BACKBONES = {  # name -> tiny overrides of that zoo model
    "resnet18": dict(depths=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8),
    "convnext_tiny": dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)),
    "resnetv2_r50_s16": _tiny_rv2(3),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_hybrid_vit_over_zoo_backbones(name, tmp_path):
    """A backbone module is used in place (its weights are kept, also the Linears a ViT would re-initialise), cut
    after the stride-16 stage; the tokens are the projection of that stage's map; the contract holds."""
    torch.manual_seed(0)
    backbone = create_model(name, num_classes=0, **BACKBONES[name]).eval()
    reference = copy.deepcopy(backbone)
    model = HybridViT(backbone, n_classes=6, img_size=32, **TINY_VIT).eval()
    embed = model.patch_embed
    assert embed.backbone is backbone and embed.stage == 2 and embed.stride == (16, 16)
    kept = {k: v for k, v in reference.state_dict().items() if k in backbone.state_dict()}
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in kept.items()) and kept
    # Only what runs is left: nothing of the stages after stage 2, nor a head norm.
    later = tuple(fi["module"] + "." for fi in reference.feature_info[3:])
    assert not any(k.startswith((*later, "head.", "norm.")) for k in backbone.state_dict())
    assert len(backbone.state_dict()) < len(reference.state_dict()) or name == "resnetv2_r50_s16"
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        want = embed.proj(reference.forward_intermediates(x, indices=[2])[0]).flatten(2).transpose(1, 2)
        torch.testing.assert_close(embed(x), want)
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert all(i == 0 for n, i in ids.items() if n.startswith("patch_embed.backbone."))
    check_contract(model, (48, 32), tmp_path)
    config = json.loads((tmp_path / "contract" / "config.json").read_text())
    assert config["family"] == "vit_hybrid" and config["architecture"]["backbone"] == name


def test_stage_choice_and_errors():
    tiny = dict(n_classes=3, img_size=32, **TINY_VIT)
    args = BACKBONES["resnet18"]
    m = HybridViT("resnet18", backbone_args=args, stage=1, **tiny)
    assert m.patch_embed.stride == (8, 8) and m.feature_info[0] == {"num_chs": 32, "reduction": 8, "module": "blocks.0"}
    assert HybridViT("resnet18", backbone_args=args, out_index=-1, **tiny).patch_embed.stride == (32, 32)
    assert HybridViT("resnet18", backbone_args=args, patch_size=2, **tiny).patch_embed.stride == (32, 32)
    with pytest.raises(
        ValueError, match=r"stage=4 is not a stage of backbone ResNet: it has 4 stages .*\[4, 8, 16, 32\]"
    ):
        HybridViT("resnet18", backbone_args=args, stage=4, **tiny)
    with pytest.raises(ValueError, match="backbone='resnet5' is not a registered model; closest: resnet50"):
        HybridViT("resnet5", **tiny)
    with pytest.raises(TypeError, match="Sequential lacks feature_info, forward_intermediates"):
        HybridViT(nn.Sequential(nn.Conv2d(3, 8, 16, stride=16)), **tiny)
    with pytest.raises(TypeError, match="'stage' and 'out_index' both"):
        HybridViT("resnet18", stage=1, out_index=1, **tiny)
    with pytest.raises(TypeError, match="embed_layer='hybrid' needs a CNN backbone module.*HybridViT"):
        create_model("vit_tiny_patch16_224", embed_layer="hybrid")
    m = HybridViT("resnet18", backbone_args=args, **tiny)
    with pytest.raises(ValueError, match="image width 40 is not a multiple of patch size 16"):
        m(torch.randn(1, 3, 32, 40))


def test_registered_hybrid_takes_another_backbone():
    """`create_model(<hybrid name>, backbone=...)` (and `vitkit train --model NAME --set model_args='{backbone: ...}'`)
    swaps the registered name's CNN for another one, given by name or as a module, like any other override."""
    tiny = dict(num_classes=3, img_size=32, stage=1, **TINY_VIT)
    by_name = create_model("vit_base_r50_s16_224", backbone="resnet18", backbone_args=BACKBONES["resnet18"], **tiny)
    assert by_name.cfg.backbone == "resnet18" and type(by_name.patch_embed.backbone) is ResNet
    assert by_name.patch_embed.stride == (8, 8) and by_name(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    module = create_model("resnet18", num_classes=0, **BACKBONES["resnet18"])
    given = create_model("vit_small_r26_s32_224", backbone=module, **tiny)
    assert given.patch_embed.backbone is module and given.cfg.backbone == "resnet18"


def test_foreign_backbone_module_refused_at_save(tmp_path):
    """A contract model that is not from the registry trains and runs, but cannot be described by config.json."""
    backbone = ResNet(ResNetConfig(depths=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8, num_classes=0))
    model = HybridViT(backbone, n_classes=3, img_size=32, **TINY_VIT)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="backbone is a ResNet module that is not a registered vitkit model"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_save_load_round_trip_keeps_backbone_by_name(tmp_path):
    torch.manual_seed(0)
    model = HybridViT("convnext_tiny", backbone_args=BACKBONES["convnext_tiny"], stage=1, n_classes=4,
                      img_size=(16, 32), **TINY_VIT).eval()  # fmt: skip
    model.save_pretrained(tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]
    assert (
        arch["backbone"] == "convnext_tiny" and arch["stage"] == 1 and arch["backbone_args"]["dims"] == [8, 16, 16, 32]
    )
    back = vitkit.load_model(tmp_path / "m").eval()
    assert type(back) is HybridViT and back.patch_embed.stride == (8, 8)
    x = torch.randn(2, 3, 32, 48)  # ConvNeXt itself wants sides >= its 4-stage stride, 32
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


# --- HybridCNNViT -------------------------------------------------------------------------------------------------
def test_cnn_vit_documented_arguments_and_training_step():
    """The documents' call builds a conv-stem ViT; one optimiser step on a tiny one moves every parameter."""
    model = HybridCNNViT(n_classes=10, embed_dim=384, depth=6)
    assert (model.num_classes, model.embed_dim, len(model.blocks), model.cfg.patch_size) == (10, 384, 6, 4)
    assert [m.stride for m in model.patch_embed.stem if isinstance(m, nn.Conv2d)] == [(2, 2), (2, 2)]
    torch.manual_seed(0)
    tiny = HybridCNNViT(n_classes=3, **TINY_VIT)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(tiny(x), y).backward()
    opt.step()
    unchanged = [n for n, p in tiny.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    with pytest.raises(ValueError, match="power of two"):
        HybridCNNViT(patch_size=6, img_size=36)


@pytest.mark.parametrize("build", [
    lambda: HybridCNNViT(n_classes=3, **TINY_VIT),
    lambda: HybridViT("resnetv2_r50_s16", backbone_args=_tiny_rv2(3), n_classes=3, img_size=32, **TINY_VIT),
])  # fmt: skip
def test_bf16_forward(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_backbone_module_with_any_head_is_saved_by_name(tmp_path):
    """A zoo backbone whose head config.json could not describe is fine: the head is dropped before describing."""
    torch.manual_seed(0)
    backbone = create_model("resnet18", **BACKBONES["resnet18"])
    backbone.fc = nn.Sequential(nn.Linear(16, 3), nn.ReLU())
    model = HybridViT(backbone, n_classes=2, img_size=32, **TINY_VIT).eval()
    model.save_pretrained(tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]
    assert arch["backbone"] == "resnet18" and arch["backbone_args"]["num_classes"] == 0
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(vitkit.load_model(tmp_path / "m").eval()(x), model(x))


def test_hybrid_refuses_another_patch_embedding_by_name():
    with pytest.raises(ValueError, match=r"embed_layer='overlap' is not possible for a HybridViT"):
        create_model("vit_small_r26_s32_224", embed_layer="overlap")
