"""Every registered attention variant (`layer_names("attn")`) inside a tiny ViT: shapes at a square and a non-square
size, finite outputs, gradients into every attention parameter, save/load round trip, train and eval mode.

The checks are plain functions (`check_*`) so that `test_harness_catches_broken_variants` can prove each of them
fails on a variant that is broken in the way it guards against. Per-variant ORACLE tests (same output as masked
dense attention ...) live beside each variant's own tests; this file only checks what every variant must honour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import yaml
from torch import nn

from vitkit.layers import Attention, get_layer, layer_names, register_layer
from vitkit.layers.attention import split_tokens
from vitkit.layers.create import _TABLE
from vitkit.models import create_model
from vitkit.models.vit import ViTConfig
from vitkit.weights import load_model, save_pretrained

# A 2-block ViT-nano with one register token (prefix = class + register), so prefix handling is always exercised.
ZOO_MODEL = dict(num_classes=3, depth=2, embed_dim=64, num_heads=4, reg_tokens=1)
# 32 x 32 -> an 8 x 8 grid; 24 x 40 -> 6 x 10, so rows and columns cannot be confused.
SIZES = [(32, 32), (24, 40)]
# Options a variant needs to fit these grids (e.g. {"window": 4}); a variant without an entry is built with its
# defaults, and `test_every_variant_builds_with_its_test_options` says when those do not fit.
TEST_OPTIONS: dict[str, dict] = {"_zoo_window": {"window": 4}}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the shared cores are oversubscribed by parallel test jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# A small variant registered only inside these tests: masked-dense window attention (a correct variant), and
# variants broken in one way each, to prove that the checks below catch what they guard against.
# ---------------------------------------------------------------------------------------------------------------
def window_mask(n_tokens: int, grid: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """(N, N) bool: patch tokens see the patches of their own window (non-overlapping, last one cut short at the
    edge) and every prefix token; prefix tokens see everything."""
    prefix = split_tokens(n_tokens, grid, "_zoo_window")
    gh, gw = grid
    rows = torch.arange(gh, device=device).repeat_interleave(gw) // window  # (H'*W',) window row of each patch
    cols = torch.arange(gw, device=device).repeat(gh) // window
    same = (rows[:, None] == rows[None, :]) & (cols[:, None] == cols[None, :])  # (H'W', H'W')
    mask = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device)
    mask[prefix:, prefix:] = same
    return mask


class WindowAttention(Attention):
    """Non-overlapping window attention as dense attention with a block mask; prefix tokens attend globally."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False, attn_drop=0.0, proj_drop=0.0,
                 norm_layer=nn.LayerNorm, window: int = 7):  # fmt: skip
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        self.window = window

    def attend(self, q, k, v, grid=None):
        return self.masked_attend(q, k, v, window_mask(q.shape[2], grid, self.window, q.device))


class SquareOnly(WindowAttention):
    """Broken: lays the patch tokens out on a square grid (sqrt of the patch count), as a positional variant that
    ignores `grid` would; fails on any non-square input."""

    def attend(self, q, k, v, grid=None):
        B, h, N, d = v.shape
        prefix = split_tokens(N, grid, "_zoo_square")
        side = math.isqrt(N - prefix)
        v_grid = v[:, :, prefix:].reshape(B, h, side, side, d)  # (B, h, side, side, d)
        v = torch.cat([v[:, :, :prefix], v_grid.flatten(2, 3)], dim=2)
        return super().attend(q, k, v, grid)


class DeadParameter(WindowAttention):
    """Broken: a learned bias that never reaches the output."""

    def __init__(self, dim, num_heads, window: int = 7, **kw):
        super().__init__(dim, num_heads, window=window, **kw)
        self.bias_table = nn.Parameter(torch.zeros(4))


class UnsavedState(WindowAttention):
    """Broken: a random temperature kept out of the state dict, so a loaded copy computes something else."""

    def __init__(self, dim, num_heads, window: int = 7, **kw):
        super().__init__(dim, num_heads, window=window, **kw)
        self.register_buffer("temperature", 1.0 + torch.rand(()), persistent=False)

    def attend(self, q, k, v, grid=None):
        return super().attend(q * self.temperature, k, v, grid)


class NonFinite(WindowAttention):
    """Broken: divides by a normaliser that is zero (as a kernelised variant with an unguarded denominator would)."""

    def attend(self, q, k, v, grid=None):
        return super().attend(q, k, v, grid) / v.sum(dim=-1, keepdim=True).detach().mul(0)


