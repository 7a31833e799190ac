"""Explanations of every registered attention variant (`layer_names("attn")`) in a tiny ViT with a register token,
on a batch of two non-square images.

A variant with `global_attention = True` must hand the capture the (B, heads, N, N) probabilities it actually used:
raw attention, rollout and relevance then work, the maps are row-stochastic, and the layer output recomputed from
the captured map equals the real one. A variant with `global_attention = False` is refused by those methods with
an error naming it. Grad-CAM works for every variant. `test_checks_catch_broken_variants` proves the checks fail
on variants that break the capture contract.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.layers.test_attn_zoo import TEST_OPTIONS, WindowAttention, registered, window_mask
from vitkit.explain import explain, forward_with_attention
from vitkit.layers import capture_attention, get_layer, layer_names
from vitkit.models import create_model

H, W = 24, 40  # a 6 x 10 grid of 4 px patches
MODEL = dict(num_classes=3, depth=2, embed_dim=64, num_heads=4, reg_tokens=1)
N = 2 + (H // 4) * (W // 4)  # class + register + patches
MAP_METHODS = ("attention", "rollout", "relevance")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class NoMapWindow(WindowAttention):
    """The window test variant declaring that it has no N x N map (as local/linear attention may)."""

    global_attention = False


class WrongMap(WindowAttention):
    """Broken: captures the unmasked softmax while computing the output with the window mask."""

    def attend(self, q, k, v, grid=None):
        capture = self.capture
        if capture is not None:
            capture(self, ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        self.capture = None
        try:
            return super().attend(q, k, v, grid)
        finally:
            self.capture = capture


class NeverCaptures(WindowAttention):
    """Broken: claims an N x N map but always takes the fused path, so nothing reaches the capture."""

    def attend(self, q, k, v, grid=None):
        return nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=window_mask(q.shape[2], grid, self.window, q.device)
        )


TEST_VARIANTS = {"_zoo_window": WindowAttention, "_zoo_nomap": NoMapWindow}
BROKEN = {"_zoo_wrongmap": WrongMap, "_zoo_nocapture": NeverCaptures}


@pytest.fixture(scope="module", autouse=True)
def _test_variants():
    added = [n for n in TEST_VARIANTS if n not in TEST_OPTIONS]
    TEST_OPTIONS.update({n: {"window": 4} for n in added})
    try:
        with registered("_zoo_window", WindowAttention), registered("_zoo_nomap", NoMapWindow):
            yield
    finally:
        for n in added:
            del TEST_OPTIONS[n]


def variants(global_attention: bool) -> list[str]:
    names = [n for n in layer_names("attn") if n not in TEST_VARIANTS]
    flagged = [n for n in names if getattr(get_layer("attn", n), "global_attention", False) == global_attention]
    return flagged + [n for n, cls in TEST_VARIANTS.items() if cls.global_attention == global_attention]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", attn_layer=name, attn_args=TEST_OPTIONS.get(name, {}), **MODEL)
    # The 0.02 init gives near-uniform attention, where a wrong map could pass unnoticed: sharpen it.
    for blk in model.blocks:
        nn.init.normal_(blk.attn.qkv.weight, std=0.5)
    return model.eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------
def check_maps(name: str) -> None:
    """Captured maps are (B, heads, N, N), non-negative rows summing to 1, and capturing leaves the output alone."""
    model, x = build(name), images()
    with torch.no_grad():
        fused = model(x)
        with capture_attention(model, True) as rec:
            captured = model(x)
    torch.testing.assert_close(captured, fused, rtol=0, atol=1e-5, msg=f"{name}: capture changes the logits")
    assert len(rec.maps) == len(model.blocks)
    for a in rec.maps:
        assert a.shape == (2, model.blocks[0].attn.num_heads, N, N), f"{name}: map {tuple(a.shape)}"
        assert (a >= 0).all(), f"{name}: negative attention"
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)


def check_map_is_the_one_used(name: str) -> None:
    """Each layer's output equals proj(captured map @ v), v from its own projection: the map is what it used."""
    model, x = build(name), images()
    seen = {}
    hooks = [
        blk.attn.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, blk in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad(), capture_attention(model, True) as rec:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for i, (blk, a) in enumerate(zip(model.blocks, rec.maps)):
        tokens, out = seen[i]
        _, _, v = blk.attn.project_qkv(tokens)  # (B, h, N, d)
        recomputed = blk.attn.project_out(a @ v)
        torch.testing.assert_close(recomputed, out, rtol=0, atol=1e-5, msg=f"{name}: block {i} did not use its map")


def check_map_methods(name: str) -> None:
    """attention, rollout and relevance give finite (B, H, W) maps; relevance's gradients reach the maps."""
    model, x = build(name), images()
    for method in MAP_METHODS:
        m = explain(model, x, method=method)
        assert m.shape == (2, H, W) and torch.isfinite(m).all(), f"{name}: {method} map {tuple(m.shape)}"
        assert explain(model, x, method=method, upsample=False).shape == (2, H // 4, W // 4)
    _, attns, grads, _ = forward_with_attention(model, x, need_grads=True)
    assert all(g.shape == a.shape for a, g in zip(attns, grads)) and any(g.abs().max() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# Registry-parametrised tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", variants(True))
def test_captured_maps_are_row_stochastic(name):
    check_maps(name)


@pytest.mark.parametrize("name", variants(True))
def test_captured_map_is_the_one_used(name):
    check_map_is_the_one_used(name)


@pytest.mark.parametrize("name", variants(True))
def test_attention_rollout_relevance_work(name):
    check_map_methods(name)


@pytest.mark.parametrize("name", variants(False))
@pytest.mark.parametrize("method", (*MAP_METHODS, "grad-rollout", "flow"))
def test_variant_without_a_map_is_refused_by_name(name, method):
    with pytest.raises(
        ValueError, match=rf"attn_layer='{name}' has no N x N map over all tokens; use method='gradcam'"
    ):
        explain(build(name), images(), method=method)


@pytest.mark.parametrize("name", variants(True) + variants(False))
def test_gradcam_works_for_every_variant(name):
    model, x = build(name), images()
    cam = explain(model, x, method="gradcam")
    assert cam.shape == (2, H, W) and torch.isfinite(cam).all() and (cam >= 0).all()
    assert cam.flatten(1).amax(dim=1).gt(0).all(), f"{name}: an all-zero Grad-CAM map"


def test_mha_map_reproduces_the_model_output():
    # The default layer by name, whatever else is registered: its explicit path and the fused kernel agree.
    check_maps("mha")
    check_map_is_the_one_used("mha")


BROKEN_CHECKS = {  # name: (the check that must catch it, what its failure says)
    "_zoo_wrongmap": (check_map_is_the_one_used, r"did not use its map"),
    "_zoo_nocapture": (check_maps, r"no attention was recorded"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_checks_catch_broken_variants(name):
    check, message = BROKEN_CHECKS[name]
    TEST_OPTIONS[name] = {"window": 4}
    try:
        with registered(name, BROKEN[name]), pytest.raises((AssertionError, RuntimeError), match=message):
            check(name)
    finally:
        del TEST_OPTIONS[name]
