"""The ResNet family: contract, exact parameter counts, parity with transformers, BN under checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.models.contract import check_contract
from vitkit.models import ResNet, ResNetConfig, create_model, list_models
from vitkit.models.registry import model_family
from vitkit.weights.hf_resnet import hf_resnet_to_timm

RESNETS = [n for n in list_models() if model_family(n) == "resnet"]
# A tiny instance of any variant: one block per stage, narrow widths (the block type stays the variant's).
TINY = dict(depths=(1, 1, 1, 1), widths=(4, 8, 8, 16), stem_width=8)


def test_variants_registered():
    assert RESNETS == ["resnet18", "resnet34", "resnet50"]


@pytest.mark.parametrize("name", RESNETS)
def test_contract_tiny_non_square(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **TINY)
    check_contract(model, (64, 96), tmp_path)


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_parameter_counts_exact(name, params):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_torchvision_layout_and_feature_info():
    with torch.device("meta"):
        r18, r50 = create_model("resnet18"), create_model("resnet50")
    keys18, keys50 = set(r18.state_dict()), set(r50.state_dict())
    # torchvision/timm names: no projection in resnet18's first stage, one in resnet50's (64 -> 256 channels).
    assert "layer1.0.downsample.0.weight" not in keys18 and "layer2.0.downsample.1.running_var" in keys18
    assert {"conv1.weight", "bn1.num_batches_tracked", "layer1.0.downsample.0.weight", "layer4.2.bn3.weight"} <= keys50
    assert {"fc.weight", "fc.bias"} <= keys18 & keys50
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in r50.feature_info] == [
        (256, 4, "layer1"), (512, 8, "layer2"), (1024, 16, "layer3"), (2048, 32, "layer4"),
    ]  # fmt: skip
    assert r18.num_features == 512 and r50.num_features == 2048
    ids = {n: r18.layer_id(n) for n, _ in r18.named_parameters()}
    assert ids["conv1.weight"] == ids["bn1.bias"] == 0
    assert [ids[f"layer{i}.0.conv1.weight"] for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert ids["fc.weight"] == r18.num_layer_ids - 1 == 5
    assert r18.is_classifier("fc.bias") and not r18.is_classifier("layer4.1.bn2.weight")
    assert r18.no_weight_decay() == set()
    pre = create_model("resnet50").preprocess
    assert (pre.mean, pre.std, pre.crop_fraction, pre.input_size) == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, (224, 224),
    )  # fmt: skip


def test_intermediates_any_size():
    """Sides that are not multiples of 32 work; each stage's map is ceil(side / reduction)."""
    model = create_model("resnet50", num_classes=5, **TINY).eval()
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        last2 = model.forward_intermediates(x, indices=2)
        picked = model.forward_intermediates(x, indices=[0, -1], as_maps=False)
        feats = model.forward_features(x)
    assert [tuple(m.shape[2:]) for m in maps] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert torch.equal(last2[1], maps[3]) and torch.equal(last2[0], maps[2]) and torch.equal(feats, maps[3])
    assert picked[0].shape == (1, 25 * 33, 16) and torch.equal(picked[1], maps[3].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="n must be in 1..4"):
        model.forward_intermediates(x, indices=5)
    with pytest.raises(ValueError, match="stage index 4"):
        model.forward_intermediates(x, indices=[4])


def test_grad_checkpointing_counts_batchnorm_statistics_once():
    """Recomputing a block in backward must not fold the batch into BN's running averages a second time."""
    torch.manual_seed(0)
    plain = create_model("resnet18", num_classes=3, **TINY).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 64, 64)
    for model in (plain, ckpt):
        model(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(a, b), name  # running_mean/var and num_batches_tracked (1 step, not 2)
    assert int(ckpt.layer2[0].bn1.num_batches_tracked) == 1
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bad_inputs_named():
    model = create_model("resnet18", **TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="block='wide'"):
        ResNetConfig(block="wide")
    with pytest.raises(ValueError, match="one entry per stage"):
        ResNetConfig(depths=(1, 1), widths=(8,))
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    model.preprocess.class_names = [str(i) for i in range(1000)]
    model.fc = nn.Linear(16, 5)  # the tutorials' way: config, class count and class names follow
    assert (model.num_classes, model.cfg.num_classes, model.preprocess.class_names) == (5, 5, None)
    assert model.describe().num_classes == 5
    model.fc = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(ValueError, match="model.fc is Sequential"):
        model.describe()


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------------------------
def _random_hf(layer_type: str, hidden: list[int], embed: int, classifier: bool = True):
    from transformers import ResNetConfig as HFConfig
    from transformers import ResNetForImageClassification, ResNetModel

    torch.manual_seed(0)
    cfg = HFConfig(embedding_size=embed, hidden_sizes=hidden, depths=[1, 2, 1, 1], layer_type=layer_type, num_labels=6)
    hf = (ResNetForImageClassification if classifier else ResNetModel)(cfg).eval()
    # Random BN affine parameters and statistics, so a swapped mean/var or weight/bias cannot pass unnoticed.
    with torch.no_grad():
        for m in hf.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.1)
                m.bias.normal_(0, 0.1)
    return hf