class StaleMask(WindowAttention):
    """Broken: caches the mask of the first grid it sees and reuses it for every later input size."""

    def attend(self, q, k, v, grid=None):
        if not hasattr(self, "_mask"):
            self._mask = window_mask(q.shape[2], grid, self.window, q.device)
        return self.masked_attend(q, k, v, self._mask)


@contextmanager
def registered(name: str, cls) -> Iterator[str]:
    """Register `cls` as attn_layer `name` for the duration (the table is global: always cleaned up)."""
    register_layer("attn", name, cls)
    try:
        yield name
    finally:
        del _TABLE["attn"][name]


@pytest.fixture(scope="module", autouse=True)
def _window_variant():
    """The correct test variant is part of the registry for this module's parametrised tests."""
    with registered("_zoo_window", WindowAttention):
        yield


def variants() -> list[str]:
    # Collected at import time: what is registered by vitkit itself plus the test window variant.
    names = layer_names("attn")
    return names + ([] if "_zoo_window" in names else ["_zoo_window"])


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------
def build(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_nano_patch4_32", attn_layer=name, attn_args=TEST_OPTIONS.get(name, {}), **ZOO_MODEL, **kw)


def check_forward(name: str) -> None:
    """Logits (B, classes) and finite at both sizes, in train mode (attention dropout on) and in eval mode."""
    try:
        model = build(name, attn_drop_rate=0.1)
    except ValueError as e:  # a variant with no attention probabilities (linear) refuses attention dropout by name
        assert "attn_drop" in str(e), f"{name}: {e}"
        model = build(name, drop_rate=0.1)
    for mode in (True, False):
        model.train(mode)
        for h, w in SIZES:
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 3), f"{name}: logits {tuple(out.shape)} at {h}x{w} (training={mode})"
            assert torch.isfinite(out).all(), f"{name}: non-finite logits at {h}x{w} (training={mode})"


def check_gradients(name: str) -> None:
    """Every parameter of every block's attention gets a gradient that is not all zero (non-square input)."""
    model = build(name).train()
    # A loss on every output token (not the logits): with class-token pooling only the class token of the last block
    # reaches the head, and a variant may rightly give prefix queries none of its parameters (relpos_decomposed).
    x = torch.randn(2, 3, *SIZES[1])
    model.forward_features(x).square().mean().backward()
    for i, blk in enumerate(model.blocks):
        for pname, p in blk.attn.named_parameters():
            assert p.grad is not None, f"{name}: blocks.{i}.attn.{pname} got no gradient"
            assert p.grad.abs().max() > 0, f"{name}: blocks.{i}.attn.{pname} got an all-zero gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: blocks.{i}.attn.{pname} got a non-finite gradient"


def check_round_trip(name: str, tmp_path) -> None:
    """save_pretrained / load_model give the same logits, and config.json names the variant and its options."""
    model = build(name).eval()
    save_pretrained(model, tmp_path / name)
    arch = json.loads((tmp_path / name / "config.json").read_text())["architecture"]
    # The options given, plus any the model fills in for itself (a relative-position table's grid_size).
    assert arch["attn_layer"] == name and arch["attn_args"] == model.cfg.attn_args
    assert TEST_OPTIONS.get(name, {}).items() <= arch["attn_args"].items()
    torch.manual_seed(1)  # a different seed: anything not restored from the file comes out different
    loaded = load_model(tmp_path / name).eval()
    assert type(loaded.blocks[0].attn) is type(model.blocks[0].attn)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6, msg=f"{name}: logits differ at {h}x{w}")


# ---------------------------------------------------------------------------------------------------------------
# Registry-parametrised tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", variants())
def test_every_variant_builds_with_its_test_options(name):
    try:
        model = build(name)
    except Exception as e:  # noqa: BLE001 - any failure means the table needs an entry
        hint = "" if name in TEST_OPTIONS else " with its defaults; add its options to TEST_OPTIONS in this file"
        pytest.fail(f"attn_layer={name!r} cannot build a ViT with an 8x8 patch grid{hint}: {e}")
    assert all(blk.attn.__class__ is model.blocks[0].attn.__class__ for blk in model.blocks)


@pytest.mark.parametrize("name", variants())
def test_shapes_finite_train_and_eval(name):
    check_forward(name)


@pytest.mark.parametrize("name", variants())
def test_gradients_reach_every_attention_parameter(name):
    check_gradients(name)


@pytest.mark.parametrize("name", variants())
def test_save_load_round_trip(name, tmp_path):
    check_round_trip(name, tmp_path)


