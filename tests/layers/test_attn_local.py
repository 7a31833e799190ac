"""Local attention (`local`, window and neighbourhood modes) against dense attention with a mask built by loops.

Tolerance: atol 1e-5 in float32 (the per-window kernel and the dense masked softmax differ by summation order).
"""

import pytest
import torch

from vitkit.explain import explain
from vitkit.layers import LocalAttention
from vitkit.layers.attn_local import local_mask
from vitkit.models import create_model
from vitkit.weights import load_model, save_pretrained

ATOL = 1e-5


def qkv(prefix, grid, heads=2, d=4, batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    return [torch.randn(batch, heads, n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def mask_loop(grid, prefix, window, mode):
    """Who may attend whom, one (query, key) pair at a time."""
    gh, gw = grid
    kh, kw = min(window, gh), min(window, gw)
    n = prefix + gh * gw
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < prefix or j < prefix:
                mask[i, j] = True
                continue
            (hi, wi), (hj, wj) = divmod(i - prefix, gw), divmod(j - prefix, gw)
            if mode == "window":
                mask[i, j] = hi // kh == hj // kh and wi // kw == wj // kw
            else:
                sh = min(max(hi - kh // 2, 0), gh - kh)
                sw = min(max(wi - kw // 2, 0), gw - kw)
                mask[i, j] = sh <= hj < sh + kh and sw <= wj < sw + kw
    return mask


def reference(q, k, v, mask):
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    attn = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return attn @ v, attn


CASES = [  # (grid, window, mode): non-square; window not dividing; window larger than a side; dividing
    ((5, 7), 3, "window"),
    ((5, 7), 2, "window"),
    ((5, 7), 6, "window"),
    ((6, 6), 3, "window"),
    ((5, 7), 3, "neighborhood"),
    ((6, 9), 5, "neighborhood"),
    ((3, 8), 5, "neighborhood"),
]


@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize(("grid", "window", "mode"), CASES)
def test_local_matches_dense_attention_with_the_loop_built_mask(grid, window, mode, prefix):
    layer = LocalAttention(8, num_heads=2, window=window, mode=mode)
    mask = mask_loop(grid, prefix, window, mode)
    assert torch.equal(local_mask(grid, prefix, window, mode), mask)
    q, k, v = qkv(prefix, grid)
    ref, ref_attn = reference(q, k, v, mask)
    torch.testing.assert_close(layer.attend(q, k, v, grid), ref, atol=ATOL, rtol=0)
    maps = []
    layer.capture = lambda module, attn: maps.append(attn)
    torch.testing.assert_close(layer.attend(q, k, v, grid), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(maps[0], ref_attn, atol=ATOL, rtol=0)
    assert (maps[0][..., ~mask] == 0).all()


def test_neighbourhoods_have_the_same_size_everywhere_and_shift_at_borders():
    mask = local_mask((6, 9), 0, 5, "neighborhood")
    assert (mask.sum(1) == 25).all()
    corner = mask[0].view(6, 9)  # patch (0, 0): rows 0-4, columns 0-4, not centred
    assert corner[:5, :5].all() and corner.sum() == 25
    window = local_mask((5, 7), 1, 3, "window")
    # Window mode with padding: the last row of windows holds 2 real rows (5 = 3 + 2), the last column 1 (7 = 3+3+1).
    assert window[1:, 1:].sum(1).view(5, 7)[4, 6] == 2 * 1


@pytest.mark.parametrize("mode", ["window", "neighborhood"])
def test_gradcheck_float64(mode):
    grid, prefix = (3, 4), 1
    layer = LocalAttention(4, num_heads=1, window=3 if mode == "neighborhood" else 2, mode=mode).double()
    q, k, v = qkv(prefix, grid, heads=1, d=2, batch=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: layer.attend(q, k, v, grid), (q, k, v))


def test_window_gradients_match_the_oracle():
    grid, prefix = (5, 7), 3
    layer = LocalAttention(8, num_heads=2, window=3)
    q, k, v = qkv(prefix, grid)
    g = torch.randn(2, 2, prefix + 35, 4)
    grads = torch.autograd.grad((layer.attend(q, k, v, grid) * g).sum(), [q, k, v])
    ref, _ = reference(q, k, v, mask_loop(grid, prefix, 3, "window"))
    for got, want in zip(grads, torch.autograd.grad((ref * g).sum(), [q, k, v])):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_window_path_never_builds_an_n_by_n_tensor(monkeypatch):
    """The window form is linear in N: it must not reach the dense mask or the masked path."""
    layer = LocalAttention(8, num_heads=2, window=4)
    q, k, v = qkv(2, (16, 12))
    monkeypatch.setattr(layer, "dense_mask", lambda *a: pytest.fail("window mode built the dense mask"))
    monkeypatch.setattr(layer, "masked_attend", lambda *a: pytest.fail("window mode took the dense path"))
    assert layer.attend(q, k, v, (16, 12)).shape == q.shape


@pytest.mark.parametrize("args", [{"window": 3}, {"window": 3, "mode": "neighborhood"}])
def test_tiny_vit_runs_at_two_sizes_trains_and_round_trips(args, tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", attn_layer="local", attn_args=args, num_classes=3, reg_tokens=1, depth=2)
    for size in [(32, 32), (24, 40)]:
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        out.square().sum().backward()
        assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
        model.zero_grad()
        grid = (size[0] // 4, size[1] // 4)
        _, maps = model.eval()(x, return_attention=[0])
        model.train()
        mask = mask_loop(grid, 2, 3, args.get("mode", "window"))
        assert maps[0].shape[-1] == mask.shape[0]
        assert (maps[0][..., ~mask] == 0).all() and (maps[0][..., mask] > 0).all()
    model.eval()
    # Relevance needs gradients through the captured maps: they must be the probabilities the layer used.
    relevance = explain(model, torch.randn(1, 3, 24, 40), method="relevance", upsample=False)
    assert relevance.shape == (1, 6, 10) and torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    save_pretrained(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.cfg.attn_layer == "local" and loaded.cfg.attn_args == args
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"window": 0}, "window=0"),
        ({"window": 2.5}, "window=2.5"),
        ({"window": True}, "window=True"),
        ({"window": 4, "mode": "neighborhood"}, "window=4 is even.*try 3 or 5"),
        ({"mode": "neighbourhood"}, "mode='neighbourhood'.*'window', 'neighborhood'"),
    ],
)
def test_bad_options_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        create_model("vit_nano_patch4_32", attn_layer="local", attn_args=args)
