"""Weights out: `--to hf` directories that transformers loads with vitkit's logits, `--to timm` files in timm's keys.

Parity: max |delta logits| <= 1e-5 (fp32, eval) between the vitkit model and transformers' `from_pretrained` of the
exported directory, at the native size (non-square 32x48 for ViT/DeiT) and at a second, non-square size: 64x96,
70x100, 72x100 for Swin, ConvNeXt, ResNet; 48x64 for ViT/DeiT from a square native 32x32 (transformers resamples
positions only from a square grid, with `interpolate_pos_encoding=True`).
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import vitkit
from tests.weights.conftest import randomise_
from vitkit.cli import main
from vitkit.weights import export_hf
from vitkit.weights.export_hf import save_hf, to_hf
from vitkit.weights.export_timm import save_timm
from vitkit.weights.hf import KEYS as VIT_KEYS
from vitkit.weights.hf_convnext import KEYS as CONVNEXT_KEYS
from vitkit.weights.hf_resnet import KEYS as RESNET_KEYS
from vitkit.weights.hf_swin import KEYS as SWIN_KEYS
from vitkit.weights.keymap import KeyRule, KeyTable

transformers = pytest.importorskip("transformers")
TOL = 1e-5
NAMES = ["ant", "bee", "cat"]


_VIT_ARCH = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def _vit(**kw):
    return vitkit.VisionTransformer(**{**_VIT_ARCH, **kw})


# family -> (tiny vitkit model, transformers class, second (H, W) or None). Sizes: the native one, then another.
TINY = {
    "vit": (lambda: _vit(), "ViTForImageClassification", None),
    "deit": (lambda: _vit(distilled=True), "DeiTForImageClassificationWithTeacher", None),
    "deit_one_head": (  # the DeiT family's dist_head=False: a distillation token, one classifier
        lambda: vitkit.models.DeiT(**_VIT_ARCH, distilled=True, dist_head=False),
        "DeiTForImageClassification",
        None,
    ),
    "swin": (
        lambda: vitkit.create_model(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            embed_dim=16,
            depths=(1, 2),
            num_heads=(2, 4),
            window_size=4,
            num_classes=3,
        ),  # fmt: skip
        "SwinForImageClassification",
        (64, 96),
    ),
    "convnext": (
        lambda: vitkit.create_model("convnext_tiny", img_size=64, depths=(1, 2), dims=(8, 16), num_classes=3),
        "ConvNextForImageClassification",
        (70, 100),  # not multiples of the stride: every strided layer floors, in both
    ),
    "resnet": (
        lambda: vitkit.create_model(
            "resnet50", img_size=64, depths=(1, 2), widths=(8, 16), stem_width=8, num_classes=3
        ),  # fmt: skip
        "ResNetForImageClassification",
        (72, 100),
    ),
}


def _tiny(family: str) -> nn.Module:
    model = TINY[family][0]()
    randomise_(model, seed=1)  # layer scale, norms and all: a mis-mapped tensor shows in the logits
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # random statistics, so swapped mean/var cannot pass
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    model.preprocess.class_names = list(NAMES)
    return model.eval()


def _disk_keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _logits_delta(model, hf, size) -> float:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (model(x) - hf(pixel_values=x).logits).abs().max().item()


@pytest.mark.parametrize("family", list(TINY))
def test_hf_export_loads_in_transformers_with_the_same_logits_and_back_in_vitkit(tmp_path, family):
    model = _tiny(family)
    _, cls_name, second = TINY[family]
    save_hf(model, tmp_path / "hf", verify=False)  # the test compares the logits itself, independently
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [cls_name] and config["id2label"] == {"0": "ant", "1": "bee", "2": "cat"}

    # The keys and shapes transformers' own save_pretrained writes for this config, none more, none less.
    cls = getattr(transformers, cls_name)
    reference = cls(transformers.AutoConfig.from_pretrained(tmp_path / "hf"))
    reference.save_pretrained(tmp_path / "reference")
    assert _disk_keys(tmp_path / "hf" / "model.safetensors") == _disk_keys(tmp_path / "reference" / "model.safetensors")

    for loader in (transformers.AutoModelForImageClassification, cls):
        hf = loader.from_pretrained(tmp_path / "hf").eval()
        assert type(hf).__name__ == cls_name
        assert _logits_delta(model, hf, model.cfg.img_size) <= TOL
    if second is not None:  # every Swin stage map exceeds the window at both sizes: no window clamping either side
        assert _logits_delta(model, hf, second) <= TOL

    back = vitkit.load_model(tmp_path / "hf").eval()
    assert back.preprocess.class_names == NAMES
    x = torch.randn(2, 3, *(second or model.cfg.img_size))
    with torch.no_grad():
        assert (back(x) - model(x)).abs().max().item() <= TOL


@pytest.mark.parametrize("distilled", [False, True])
def test_vit_and_deit_exports_agree_at_another_size_with_interpolated_positions(tmp_path, distilled):
    # transformers resamples positions only from a square native grid (interpolate_pos_encoding=True).
    model = _vit(img_size=32, distilled=distilled)
    randomise_(model, seed=5)
    model.eval()
    save_hf(model, tmp_path / "hf", verify=False)
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x, interpolate_pos_encoding=True).logits).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "size, expected",
    [((32, 32), {"shortest_edge": 36}), ((32, 48), {"height": 36, "width": 54})],  # floor(side / 0.875)
)
def test_preprocessor_config_matches_vitkit_eval_preprocessing(tmp_path, size, expected):
    from PIL import Image

    from vitkit.data.inference import prepare_image

    model = _vit(img_size=size)  # crop 0.875, bicubic
    model.preprocess.mean, model.preprocess.std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    save_hf(model, tmp_path / "hf", verify=False)
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["size"] == expected and pre["crop_size"] == {"height": size[0], "width": size[1]}
    assert pre["resample"] == 3 and pre["image_mean"] == [0.4, 0.5, 0.6]
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    ramp = np.linspace(0, 255, 70 * 50 * 3).reshape(50, 70, 3)
    image = Image.fromarray(np.clip(ramp + 60 * np.sin(ramp / 9), 0, 255).astype(np.uint8))
    _, ours = prepare_image(image, model)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    assert theirs.shape == ours.shape == (1, 3, *size)
    # The same resize, crop and normalisation; PIL's and torch's bicubic kernels differ by a few grey levels.
    assert (theirs - ours).abs().mean().item() < 0.02
    back = vitkit.load_model(tmp_path / "hf").preprocess
    assert (back.mean, back.std, back.interpolation) == (model.preprocess.mean, model.preprocess.std, "bicubic")
    assert math.floor(size[0] / back.crop_fraction) == 36  # the same resize before the crop
    assert back.class_names is None  # none were set: transformers' LABEL_i names are not written


REFUSED = [
    (lambda: _vit(reg_tokens=2), r"reg_tokens=2 has no transformers equivalent"),
    (lambda: _vit(pool="avg", class_token=False), r"class_token=False has no transformers equivalent"),
    (lambda: _vit(pool="avg"), r"pool='avg' has no transformers equivalent"),
    (lambda: _vit(pos_embed="sincos"), r"pos_embed='sincos' has no transformers equivalent"),
    (lambda: _vit(mlp_layer="swiglu"), r"mlp_layer='swiglu' has no transformers equivalent"),
    (lambda: _vit(norm_layer="rmsnorm"), r"norm_layer='rmsnorm' has no transformers equivalent"),
    (lambda: _vit(qk_norm=True), r"qk_norm=True has no transformers equivalent"),
    (lambda: _vit(init_values=1e-5), r"init_values=1e-05 has no transformers equivalent"),
    (lambda: _vit(fc_norm=True), r"fc_norm=True has no transformers equivalent"),
    (
        lambda: vitkit.create_model("swin_tiny_patch4_window7_224", depths=(1, 1), num_heads=(2, 4), norm_eps=1e-6),
        r"norm_eps=1e-06 has no trans",
    ),
    (lambda: vitkit.create_model("convnext_tiny", depths=(1, 1), dims=(8, 16), kernel_size=5), r"kernel_size=5 "),
    (lambda: vitkit.create_model("convnext_tiny", depths=(1, 1), dims=(8, 16), mlp_ratio=2.0), r"mlp_ratio=2.0 "),
]


@pytest.mark.parametrize("build, message", REFUSED)
def test_models_transformers_cannot_represent_are_refused_by_field_and_nothing_is_written(tmp_path, build, message):
    with pytest.raises(ValueError, match=message):
        save_hf(build(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_replaced_head_and_unknown_fields_are_refused():
    model = _vit()
    model.head = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="head"):
        to_hf(model)

    class Custom(vitkit.VisionTransformer):  # a subclass with a tensor transformers has no place for
        def __init__(self, **kw):
            super().__init__(**kw)
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"no transformers counterpart \(2\): \['extra.bias', 'extra.weight'\]"):
        to_hf(Custom(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3))


def test_a_failed_check_leaves_the_previous_directory_untouched(tmp_path, monkeypatch):
    model = _tiny("convnext")
    save_hf(model, tmp_path / "hf")
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    exporters = dict(export_hf._EXPORTERS)

    def swapped(m, rep):  # a mapping bug: two blocks' depthwise kernels exchanged
        config, state = exporters["convnext"](m, rep)
        a, b = "convnext.encoder.stages.1.layers.0.dwconv.weight", "convnext.encoder.stages.1.layers.1.dwconv.weight"
        state[a], state[b] = state[b], state[a]
        return config, state

    def wrong_eps(m, rep):  # a config bug vitkit's ViT re-import does not read back: only transformers' logits show it
        config, state = exporters["vit"](m, rep)
        return {**config, "layer_norm_eps": 0.5}, state

    monkeypatch.setitem(export_hf._EXPORTERS, "convnext", swapped)
    keys = r"\['stages.1.blocks.0.conv_dw.weight', 'stages.1.blocks.1.conv_dw.weight'\]"
    with pytest.raises(ValueError, match=rf"convnext export does not import back into vitkit unchanged: {keys}"):
        save_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    monkeypatch.setitem(export_hf._EXPORTERS, "vit", wrong_eps)
    with pytest.raises(ValueError, match="transformers' logits differ from vitkit's"):
        save_hf(_tiny("vit"), tmp_path / "vit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial or temporary directory left
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"holds files besides .*notes.txt"):
        save_hf(model, tmp_path / "hf")


# timm's parameter names for one tiny model per family, written from timm's module attribute names
# (timm/models/vision_transformer.py, deit.py, swin_transformer.py, convnext.py, resnet.py).
def _timm_vit_keys(depth: int, extra: tuple[str, ...] = ()) -> list[str]:
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]  # fmt: skip
    blocks = [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    top = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
           "head.weight", "head.bias"]  # fmt: skip
    return sorted([*top, *blocks, *extra])


def _timm_swin_keys() -> list[str]:  # depths (1, 1); index/mask buffers are non-persistent in timm >= 0.9
    block = ["norm1.weight", "norm1.bias", "attn.relative_position_bias_table", "attn.qkv.weight", "attn.qkv.bias",
             "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]  # fmt: skip
    keys = [f"layers.{s}.blocks.0.{k}" for s in (0, 1) for k in block]
    keys += ["layers.1.downsample.norm.weight", "layers.1.downsample.norm.bias", "layers.1.downsample.reduction.weight"]
    keys += ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    return sorted([*keys, "norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"])


def _timm_convnext_keys() -> list[str]:  # depths (1, 1)
    block = ["gamma", "conv_dw.weight", "conv_dw.bias", "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]  # fmt: skip
    keys = [f"stages.{s}.blocks.0.{k}" for s in (0, 1) for k in block]
    keys += [f"stages.1.downsample.{i}.{w}" for i in (0, 1) for w in ("weight", "bias")]
    keys += ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]
    return sorted([*keys, "head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"])


def _timm_resnet_keys() -> list[str]:  # basic blocks, depths (1, 1), widths (64, 128): torchvision's names
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *[f"bn1.{f}" for f in bn]]
    for s in (1, 2):
        keys += [f"layer{s}.0.conv{j}.weight" for j in (1, 2)] + [f"layer{s}.0.bn{j}.{f}" for j in (1, 2) for f in bn]
    keys += ["layer2.0.downsample.0.weight", *[f"layer2.0.downsample.1.{f}" for f in bn]]
    return sorted([*keys, "fc.weight", "fc.bias"])


TIMM_KEYS = [
    (lambda: _vit(depth=1), _timm_vit_keys(1)),
    (lambda: _vit(depth=1, distilled=True), _timm_vit_keys(1, ("dist_token", "head_dist.weight", "head_dist.bias"))),
    (lambda: _vit(depth=1, reg_tokens=2, init_values=1e-5, qk_norm=True),
     _timm_vit_keys(1, ("reg_token", "blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "blocks.0.attn.q_norm.weight",
                        "blocks.0.attn.q_norm.bias", "blocks.0.attn.k_norm.weight", "blocks.0.attn.k_norm.bias"))),
    (lambda: vitkit.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1), num_heads=(2, 4)),
     _timm_swin_keys()),
    (lambda: vitkit.create_model("convnext_tiny", depths=(1, 1), dims=(8, 16)), _timm_convnext_keys()),
    (lambda: vitkit.create_model("resnet18", depths=(1, 1), widths=(64, 128)), _timm_resnet_keys()),
]  # fmt: skip


@pytest.mark.parametrize("build, expected", TIMM_KEYS)
def test_timm_export_writes_timms_keys(tmp_path, build, expected):
    model = build()
    save_timm(model, tmp_path / "w.safetensors")
    save_timm(model, tmp_path / "w.pth")
    from_st = load_file(str(tmp_path / "w.safetensors"))
    from_pth = torch.load(tmp_path / "w.pth", weights_only=True)
    assert sorted(from_st) == sorted(from_pth) == expected
    for k, v in model.state_dict().items():
        assert torch.equal(from_st[k], v) and torch.equal(from_pth[k], v)


# Registered names only: a timm file has no config. (Swin and ConvNeXt files, whose keys are checked above, load
# by name in tests/weights/test_hf_families.py; their 28M-parameter models would double this file's time.)
@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "resnet18", "vit_small_r26_s32_224"])
def test_timm_export_loads_back_by_name_with_the_same_logits(tmp_path, name):
    model = vitkit.create_model(name, num_classes=7).eval()
    randomise_(model, seed=4)
    lines = []
    save_timm(model, tmp_path / "w.safetensors", log=lines.append)
    assert lines == [f"{tmp_path / 'w.safetensors'}: load it back with vitkit.load_model(path, model_name={name!r})"]
    back = vitkit.load_model(tmp_path / "w.safetensors", model_name=name).eval()
    x = torch.randn(2, 3, 64, 64) if name.startswith("vit_small_r26") else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_timm_export_refuses_a_family_timm_lacks(tmp_path):
    model = vitkit.create_model("vit_hybrid_cnn_tiny_s4_32", depth=1)
    with pytest.raises(ValueError, match="family 'vit_hybrid_cnn' .* has no timm layout"):
        save_timm(model, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_timm_export_names_what_a_reload_cannot_recover_and_refuses_other_suffixes(tmp_path):
    lines = []
    save_timm(
        _vit(img_size=32, depth=1, embed_dim=64, num_heads=1, act_layer="silu"), tmp_path / "w.pt", log=lines.append
    )
    assert "act_layer='silu' (reload gives 'gelu')" in lines[0]
    with pytest.raises(ValueError, match=r"suffix '.npz' is not a state dict format; use one of .safetensors"):
        save_timm(_vit(), tmp_path / "w.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


@pytest.mark.parametrize("dist_head", [True, False])
def test_timm_export_of_a_deit_warns_about_nothing_a_reload_recovers(tmp_path, dist_head):
    """A DeiT with dist_head True or False (None = follow `distilled` is the same as True for a distilled model):
    a reload by shapes gives the same head layout, so no warning, and the reload agrees."""
    model = vitkit.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1,
        num_classes=3, dist_head=dist_head,
    ).eval()  # fmt: skip
    randomise_(model, seed=5)
    lines = []
    save_timm(model, tmp_path / "w.pth", log=lines.append)
    assert len(lines) == 1 and "load it back with vitkit.load_model(path" in lines[0], lines
    back = vitkit.load_model(tmp_path / "w.pth").eval()
    assert back.describe().has_dist_head is dist_head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_timm_export_says_why_a_file_cannot_give_the_model_back(tmp_path):
    """A 32-wide ViT: no reload tells its heads. The warning said "would rebuild this model with other values
    for: (the shapes do not decide ...)", a field list holding a sentence; it now gives the reason itself."""
    lines = []
    save_timm(_vit(img_size=32, depth=1, embed_dim=32, num_heads=2), tmp_path / "w.pth", log=lines.append)
    assert len(lines) == 1 and "other values for" not in lines[0]
    assert "does not give the model back by itself (the shapes do not decide the architecture: cannot tell the " \
        "number of attention heads of a 32-wide model" in lines[0]  # fmt: skip
    assert lines[0].endswith("Keep a vitkit directory (--to vitkit) to reload it")


