import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.layers import (
    Attention,
    DropPath,
    PatchEmbed,
    capture_attention,
    drop_path_rates,
    resample_pos_embed,
    sincos_2d,
)


def test_patch_embed_is_linear_projection_of_flattened_patches():
    pe = PatchEmbed(4, 3, 8)
    x = torch.randn(2, 3, 8, 12)
    tokens = pe(x)
    assert tokens.shape == (2, 6, 8)
    # Patch (row 1, col 2) -> token 1*3+2, computed by hand.
    patch = x[:, :, 4:8, 8:12].reshape(2, -1)
    expected = patch @ pe.proj.weight.reshape(8, -1).T + pe.proj.bias
    torch.testing.assert_close(tokens[:, 5], expected)


def test_patch_embed_errors_name_sizes():
    pe = PatchEmbed(16)
    with pytest.raises(ValueError, match=r"image width 100 is not a multiple of patch size 16 \(try 96 or 112\)"):
        pe(torch.randn(1, 3, 64, 100))
    with pytest.raises(ValueError, match="expected 3 input channels, got 4"):
        pe(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="expected a batch of images"):
        pe(torch.randn(3, 64, 64))


def test_attention_paths_agree_and_probabilities_are_softmax():
    attn = Attention(32, 4, qk_norm=True).eval()
    x = torch.randn(3, 10, 32)
    fused = attn(x)
    with capture_attention(attn) as rec:
        explicit = attn(x)
    (probs,) = rec.maps
    assert isinstance(fused, torch.Tensor) and attn.capture is None  # plain tensors; the slot is cleared on exit
    assert (fused - explicit).abs().max() <= 1e-5
    # Reference computation, by hand.
    q, k, v = attn.qkv(x).reshape(3, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(probs, ref)


def test_resample_identity_prefix_and_shape():
    pos = torch.randn(1, 2 + 16, 8)
    assert resample_pos_embed(pos, (4, 4), num_prefix_tokens=2) is pos
    out = resample_pos_embed(pos, (6, 3), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 18, 8)
    assert torch.equal(out[:, :2], pos[:, :2])


def test_resample_non_square_grid_and_smooth_signal():
    # A linear ramp along the width stays a ramp after bilinear upsampling of a non-square grid.
    gh, gw = 2, 4
    ramp = torch.arange(gw, dtype=torch.float32).repeat(gh)[None, :, None].expand(1, gh * gw, 3)
    pos = torch.cat([torch.zeros(1, 1, 3), ramp], dim=1)
    out = resample_pos_embed(pos, (4, 8), old_grid=(gh, gw), interpolation="bilinear")
    grid = out[0, 1:, 0].reshape(4, 8)
    assert torch.allclose(grid[0], grid[3])  # constant along height
    assert (grid[0, 1:] >= grid[0, :-1]).all()  # monotone along width


def test_resample_antialiases_when_shrinking():
    # A checkerboard (highest frequency) must average out when shrinking, not alias into a pattern.
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    pos = torch.cat([torch.zeros(1, 1, 1), board.float().reshape(1, 64, 1)], dim=1)
    out = resample_pos_embed(pos, (3, 3), interpolation="bilinear")
    torch.testing.assert_close(out[0, 1:, 0], torch.full((9,), 0.5), atol=0.1, rtol=0)
    plain = F.interpolate(board.float()[None, None], size=(3, 3), mode="bilinear", antialias=False)
    assert (plain - 0.5).abs().max() > 0.15  # without antialiasing it aliases


def test_resample_default_bicubic_antialiases_when_shrinking():
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    pos = torch.cat([torch.zeros(1, 1, 1), board.float().reshape(1, 64, 1)], dim=1)
    out = resample_pos_embed(pos, (3, 3))
    torch.testing.assert_close(out[0, 1:, 0], torch.full((9,), 0.5), atol=0.1, rtol=0)


def test_resample_errors():
    with pytest.raises(ValueError, match="interpolation='cubic' is not allowed"):
        resample_pos_embed(torch.randn(1, 1 + 16, 4), (2, 2), interpolation="cubic")
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4))
    with pytest.raises(ValueError, match=r"old_grid \(3, 5\) does not match the 12 grid entries"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4), old_grid=(3, 5))


def test_sincos_2d_properties():
    table = sincos_2d((3, 5), 16)
    assert table.shape == (15, 16)
    # Same row -> identical row-encoding channels; same column -> identical column channels.
    assert torch.equal(table[0, 8:], table[4, 8:])
    assert torch.equal(table[0, :8], table[5, :8])
    assert not torch.equal(table[0], table[1])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)


def test_drop_path():
    assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    dp = DropPath(0.5)
    x = torch.ones(1000, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y[:, 0] > 0).float().mean()
    assert 0.4 < kept < 0.6 and torch.allclose(y[y > 0], torch.tensor(2.0))
    assert ((y == 0).all(1) | (y == 2).all(1)).all()  # whole samples dropped
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\), got 1.0"):
        DropPath(1.0)
