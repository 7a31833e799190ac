"""Every registered model, at tiny width/depth, against the model contract (after timm's tests/test_models.py)."""

import dataclasses

import pytest
import torch

import vitkit
from vitkit.layers import resample_pos_embed
from vitkit.models.vit import VisionTransformer, ViTConfig

ALL = [n for n in vitkit.list_models() if vitkit.models.registry.model_family(n) == "vit"]  # ViT-specific tests
TINY = dict(embed_dim=32, depth=2, num_heads=2)


def tiny(name, **kw):
    """The registered variant's structure (patch, tokens, pooling) at a tiny width and depth, non-square input."""
    p = vitkit.create_model(name, **TINY).cfg.patch_size
    return vitkit.create_model(name, **{**TINY, "img_size": (2 * p, 3 * p), **kw})


def batch(model, b=2, h=None, w=None):
    H, W = model.cfg.img_size
    return torch.randn(b, model.cfg.in_chans, h or H, w or W)


# Published parameter counts (timm / the papers). ViT-H/14 (in21k) and DINO ViT-S/8 are published without a
# classifier, so those two are compared headless; with a 1000-class head they are larger by exactly D*1000+1000.
PUBLISHED = {
    ("vit_tiny_patch16_224", 1000): 5_717_416,
    ("vit_small_patch16_224", 1000): 22_050_664,
    ("vit_base_patch16_224", 1000): 86_567_656,
    ("vit_large_patch16_224", 1000): 304_326_632,
    ("vit_base_patch32_224", 1000): 88_224_232,
    ("vit_huge_patch14_224", 0): 630_764_800,
    ("vit_small_patch8_224", 0): 21_670_272,
    ("deit_tiny_distilled_patch16_224", 1000): 5_910_800,
    ("deit_base_distilled_patch16_224", 1000): 87_338_192,
}


@pytest.mark.parametrize(("name", "classes"), list(PUBLISHED))
def test_parameter_count_matches_published(name, classes):
    with torch.device("meta"):
        model = vitkit.create_model(name, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[(name, classes)]


def test_headless_count_plus_head_is_thousand_class_count():
    with torch.device("meta"):
        a = vitkit.create_model("vit_huge_patch14_224")
        b = vitkit.create_model("vit_huge_patch14_224", num_classes=0)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(a) - n(b) == 1280 * 1000 + 1000


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_finite(name):
    model = tiny(name, num_classes=7).eval()
    x = batch(model)
    y = model(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name):
    model = tiny(name, num_classes=5).train()
    model(batch(model)).square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"


@pytest.mark.parametrize("name", ALL)
def test_model_contract(name):
    model = tiny(name, num_classes=5).eval()
    x = batch(model, b=3)
    D, p = model.embed_dim, model.cfg.patch_size
    gh, gw = model.patch_grid(*model.cfg.img_size)
    assert (gh, gw) == (2, 3)
    feats = model.forward_features(x)
    assert feats.shape == (3, model.num_prefix_tokens + gh * gw, D)
    assert model.forward_head(feats, pre_logits=True).shape == (3, D)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    # Intermediates: tokens and maps; the last one, normed, is forward_features.
    toks = model.forward_intermediates(x, indices=[0, -1])
    assert [t.shape for t in toks] == [feats.shape] * 2
    maps = model.forward_intermediates(x, indices=1, as_maps=True)
    assert maps[0].shape == (3, D, gh, gw)
    torch.testing.assert_close(model.forward_intermediates(x, indices=1, norm=True)[0], feats)
    # reset_classifier to another size, and to none.
    model.reset_classifier(11)
    assert model(x).shape == (3, 11)
    model.reset_classifier(0)
    assert model(x).shape == (3, D)
    expected = {n for n in ("pos_embed", "cls_token", "dist_token", "reg_token") if getattr(model, n) is not None}
    assert model.no_weight_decay() == expected
    assert expected <= {n for n, _ in model.named_parameters()}
    assert p == model.patch_embed.patch_size[0]


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "vit_small_patch14_224_reg4", "deit_tiny_distilled_patch16_224"]
)
def test_grad_checkpointing_same_output_and_gradients(name, monkeypatch):
    import vitkit.models.vit as vit_module

    model = tiny(name, num_classes=4).train()
    x = batch(model)
    calls = []
    real = vit_module.checkpoint
    monkeypatch.setattr(vit_module, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    outs, grads = [], []
    for ckpt in (False, True):
        calls.clear()
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        y, attns = model(x, return_attention=[0])  # checkpointing also covers the attention path
        (y.sum() + attns[0].sum()).backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert len(calls) == (model.cfg.depth if ckpt else 0)  # every block went through checkpoint()
    # The other forward paths are checkpointed too.
    calls.clear()
    model(x).sum().backward()
    model.forward_intermediates(x, indices=[-1])[0].sum().backward()
    assert len(calls) == 2 * model.cfg.depth
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "vit_small_patch14_224_reg4", "deit_tiny_distilled_patch16_224"]
)
def test_fused_and_explicit_attention_agree(name):
    model = tiny(name, num_classes=4).eval()
    x = batch(model, b=3)
    fused = model(x)
    explicit, attns = model(x, return_attention=True)
    assert (fused - explicit).abs().max() <= 1e-5
    N = model.num_tokens(*model.cfg.img_size)
    assert len(attns) == model.cfg.depth
    for a in attns:
        assert a.shape == (3, model.cfg.num_heads, N, N)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, model.cfg.num_heads, N))