def _converted(hf, tmp_path) -> ResNet:
    import json

    from safetensors.torch import load_file

    hf.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))  # the on-disk keys
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    arch, timm_state = hf_resnet_to_timm(state, config)
    model = ResNet(**arch).eval()
    model.load_state_dict(timm_state, strict=True)
    return model


@pytest.mark.parametrize(
    "layer_type, hidden, embed", [("basic", [8, 16, 24, 32], 8), ("bottleneck", [16, 32, 48, 64], 8)]
)
def test_parity_with_transformers(layer_type, hidden, embed, tmp_path):
    """Logits of a random transformers ResNet, converted from its on-disk keys, match to max |delta| <= 1e-5 (fp32,
    eval mode) at the native 224x224 and at 97x130 (non-square, not a multiple of 32)."""
    hf = _random_hf(layer_type, hidden, embed)
    model = _converted(hf, tmp_path)
    assert model.num_classes == 6 and model.cfg.block == layer_type
    for size in ((224, 224), (97, 130)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref, ours = hf(pixel_values=x).logits, model(x)
        assert ref.abs().max() > 0.1  # a real signal, not near-zero logits
        assert (ours - ref).abs().max().item() <= 1e-5, size


def test_parity_backbone_without_classifier(tmp_path):
    """A `ResNetModel` (no classifier) converts to num_classes=0; pooled features match to 1e-5 at 224x224."""
    hf = _random_hf("bottleneck", [16, 32, 48, 64], 8, classifier=False)
    model = _converted(hf, tmp_path)
    assert model.num_classes == 0
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, ours = hf(pixel_values=x).pooler_output.flatten(1), model(x)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_converter_refuses_what_it_cannot_map():
    state = {"resnet.embedder.embedder.convolution.weight": torch.zeros(8, 3, 7, 7)}
    with pytest.raises(ValueError, match="not understood.*resnet.encoder.stages.0.layers.0.layer.0.convolution.bias"):
        hf_resnet_to_timm({**state, "resnet.encoder.stages.0.layers.0.layer.0.convolution.bias": torch.zeros(8)}, {})
    with pytest.raises(ValueError, match="downsample_in_bottleneck=True"):
        hf_resnet_to_timm(state, {"downsample_in_bottleneck": True})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        hf_resnet_to_timm(state, {"hidden_act": "gelu"})
    head = {**state, "classifier.1.weight": torch.zeros(6, 2048), "classifier.1.bias": torch.zeros(6)}
    with pytest.raises(ValueError, match="6 outputs but config.json's id2label names 2"):
        hf_resnet_to_timm(head, {"id2label": {"0": "a", "1": "b"}})
    arch, out = hf_resnet_to_timm(state, {"embedding_size": 8})
    assert arch["num_classes"] == 0 and set(out) == {"conv1.weight"}
    from transformers import ResNetConfig as HFConfig

    arch, _ = hf_resnet_to_timm(state, HFConfig(embedding_size=8, layer_type="basic", hidden_sizes=[8, 16, 24, 32]))
    assert (arch["stem_width"], arch["block"], arch["widths"]) == (8, "basic", (8, 16, 24, 32))
    with pytest.raises(TypeError, match="config must be config.json as a dict"):
        hf_resnet_to_timm(state, "config.json")


def test_freezing_keeps_batchnorm_statistics_of_frozen_stages():
    from vitkit.train.optim import freeze_backbone

    model = create_model("resnet18", num_classes=3, widths=(8, 16, 24, 32), stem_width=8).train()
    freeze_backbone(model, 1)  # stem and layer1
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    after = model.state_dict()
    for k, v in before.items():
        frozen = k.startswith(("bn1.", "layer1."))
        assert torch.equal(after[k], v) == frozen, k
    assert model.layer2[0].bn1.training and not model.layer1[0].bn1.training
