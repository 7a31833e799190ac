"""FlexiViT (issue 9): the patch size changed at run time and at load time, the kernel PI-resized."""

import json

import pytest
import torch

from vitkit.layers import bilinear_resize_matrix, pi_resize_kernel, pi_resize_matrix, resample_pos_embed
from vitkit.models import create_model
from vitkit.weights import load_model

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=3, patch_size=8, img_size=32)


def _model(**kw):
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", **{**TINY, **kw}).eval()


@pytest.mark.parametrize(("p0", "p"), [(4, 4), (4, 6), (4, 8), (8, 12), (8, 16), (3, 7), (2, 16)])
def test_pi_resize_keeps_the_token_of_every_upsampled_patch(p0, p):
    torch.manual_seed(0)
    B = bilinear_resize_matrix(p0, p)  # (p*p, p0*p0): x' = B x
    M = pi_resize_matrix(p0, p)  # w' = M w
    x = torch.randn(p0 * p0, 20, dtype=torch.float64)  # 20 patches
    w = torch.randn(5, p0 * p0, dtype=torch.float64)  # 5 output channels
    torch.testing.assert_close(w @ M.T @ (B @ x), w @ x, rtol=1e-9, atol=1e-9)  # <B x, w'> = <x, w>


@pytest.mark.parametrize(("p0", "p"), [(8, 4), (8, 6), (6, 4)])
def test_pi_resize_down_is_the_least_squares_kernel(p0, p):
    B = bilinear_resize_matrix(p0, p)  # (p*p, p0*p0)
    w = torch.randn(p0 * p0, 3, dtype=torch.float64)
    want = torch.linalg.lstsq(B.T, w, driver="gelsd").solution  # argmin ||B^T w' - w|| (minimum norm)
    torch.testing.assert_close(pi_resize_matrix(p0, p) @ w, want, rtol=1e-8, atol=1e-8)


def test_the_model_gives_the_same_tokens_for_an_image_of_upsampled_patches():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    want = model.patch_embed(x)  # at 8
    B = bilinear_resize_matrix(8, 16).float()  # (256, 64)
    patches = x.reshape(2, 3, 4, 8, 4, 8).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 4, 4, 64)  # (B, C, 4, 4, 64)
    big = (patches @ B.T).reshape(2, 3, 4, 4, 16, 16).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 64, 64)
    model.set_patch_size(16)
    torch.testing.assert_close(model.patch_embed(big), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [2, 4, 8, 16, 32])
def test_shapes_at_several_patch_sizes(p):
    model = _model()
    model.set_patch_size(p)
    assert model.patch_size == p and model.cfg.patch_size == 8  # the trained kernel's size stays in the config
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1 + (32 // p) ** 2, 32)
        out = model(torch.randn(2, 3, 32, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert model.patch_grid(32, 64) == (32 // p, 64 // p)
    assert model.feature_info[0]["reduction"] == p
    assert model.patch_embed.proj.weight.shape == (32, 3, 8, 8)


def test_back_to_the_trained_size_is_exact():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    kernel = model.patch_embed.proj.weight.detach().clone()
    with torch.no_grad():
        before = model(x)
        for p in (4, 16, 2, 8):
            model.set_patch_size(p)
            model(x)
        after = model(x)
    assert torch.equal(before, after) and torch.equal(model.patch_embed.proj.weight, kernel)
    assert model.cfg.run_patch_size is None


def test_the_position_table_is_resampled_to_the_new_grid():
    model = _model()
    model.set_patch_size(4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = torch.cat([model.cls_token, model.patch_embed(x)], dim=1)  # (1, 1 + 64, D)
        want = tokens + resample_pos_embed(model.pos_embed, (8, 8), (4, 4), 1)
        torch.testing.assert_close(model.embed(x), want)
        kernel = pi_resize_kernel(model.patch_embed.proj.weight, 4)
        direct = torch.nn.functional.conv2d(x, kernel, model.patch_embed.proj.bias, stride=4)  # (1, D, 8, 8)
        torch.testing.assert_close(model.patch_embed(x), direct.flatten(2).transpose(1, 2))


def test_training_at_a_new_size_updates_the_trained_kernel():
    model = _model().train()
    model.set_patch_size(16)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    grad = model.patch_embed.proj.weight.grad
    assert grad is not None and grad.shape == (32, 3, 8, 8) and grad.abs().sum() > 0


def test_save_and_load_keep_the_run_patch_size(tmp_path):
    model = _model()
    model.set_patch_size(4)
    x = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]
    assert (arch["patch_size"], arch["run_patch_size"]) == (8, 4)
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.patch_size == 4 and loaded.patch_embed.proj.weight.shape == (32, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        # load time: another patch size, or back to the trained one
        at16 = load_model(tmp_path / "m", patch_size=16).eval()
        model.set_patch_size(16)
        torch.testing.assert_close(at16(x), model(x), rtol=0, atol=0)
        assert load_model(tmp_path / "m", patch_size=8).patch_size == 8
    # a config override does the same
    assert _model(run_patch_size=16).patch_size == 16 and _model(run_patch_size=8).cfg.run_patch_size is None


@pytest.mark.parametrize(
    ("p", "err", "match"),
    [
        (0, ValueError, "patch size must be >= 1, got 0"),
        (-4, ValueError, "patch size must be >= 1, got -4"),
        (5, ValueError, r"patch size 5 does not divide the image height 32 .*\[1, 2, 4, 8, 16, 32\]"),
        (64, ValueError, "patch size 64 does not divide the image height 32"),
        (2.0, TypeError, "patch size must be an int, got 2.0"),
        (True, TypeError, "patch size must be an int, got True"),
    ],
)
def test_bad_patch_sizes_are_refused_by_name(p, err, match, tmp_path):
    model = _model()
    with pytest.raises(err, match=match):
        model.set_patch_size(p)
    assert model.patch_size == 8
    with pytest.raises(err, match=match):
        _model(run_patch_size=p)


def test_only_the_plain_patch_embedding_changes_its_patch_size(tmp_path):
    for embed in ("overlap", "conv_stem"):
        model = _model(embed_layer=embed)
        with pytest.raises(ValueError, match=f"only for embed_layer='patch', not '{embed}'"):
            model.set_patch_size(4)
    _model().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="patch size 5 does not divide"):
        load_model(tmp_path / "m", patch_size=5)


def test_explain_follows_the_patch_size():
    from vitkit.explain import explain

    model = _model()
    model.set_patch_size(16)
    for method in ("rollout", "gradcam", "relevance"):
        maps = explain(model, torch.randn(1, 3, 32, 64), method=method, upsample=False)
        assert maps.shape == (1, 2, 4) and torch.isfinite(maps).all(), method