def test_return_attention_selects_layers_and_keeps_others_fused(monkeypatch):
    model = vitkit.create_model("vit_tiny_patch16_224", depth=4, **{k: v for k, v in TINY.items() if k != "depth"})
    calls = []
    for i, blk in enumerate(model.blocks):
        orig = blk.attn.forward
        monkeypatch.setattr(
            blk.attn,
            "forward",
            lambda x, grid=None, i=i, f=orig, m=blk.attn: (calls.append((i, m.capture is not None)), f(x, grid))[1],
        )
    _, attns = model(torch.randn(1, 3, 224, 224), return_attention=[1, -1])
    assert len(attns) == 2
    assert calls == [(0, False), (1, True), (2, False), (3, True)]
    with pytest.raises(ValueError, match="layer index 4 is out of range"):
        model(torch.randn(1, 3, 224, 224), return_attention=[4])


def test_non_square_and_non_native_sizes():
    model = vitkit.create_model("vit_tiny_patch16_224", num_classes=3, **TINY).eval()
    for h, w in [(224, 224), (160, 320), (48, 16)]:
        y, attns = model(torch.randn(2, 3, h, w), return_attention=[-1])
        n = 1 + (h // 16) * (w // 16)
        assert y.shape == (2, 3) and attns[0].shape[-1] == n


def test_runtime_pos_embed_is_resampled_and_cached():
    model = vitkit.create_model("vit_tiny_patch16_224", num_classes=3, **TINY).eval()
    with torch.no_grad():
        a = model._pos_embed_for((10, 20), torch.float32, torch.device("cpu"))
        b = model._pos_embed_for((10, 20), torch.float32, torch.device("cpu"))
    assert a is b  # cached
    assert a.shape == (1, 1 + 200, 32)
    torch.testing.assert_close(a[:, :1], model.pos_embed[:, :1])  # class token position untouched
    torch.testing.assert_close(a, resample_pos_embed(model.pos_embed, (10, 20), (14, 14), 1))  # the one function
    # A few grids stay cached at once (multi-scale eval), bounded.
    with torch.no_grad():
        for g in range(1, 12):
            model._pos_embed_for((g, g + 1), torch.float32, torch.device("cpu"))
    assert len(model._pos_cache) == model.POS_CACHE_SIZE
    # An optimiser step (in-place update) invalidates it.
    with torch.no_grad():
        before = model._pos_embed_for((3, 5), torch.float32, torch.device("cpu"))
        model.pos_embed.add_(1.0)
        after = model._pos_embed_for((3, 5), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(after, before + 1.0)
    # Loading new weights invalidates the cache.
    sd = model.state_dict()
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])
    model.load_state_dict(sd)
    with torch.no_grad():
        c = model._pos_embed_for((10, 20), torch.float32, torch.device("cpu"))
    assert not torch.equal(a, c)
    # With gradients on, the table is recomputed (differentiable) each time.
    model.train()
    model(torch.randn(1, 3, 160, 320)).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name",
    [
        "vit_tiny_patch16_224",
        "vit_small_patch14_224_reg4",
        "deit_tiny_distilled_patch16_224",
        "vit_small_patch16_224_gap",
    ],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, name):
    model = tiny(name, num_classes=6).eval()
    model.preprocess.class_names = [f"class {i}" for i in range(6)]
    model.save_pretrained(tmp_path / "m")
    assert sorted(f.name for f in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = vitkit.load_model(str(tmp_path / "m")).eval()
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)
    assert loaded.cfg == model.cfg and loaded.preprocess == model.preprocess
    x = batch(model)
    assert torch.equal(model(x), loaded(x))


def test_load_refuses_mismatched_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny("vit_tiny_patch16_224")
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing keys \(1\): \['head.bias'\].*unexpected keys \(1\): \['extra.weight'\]"
    ):
        vitkit.load_model(str(tmp_path))


