"""DeiT: registry variants, exact parameter counts, the contract, distilled training outputs, the one-head layout,
timm state dicts and directories saved when DeiT was a ViT option."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from tests.models.contract import check_contract
from vitkit.models import DeiT, DeiTConfig, VisionTransformer, ViTConfig, create_model, list_models
from vitkit.models.summary import model_table

# timm's numbers (1000 classes); the distilled ones add a token, its position row and a second head.
PARAMS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
}
TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=5)


def _tiny(name: str = "deit_tiny_distilled_patch16_224", **kw) -> DeiT:
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **kw}).eval()


def _full_width(name: str, **kw) -> DeiT:
    """A registered width with plain normal weights: skips the truncated-normal init, slow at full width."""
    with torch.device("meta"):
        model = create_model(name, **kw)
    model = model.to_empty(device="cpu").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def test_registry_has_the_six_variants_in_the_deit_family():
    assert sorted(list_models("deit*")) == sorted(PARAMS)
    for name in PARAMS:
        model = _tiny(name)
        assert type(model) is DeiT and model.family == "deit" and model.model_name == name
        assert (model.dist_token is not None) == ("distilled" in name) == (model.head_dist is not None)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.num_classes == 1000 and model.cfg.img_size == (224, 224)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_contract_tiny_non_square(name, tmp_path):
    """The contract at 32x48 (a 4x6 patch grid, positions resampled from the native 4x4) at tiny widths."""
    check_contract(_tiny(name), (32, 48), tmp_path)


def test_imagenet_preprocessing():
    pre = _tiny("deit_small_patch16_224").preprocess
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert (pre.crop_fraction, pre.interpolation, pre.input_size) == (0.875, "bicubic", (32, 32))


def test_models_table_lists_the_family():
    rows = {r.name: r for r in model_table("deit*", flops=False)}
    assert {n: r.params for n, r in rows.items()} == PARAMS
    assert rows["deit_small_distilled_patch16_224"].tokens == 2 + 14 * 14
    assert rows["deit_small_patch16_224"].tokens == 1 + 14 * 14


def test_distilled_training_returns_both_heads_and_eval_averages():
    model = _tiny()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls_logits = model.head(tokens[:, 0])
        dist_logits = model.head_dist(tokens[:, 1])
        averaged = model(x)
        torch.testing.assert_close(averaged, (cls_logits + dist_logits) / 2)
        model.train()
        # Off by default: one tensor, as the classification task expects. (Eval computed only the prefix rows of
        # the last block: equal up to float summation order.)
        torch.testing.assert_close(model(x), averaged, rtol=0, atol=1e-6)
        model.set_distilled_training(True)
        a, b = model(x)
        torch.testing.assert_close(a, cls_logits, rtol=0, atol=0)
        torch.testing.assert_close(b, dist_logits, rtol=0, atol=0)
        assert torch.equal(model.forward_head(tokens, pre_logits=True), model.eval().forward_head(tokens, True))
        assert torch.equal(model(x), averaged)  # eval always averages
        model.train().set_distilled_training(False)
        torch.testing.assert_close(model(x), averaged, rtol=0, atol=1e-6)  # training mode: every row computed


def test_distillation_parts_in_the_contract():
    model = _tiny().train()
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    assert model.layer_id("dist_token") == 0 and model.is_classifier("head_dist.weight")
    assert model.layer_id("head_dist.bias") == model.num_layer_ids - 1 == 2 + 1
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name in ("dist_token", "head_dist.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name  # both reach the averaged logits
    model.reset_classifier(0)
    assert isinstance(model.head_dist, torch.nn.Identity) and model(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_distilled_training_needs_a_distillation_head():
    with pytest.raises(ValueError, match=r"needs a distillation head; this model has distilled=False"):
        _tiny("deit_tiny_patch16_224").set_distilled_training(True)
    with pytest.raises(ValueError, match=r"distilled=True, dist_head=False"):
        _tiny(dist_head=False).set_distilled_training(True)
    _tiny("deit_tiny_patch16_224").set_distilled_training(False)  # turning it off is always fine


def test_one_head_layout_classifies_the_class_token(tmp_path):
    """dist_head=False (transformers' DeiTForImageClassification): the distillation token runs through the blocks
    but only the class token is classified; saved and loaded as such."""
    model = _tiny(dist_head=False)
    assert model.dist_token is not None and model.head_dist is None
    assert not any(k.startswith("head_dist") for k in model.state_dict())
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, model.head(model.forward_features(x)[:, 0]), rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "m")
    back = vitkit.load_model(tmp_path / "m").eval()
    assert back.cfg.dist_head is False and back.head_dist is None
    with torch.no_grad():
        assert torch.equal(back(x), y)
    check_contract(_tiny(dist_head=False), (32, 48))
    # A distillation head assigned by hand is saved as one (the config follows the modules).
    model.head_dist = torch.nn.Linear(32, 5)
    model.save_pretrained(tmp_path / "two")
    back = vitkit.load_model(tmp_path / "two").eval()
    assert back.cfg.dist_head is True and back.head_dist is not None
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="dist_head=True needs distilled=True"):
        DeiTConfig(dist_head=True)
    with pytest.raises(TypeError, match="dist_head must be True, False or None, got 'yes'"):
        DeiTConfig(distilled=True, dist_head="yes")
    with pytest.raises(ValueError, match="pool='avg' is not possible"):
        _tiny(dist_head=False).reset_classifier(3, pool="avg")
    with pytest.raises(TypeError, match="DeiT takes a DeiTConfig"):
        DeiT(dict(distilled=True))
    with pytest.raises(TypeError, match="unknown argument"):
        create_model("deit_tiny_patch16_224", dist_heads=False)


def test_a_vit_config_is_converted():
    model = DeiT(ViTConfig(**TINY, distilled=True), num_classes=3)
    assert isinstance(model.cfg, DeiTConfig) and model.cfg.distilled and model.num_classes == 3


def test_vit_directory_with_distilled_true_still_loads(tmp_path):
    """A directory saved when DeiT was a ViT option (family "vit", architecture distilled=true, a deit_* name)
    loads with the same logits."""
    torch.manual_seed(0)
    old = VisionTransformer(ViTConfig(**TINY, distilled=True)).eval()
    old.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    config = json.loads(cfg_path.read_text())
    assert config["family"] == "vit" and config["architecture"]["distilled"] is True
    config["model_name"] = "deit_tiny_distilled_patch16_224"  # as the old registry named it
    cfg_path.write_text(json.dumps(config))
    back = vitkit.load_model(tmp_path / "old").eval()
    assert back.head_dist is not None and back.dist_token is not None
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(back(x), old(x))


def test_timm_state_dicts_load_as_deit(tmp_path):
    """timm-layout DeiT state dicts (dist_token, head_dist.*) load as DeiT models: by name (checked against the
    name's shapes), by their keys alone, and in the one-head layout; logits are unchanged."""
    x = torch.randn(1, 3, 32, 48)  # any multiple of the patch: small, to keep the full-width models quick
    src = _full_width("deit_tiny_distilled_patch16_224", num_classes=7, depth=1)
    torch.save(src.state_dict(), tmp_path / "d.pth")
    unnamed = vitkit.load_model(tmp_path / "d.pth").eval()
    assert type(unnamed) is DeiT and unnamed.cfg.distilled and unnamed.num_classes == 7
    with torch.no_grad():
        ref = src(x)
        assert torch.equal(unnamed(x), ref)
    # Non-distilled DeiT by name: the same keys as a ViT, a DeiT because the name says so.
    plain = _full_width("deit_tiny_patch16_224", num_classes=4)
    torch.save(plain.state_dict(), tmp_path / "p.pth")
    named = vitkit.load_model(tmp_path / "p.pth", model_name="deit_tiny_patch16_224").eval()
    assert type(named) is DeiT and named.model_name == "deit_tiny_patch16_224" and not named.cfg.distilled
    with torch.no_grad():
        assert torch.equal(named(x), plain(x))
    # A name whose shapes disagree is refused by name.
    with pytest.raises(
        ValueError, match=r"does not match model 'deit_tiny_patch16_224': .*distilled True \(checkpoint\) vs False"
    ):
        vitkit.load_model(tmp_path / "d.pth", model_name="deit_tiny_patch16_224")
    # One head on the class token (no head_dist.*).
    one = _tiny(dist_head=False, embed_dim=64, num_heads=1)  # 64 wide: the importer guesses one 64-wide head
    torch.save(one.state_dict(), tmp_path / "o.pth")
    back = vitkit.load_model(tmp_path / "o.pth", model_name=None, img_size=32).eval()
    assert back.cfg.dist_head is False
    small = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(small), one(small))


def test_a_distilled_deit_trains_with_the_classification_task(tmp_path):
    """`vitkit train --model deit_tiny_distilled_patch16_224 --img-size 8` (tiny widths, patch 4): the averaged
    logits train, and the run's checkpoint is a distilled DeiT with both heads."""
    from vitkit.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run many times slower with oversubscribed OpenMP threads
    try:
        summary = train({
            "data": "digits", "model": "deit_tiny_distilled_patch16_224", "img_size": 8, "epochs": 1,
            "model_args": {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}, "batch_size": 64,
            "crop_fraction": 1.0, "hflip": 0.0, "progress": False, "out": str(tmp_path / "run"),
        })  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert summary["epochs_run"] == 1 and 0.0 <= summary["test_acc"] <= 1.0
    model = vitkit.load_model(tmp_path / "run")
    assert type(model) is DeiT and model.head_dist is not None and model.num_classes == 10
    assert model.cfg.img_size == (8, 8) and model.cfg.patch_size == 4
