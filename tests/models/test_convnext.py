"""ConvNeXt: every registered variant at tiny width/depth against the contract, published parameter counts, and
numerical parity with Hugging Face transformers through the converter in `vitkit.weights.hf_convnext`."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitkit
from tests.models.contract import check_contract
from vitkit.layers import LayerNorm2d
from vitkit.models.convnext import ConvNeXt, ConvNeXtConfig
from vitkit.weights.hf_convnext import hf_convnext_to_timm

ALL = [n for n in vitkit.list_models() if vitkit.models.registry.model_family(n) == "convnext"]
TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))

# Published parameter counts with a 1000-class head (timm / the paper's Table 9).
PUBLISHED = {"convnext_tiny": 28_589_128, "convnext_small": 50_223_688, "convnext_base": 88_591_464}


def test_every_variant_is_registered():
    assert sorted(ALL) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = vitkit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", ALL)
def test_model_contract(name, tmp_path):
    model = vitkit.create_model(name, num_classes=5, drop_path_rate=0.1, **TINY)
    check_contract(model, (64, 96), tmp_path)  # non-square
    assert model.preprocess.crop_fraction == 0.875 and model.preprocess.mean == (0.485, 0.456, 0.406)


def test_sizes_that_are_not_multiples_of_the_stride_floor_like_timm():
    model = vitkit.create_model("convnext_tiny", num_classes=3, **TINY).eval()
    check_contract(model, (70, 101))
    maps = model.forward_intermediates(torch.randn(1, 3, 70, 101))
    assert [tuple(m.shape[-2:]) for m in maps] == [(17, 25), (8, 12), (4, 6), (2, 3)]


def test_timm_layout_names():
    names = set(vitkit.create_model("convnext_tiny", **TINY).state_dict())
    for key in (
        "stem.0.weight",
        "stem.1.weight",
        "stages.1.downsample.0.weight",
        "stages.1.downsample.1.weight",
        "stages.2.blocks.1.conv_dw.weight",
        "stages.2.blocks.1.norm.weight",
        "stages.2.blocks.1.mlp.fc1.weight",
        "stages.2.blocks.1.mlp.fc2.bias",
        "stages.2.blocks.1.gamma",
        "head.norm.weight",
        "head.fc.weight",
    ):
        assert key in names, key
    assert not any(k.startswith("stages.0.downsample") for k in names)  # the stem already downsampled by 4


def test_layer_ids_stem_blocks_head():
    model = vitkit.create_model("convnext_tiny", **TINY)  # 1 + 1 + 2 + 1 blocks -> ids 0..6
    assert model.num_layer_ids == 7
    assert model.layer_id("stem.0.weight") == 0
    assert model.layer_id("stages.0.blocks.0.gamma") == 1
    assert model.layer_id("stages.1.downsample.1.weight") == 2 == model.layer_id("stages.1.blocks.0.norm.bias")
    assert model.layer_id("stages.2.blocks.1.mlp.fc1.weight") == 4
    assert model.layer_id("stages.3.downsample.0.bias") == 5
    assert model.layer_id("head.norm.weight") == 6 == model.layer_id("head.fc.bias")
    assert model.is_classifier("head.norm.weight") and not model.is_classifier("stages.3.blocks.0.gamma")
    with pytest.raises(ValueError, match="not a ConvNeXt parameter"):
        model.layer_id("blocks.0.attn.qkv.weight")


def test_forward_intermediates_indices_and_tokens():
    model = vitkit.create_model("convnext_tiny", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        every = model.forward_intermediates(x)
        last2 = model.forward_intermediates(x, indices=2)
        picked = model.forward_intermediates(x, indices=[0, -1])
        tokens = model.forward_intermediates(x, indices=[-1], as_maps=False)
        feats = model.forward_features(x)
    assert torch.equal(last2[0], every[2]) and torch.equal(last2[1], every[3])
    assert torch.equal(picked[0], every[0]) and torch.equal(picked[1], every[3])
    assert torch.equal(every[-1], feats)
    assert torch.equal(tokens[0], feats.flatten(2).transpose(1, 2))  # (B, H'*W', C)
    y = model.stem(x)
    for stage in model.stages:  # a stage called on its own runs the same path
        y = stage(y)
    assert torch.equal(y, feats)
    with pytest.raises(ValueError, match="1..4"):
        model.forward_intermediates(x, indices=5)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_drop_path_rises_linearly_over_all_blocks_and_layer_scale_init():
    model = vitkit.create_model("convnext_tiny", drop_path_rate=0.4, **TINY)
    blocks = [b for s in model.stages for b in s.blocks]
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert all(torch.equal(b.gamma, torch.full_like(b.gamma, 1e-6)) for b in blocks)
    assert vitkit.create_model("convnext_tiny", ls_init_value=None, **TINY).stages[0].blocks[0].gamma is None


def test_layernorm2d_is_layernorm_over_channels():
    norm = LayerNorm2d(6, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 5, 7)
    ref = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        norm(torch.randn(2, 6))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(depths=(1, 1), dims=(8, 16, 32)), "one entry per stage"),
        (dict(kernel_size=4), "kernel_size must be odd"),
        (dict(ls_init_value=0.0), "ls_init_value must be positive"),
        (dict(act_layer="tanh"), "act_layer='tanh'"),
        (dict(img_size=16), "smaller than ConvNeXt's total stride 32"),
        (dict(num_classes=-1), "num_classes must be >= 0"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ConvNeXtConfig(**kw)


def test_bad_inputs_are_named():
    model = vitkit.create_model("convnext_tiny", **TINY)
    with pytest.raises(ValueError, match="image width 20 is smaller"):
        model(torch.randn(1, 3, 64, 20))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        model.reset_classifier(-2)


def test_headless_model_and_hand_assigned_head_round_trip(tmp_path):
    model = vitkit.create_model("convnext_tiny", num_classes=0, **TINY).eval()
    assert model.num_classes == 0 and model(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    model.head.fc = nn.Linear(32, 4)  # the tutorials' way; the saved config follows the head
    model.save_pretrained(tmp_path / "m")
    back = vitkit.load_model(tmp_path / "m").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert back.num_classes == 4 and torch.equal(back(x), model(x))


# --------------------------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------------------------
def _hf_model(tmp_path, cls_name="ConvNextForImageClassification", **config):
    """A random transformers ConvNeXt saved with save_pretrained, every parameter moved away from its init.

    Layer scale starts at 1e-6, which would make the blocks nearly invisible in the logits: its values, the norms'
    scales and shifts and every other weight are randomised so a wrong rename or a wrong block order shows.
    """
    import transformers

    cfg = transformers.ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], num_labels=5, **config)
    hf = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_file(str(tmp_path / "hf" / "model.safetensors")), (tmp_path / "hf" / "config.json").read_text()


def _convert(state, config_text):
    import json

    arch, timm_state = hf_convnext_to_timm(state, json.loads(config_text))
    model = ConvNeXt(**arch).eval()
    model.load_state_dict(timm_state, strict=True)
    return model


@pytest.mark.parametrize("size", [(224, 224), (100, 150)])
def test_logits_match_transformers(tmp_path, size):
    """Max |delta logits| <= 1e-5 (fp32, eval) at the native 224x224 and at 100x150 (not a multiple of 32: both
    implementations floor at every strided layer). The state dict is read from the files save_pretrained wrote."""
    hf, state, config = _hf_model(tmp_path)
    assert any(k.startswith("convnext.encoder.stages.") for k in state)  # the on-disk layout, not live module names
    model = _convert(state, config)
    assert model.num_classes == 5 and model.cfg.head_norm_eps == 1e-12 and model.cfg.img_size == (224, 224)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = model(x)
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert (out - ref).abs().max().item() <= 1e-5


def test_backbone_without_layer_scale_matches_transformers(tmp_path):
    """A ConvNextModel (no classifier) with layer_scale_init_value=0 (no gamma): pooled features <= 1e-5 at 96x128."""
    hf, state, config = _hf_model(tmp_path, cls_name="ConvNextModel", layer_scale_init_value=0.0)
    model = _convert(state, config)
    assert model.num_classes == 0 and model.cfg.ls_init_value is None
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        pooled = model(x)
        maps = model.forward_features(x)
    assert (pooled - ref.pooler_output).abs().max().item() <= 1e-5
    assert (maps - ref.last_hidden_state).abs().max().item() <= 1e-5


def test_converter_refuses_what_it_cannot_map():
    cfg = {"model_type": "convnext", "depths": [1, 1, 2, 1], "hidden_sizes": [8, 16, 24, 32]}
    with pytest.raises(ValueError, match="model_type='convnextv2'"):
        hf_convnext_to_timm({}, {**cfg, "model_type": "convnextv2"})
    with pytest.raises(ValueError, match="ConvNextBackbone"):
        hf_convnext_to_timm({}, {**cfg, "architectures": ["ConvNextBackbone"]})
    with pytest.raises(ValueError, match="hidden_states_norms.stage4.weight"):
        hf_convnext_to_timm({"hidden_states_norms.stage4.weight": torch.zeros(32)}, cfg)
    with pytest.raises(ValueError, match="hidden_act='quick_gelu'"):
        hf_convnext_to_timm({}, {**cfg, "hidden_act": "quick_gelu"})
    state = {"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="id2label has 2 labels but the classifier has 3"):
        hf_convnext_to_timm(state, {**cfg, "id2label": {"0": "a", "1": "b"}})
    # TF-era norm names are read as weight/bias; the layer scale keeps its name.
    arch, out = hf_convnext_to_timm(
        {
            "convnext.layernorm.gamma": torch.ones(32),
            "convnext.encoder.stages.0.layers.0.layer_scale_parameter": torch.ones(8),
        },
        cfg,
    )
    assert set(out) == {"head.norm.weight", "stages.0.blocks.0.gamma"} and arch["num_classes"] == 0


def test_cli_models_table(capsys):
    from vitkit.cli import main

    main(["models", "convnext_*"])
    out = capsys.readouterr().out
    assert "| convnext_tiny | convnext | 28.59M | 4.46 |" in out and "| convnext_base | convnext | 88.59M |" in out
    assert "| 7x7 |" in out


# --------------------------------------------------------------------------------------------------------------
# torchvision layout (torchvision is not installed: its ConvNeXt is transcribed below from
# torchvision/models/convnext.py, module for module, so the state dict has its exact keys and shapes)
# --------------------------------------------------------------------------------------------------------------
class _TvLayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        ).permute(0, 3, 1, 2)


class _TvPermute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class _TvCNBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            _TvPermute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            _TvPermute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.randn(dim, 1, 1) * 0.5)

    def forward(self, x):
        return self.layer_scale * self.block(x) + x


class _TvConvNeXt(nn.Module):
    def __init__(self, settings, num_classes):  # settings: [(in, out or None, blocks)]
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, settings[0][0], 4, stride=4), _TvLayerNorm2d(settings[0][0], eps=1e-6))
        layers = [stem]
        for cin, cout, n in settings:
            layers.append(nn.Sequential(*[_TvCNBlock(cin) for _ in range(n)]))
            if cout is not None:
                layers.append(nn.Sequential(_TvLayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, cout, 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = settings[-1][0]
        self.classifier = nn.Sequential(_TvLayerNorm2d(last, eps=1e-6), nn.Flatten(1), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def test_torchvision_layout_matches_its_forward():
    """torchvision keys -> timm keys: logits equal the transcribed torchvision forward to 1e-5 (fp32) at 224x224
    and 96x160, with every norm and layer scale randomised."""
    from vitkit.weights.torchvision_convnext import looks_like_torchvision_convnext, torchvision_convnext_to_timm

    tv = _TvConvNeXt([(8, 16, 1), (16, 24, 1), (24, 32, 2), (32, None, 1)], num_classes=6).eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.1))
    state = tv.state_dict()
    assert looks_like_torchvision_convnext(state)
    arch, timm_state = torchvision_convnext_to_timm(state)
    assert arch["depths"] == (1, 1, 2, 1) and arch["dims"] == (8, 16, 24, 32) and arch["num_classes"] == 6
    model = ConvNeXt(**arch).eval()
    model.load_state_dict(timm_state, strict=True)
    for size in ((224, 224), (96, 160)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref, out = tv(x), model(x)
        assert ref.abs().max() > 0.1 and (out - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="features.1.0.block.4.weight"):
        torchvision_convnext_to_timm({**state, "features.1.0.block.4.weight": torch.zeros(1)})