@pytest.mark.parametrize("name", variants())
def test_state_dict_keeps_the_plain_attention_keys(name):
    # A variant adds its own parameters but keeps qkv/proj, so plain-attention weights load into it.
    keys = set(build(name).blocks[0].attn.state_dict())
    assert set(build("mha").blocks[0].attn.state_dict()) <= keys


@pytest.mark.parametrize("name", variants())
def test_variant_without_a_grid_is_refused_or_ignores_it(name):
    # Called outside a model without grid=: global attention does not need it; a positional variant must say so.
    attn = build(name).blocks[0].attn.eval()
    x = torch.randn(1, 65, 64)
    try:
        out = attn(x)
    except ValueError as e:
        assert "grid" in str(e)
    else:
        assert out.shape == x.shape


BROKEN = {  # name: (class, the check that must catch it, what its failure says)
    "_zoo_square": (SquareOnly, check_forward, r"shape .* is invalid"),
    "_zoo_nonfinite": (NonFinite, check_forward, r"non-finite logits"),
    "_zoo_stale": (StaleMask, check_forward, r"must match the size"),
    "_zoo_dead": (DeadParameter, check_gradients, r"attn\.bias_table got no gradient"),
    "_zoo_unsaved": (UnsavedState, check_round_trip, r"logits differ"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_harness_catches_broken_variants(name, tmp_path):
    cls, check, message = BROKEN[name]
    TEST_OPTIONS[name] = {"window": 4}
    try:
        with registered(name, cls), pytest.raises((AssertionError, RuntimeError), match=message):
            check(name, tmp_path) if check is check_round_trip else check(name)
    finally:
        del TEST_OPTIONS[name]


def test_harness_passes_the_correct_window_variant_against_its_mask():
    # The reference the broken variants are measured against: the test variant itself equals dense attention with
    # the block mask written out by hand for a 1-prefix 2x3 grid with window 2.
    mask = window_mask(7, (2, 3), 2)
    expect = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1],
         [1, 1, 1, 0, 1, 1, 0],
         [1, 1, 1, 0, 1, 1, 0],
         [1, 0, 0, 1, 0, 0, 1],
         [1, 1, 1, 0, 1, 1, 0],
         [1, 1, 1, 0, 1, 1, 0],
         [1, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(mask, expect)


def test_window_option_values_are_checked():
    with pytest.raises(ValueError, match=r"window must be a positive integer, got 0"):
        create_model("vit_nano_patch4_32", attn_layer="_zoo_window", attn_args={"window": 0}, **ZOO_MODEL)


# ---------------------------------------------------------------------------------------------------------------
# The default is unchanged
# ---------------------------------------------------------------------------------------------------------------
def test_default_is_mha_and_builds_plain_attention(tmp_path):
    assert ViTConfig().attn_layer == "mha" and ViTConfig().attn_args == {}
    assert layer_names("attn")[0] == "mha"
    model = create_model("vit_nano_patch4_32", num_classes=3, depth=2).eval()
    assert all(type(blk.attn) is Attention for blk in model.blocks)
    assert set(model.blocks[0].attn.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    save_pretrained(model, tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]
    assert (arch["attn_layer"], arch["attn_args"]) == ("mha", {})


# ---------------------------------------------------------------------------------------------------------------
# `vitkit train --attn-layer NAME` end to end, for one variant (a real one once registered, else the test one)
# ---------------------------------------------------------------------------------------------------------------
def test_train_cli_records_the_variant(tmp_path):
    from vitkit.cli import main

    name = next((n for n in ("local", "linear", "axial") if n in layer_names("attn")), "_zoo_window")
    args = TEST_OPTIONS.get(name, {})
    out = tmp_path / "run"
    argv = ["train", "--data", "shapes:32", "--set", "shapes_size=32", "--model", "vit_nano_patch4_32",
            "--set", "model_args={depth: 1, embed_dim: 32, num_heads: 2}", "--img-size", "32",
            "--attn-layer", name, "--attn-args", json.dumps(args), "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model_args"] == {"depth": 1, "embed_dim": 32, "num_heads": 2, "attn_layer": name, "attn_args": args}
    arch = json.loads((out / "best" / "config.json").read_text())["architecture"]
    assert (arch["attn_layer"], arch["attn_args"], arch["depth"]) == (name, args, 1)
    model = load_model(out / "best")
    assert all(type(blk.attn) is get_layer("attn", name) for blk in model.blocks)