def test_tutorial_aliases():
    with torch.device("meta"):
        m = vitkit.create_vit_tiny(n_classes=10)
    assert m.head.out_features == 10 and m.head.in_features == 192 and m.cfg.patch_size == 16
    for fn, dim in [
        (vitkit.create_vit_small, 384),
        (vitkit.create_vit_base, 768),
        (vitkit.create_vit_large, 1024),
        (vitkit.create_vit_huge, 1280),
    ]:
        with torch.device("meta"):
            assert fn(n_classes=3).head.in_features == dim


# --- bad inputs: each names the value ---------------------------------------------------------------------------
def test_image_size_not_multiple_of_patch():
    model = tiny("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"image height 230 is not a multiple of patch size 16 \(try 224 or 240\)"):
        model(torch.randn(1, 3, 230, 224))
    with pytest.raises(ValueError, match=r"image width 8 is not a multiple of patch size 16 \(try 16\)"):
        model(torch.randn(1, 3, 32, 8))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        tiny("vit_tiny_patch16_224")(torch.randn(1, 1, 32, 48))


def test_unknown_model_lists_closest():
    with pytest.raises(ValueError, match=r"unknown model 'vit_smal_patch16_224'; closest: vit_small_patch16_224"):
        vitkit.create_model("vit_smal_patch16_224")


def test_unknown_override_field():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['n_blocks'\].*accepted: .*depth"):
        vitkit.create_model("vit_tiny_patch16_224", n_blocks=3)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(pool="cls"), r"pool='cls' is not allowed; choose one of 'token', 'avg', 'none'"),
        (dict(pos_embed="rope"), r"pos_embed='rope' is not allowed"),
        (dict(embed_dim=100, num_heads=3), r"embed_dim 100 is not divisible by num_heads 3"),
        (dict(class_token=False), r"pool='token' needs class_token=True"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\), got 1.5"),
        (dict(img_size=100), r"image height 100 is not a multiple of patch size 16"),
        (dict(num_classes=-1), r"num_classes must be >= 0"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ViTConfig(**kw)


def test_config_is_a_typed_dataclass_with_defaults_of_vit_b16():
    cfg = ViTConfig()
    assert dataclasses.is_dataclass(cfg)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (768, 12, 12, 16, (224, 224))
    assert isinstance(VisionTransformer(ViTConfig(**TINY, img_size=32)).blocks[0].ls1, torch.nn.Identity)


def test_cli_models_table(capsys):
    from vitkit.cli import main

    assert main(["models", "vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "| vit_tiny_patch16_224 | vit | 5.72M | 1.25 | 224x224 | 16 | 14x14 | 197 |" in out
    assert main(["models", "nothing*"]) == 1


def test_config_is_copied_not_shared(tmp_path):
    cfg = ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=16, num_classes=5)
    a, b = VisionTransformer(cfg), VisionTransformer(cfg)
    a.reset_classifier(9)
    assert b.cfg.num_classes == 5 and cfg.num_classes == 5
    b.save_pretrained(tmp_path)
    assert vitkit.load_model(str(tmp_path)).head.out_features == 5


def test_reset_classifier_pool_change_survives_save_load(tmp_path):
    m = tiny("vit_tiny_patch16_224", num_classes=3).eval()
    m.reset_classifier(4, pool="avg")
    x = batch(m)
    m.save_pretrained(tmp_path)
    loaded = vitkit.load_model(str(tmp_path)).eval()
    assert torch.equal(m(x), loaded(x))


def test_reset_classifier_keeps_dtype_and_round_trip_keeps_bf16(tmp_path):
    m = tiny("vit_tiny_patch16_224", num_classes=3).to(torch.bfloat16).eval()
    m.reset_classifier(7)
    x = batch(m).bfloat16()
    assert m(x).shape == (2, 7) and m.head.weight.dtype == torch.bfloat16
    m.save_pretrained(tmp_path)
    loaded = vitkit.load_model(str(tmp_path)).eval()
    assert loaded.head.weight.dtype == torch.bfloat16 and torch.equal(m(x), loaded(x))


def test_empty_layer_requests():
    m = tiny("vit_tiny_patch16_224", num_classes=3).eval()
    y, attns = m(batch(m), return_attention=[])
    assert attns == [] and y.shape == (2, 3)
    with pytest.raises(ValueError, match="selects no block"):
        m.forward_intermediates(batch(m), indices=[])


def test_distilled_requires_token_pool():
    with pytest.raises(ValueError, match="pool must be 'token', got 'avg'"):
        ViTConfig(distilled=True, pool="avg")


def test_saved_files_are_readable_by_others(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        tiny("vit_tiny_patch16_224").save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


def test_save_into_directory_with_other_files_keeps_them(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    tiny("vit_tiny_patch16_224").save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert vitkit.load_model(str(tmp_path)) is not None