def test_cli_convert_to_hf_and_timm(tmp_path, capsys):
    model = _tiny("resnet")
    model.save_pretrained(tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert _logits_delta(model, hf, (64, 64)) <= TOL
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "w.bin"), "--to", "timm"]) == 0
    state = torch.load(tmp_path / "w.bin", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and len(state) == len(
        model.state_dict()
    )
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "hf"]) == 2  # a vitkit dir
    assert "its config.json is not a transformers config" in capsys.readouterr().err
    assert vitkit.load_model(tmp_path / "native").family == "resnet"  # untouched
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "w.onnx"), "--to", "timm"]) == 2
    assert "--to timm writes one file" in capsys.readouterr().err
    # A refusal reaches the command line with the field named, and writes nothing.
    _vit(reg_tokens=1).save_pretrained(tmp_path / "reg")
    assert main(["convert", str(tmp_path / "reg"), str(tmp_path / "hf_reg"), "--to", "hf"]) == 2
    assert "reg_tokens=1 has no transformers equivalent" in capsys.readouterr().err
    assert not (tmp_path / "hf_reg").exists()


def test_the_transformers_check_draws_no_progress_bar_and_leaves_the_setting(tmp_path, capfd):
    """`vitkit convert --to hf` printed transformers' "Loading weights" progress bar from its logits check."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    save_hf(_tiny("resnet"), tmp_path / "hf", log=lambda _: None)
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize(
    "table, model",
    [
        (VIT_KEYS, lambda: _vit()),
        (SWIN_KEYS, lambda: _tiny("swin")),
        (CONVNEXT_KEYS, lambda: _tiny("convnext")),
        (RESNET_KEYS, lambda: _tiny("resnet")),
    ],  # fmt: skip
)
def test_one_key_table_serves_both_directions(table, model):
    for key in model().state_dict():
        if ".attn.qkv." in key:  # fused in timm, three tensors in transformers: not a rename
            continue
        assert table.to_timm(table.to_hf(key)) == key


def test_key_templates_with_offsets_words_and_rests():
    table = KeyTable(
        [
            ("encoder.layers.{i}.downsample.{rest*}", "layers.{i+1}.downsample.{rest}"),
            ("stages.{s}.{w:weight|bias}", "layer{s+1}.{w}"),
            KeyRule("alias.{w:weight|bias}", "x.{w}", export=False),
            ("real.{w:weight|bias}", "x.{w}"),
        ]
    )
    assert table.to_timm("encoder.layers.2.downsample.norm.weight") == "layers.3.downsample.norm.weight"
    assert table.to_hf("layers.3.downsample.norm.weight") == "encoder.layers.2.downsample.norm.weight"
    assert table.to_hf("layers.0.downsample.norm.weight") is None  # no transformers stage -1
    assert table.to_timm("stages.0.bias") == "layer1.bias" and table.to_timm("stages.0.gamma") is None
    assert table.to_timm("alias.weight") == "x.weight" and table.to_hf("x.weight") == "real.weight"


def test_headless_and_bf16_models_export(tmp_path):
    model = _tiny("resnet")
    model.reset_classifier(0)  # pooled features out, as transformers' Identity classifier gives them
    save_hf(model, tmp_path / "features")
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "features").eval()
    assert hf.config.num_labels == 0 and _logits_delta(model, hf, (64, 64)) <= TOL
    lines = []
    save_hf(_tiny("vit").to(torch.bfloat16), tmp_path / "bf16", log=lines.append)
    assert any("same logits" in line for line in lines)  # compared in fp32 on both sides
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["classifier.weight"].dtype == torch.bfloat16


def test_timm_export_of_a_resnetv2_hybrid_writes_timms_hybrid_keys(tmp_path):
    """The R50/R26 hybrids already hold timm's vision_transformer_hybrid names (checked against a key/shape set
    written from timm's naming in tests/models/test_hybrid.py); `--to timm` writes them, and they load back strictly
    with the same logits (loading by name: test_hybrid.py). A hybrid on another backbone is refused."""
    from tests.models.test_hybrid import timm_hybrid_state

    depths, widths = [1, 2, 1], [16, 16, 32]
    tiny = vitkit.create_model(
        "vit_base_r50_s16_224", img_size=64, num_classes=5, embed_dim=32, depth=2, num_heads=2,
        backbone_args={"depths": depths, "widths": widths, "stem_width": 8, "gn_groups": 4},
    )  # fmt: skip
    lines = []
    save_timm(tiny, tmp_path / "tiny.safetensors", log=lines.append)
    expected = timm_hybrid_state(depths, widths, stem=8, dim=32, depth=2, classes=5, grid=(4, 4))
    assert sorted(load_file(str(tmp_path / "tiny.safetensors"))) == sorted(expected)
    assert "model_name='vit_base_r50_s16_224'" in lines[0] and "embed_dim=32 (reload gives 768)" in lines[0]
    back = vitkit.create_model(
        "vit_base_r50_s16_224", img_size=64, num_classes=5, embed_dim=32, depth=2, num_heads=2,
        backbone_args={"depths": depths, "widths": widths, "stem_width": 8, "gn_groups": 4},
    )  # fmt: skip
    back.load_state_dict(load_file(str(tmp_path / "tiny.safetensors")), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), tiny.eval()(x))
    other = vitkit.models.HybridViT("resnet18", img_size=32, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="backbone='resnet18' has no timm layout"):
        save_timm(other, tmp_path / "other.pth")
