"""Sparse (strided / fixed) attention against dense attention with the pattern mask built by a loop."""

import pytest
import torch

from vitkit.layers import SparseAttention
from vitkit.models import create_model
from vitkit.weights import load_model

ATOL = 1e-10  # float64: the fused masked kernel and the explicit softmax differ only by summation order


def _pattern_mask(pattern, prefix, gh, gw, stride, c=1):
    """The Child et al. patterns, bidirectional, written out one pair at a time (patch index = row-major)."""
    n = prefix + gh * gw
    mask = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            if a < prefix or b < prefix:
                mask[a, b] = True
                continue
            i, j = a - prefix, b - prefix
            if pattern == "strided":
                mask[a, b] = abs(i - j) < stride or (i - j) % stride == 0
            else:
                mask[a, b] = i // stride == j // stride or j % stride >= stride - c
    return mask


def _oracle(q, k, v, mask, scale):
    attn = ((q * scale) @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1)
    return attn @ v, attn


def _qkv(n, b=2, h=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


CASES = [
    ("strided", {}, 7),  # stride None = grid width 7
    ("strided", {"stride": 3}, 3),
    ("fixed", {"stride": 4, "c": 2}, 4),
    ("fixed", {}, 7),
]


@pytest.mark.parametrize("prefix", [1, 3])
@pytest.mark.parametrize(("pattern", "opts", "stride"), CASES)
def test_fast_path_and_capture_equal_the_pattern_oracle(pattern, opts, stride, prefix):
    layer = SparseAttention(12, num_heads=3, pattern=pattern, **opts).double().eval()
    q, k, v = _qkv(prefix + 35)
    mask = _pattern_mask(pattern, prefix, 5, 7, stride, opts.get("c", 1))
    assert not mask.all()  # the pattern really is sparse
    want, want_map = _oracle(q, k, v, mask, layer.scale)
    torch.testing.assert_close(layer.attend(q, k, v, grid=(5, 7)), want, atol=ATOL, rtol=0)
    seen = []
    layer.capture = lambda m, a: seen.append(a)
    torch.testing.assert_close(layer.attend(q, k, v, grid=(5, 7)), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen[0], want_map, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones_like(want_map[..., 0]), atol=ATOL, rtol=0)
    assert (seen[0][..., ~mask] == 0).all()


def test_gradients_pass_gradcheck():
    layer = SparseAttention(4, num_heads=2, pattern="fixed", stride=2).double()
    q, k, v = (t.requires_grad_() for t in _qkv(1 + 6, b=1, h=2, d=2, seed=2))
    assert torch.autograd.gradcheck(lambda q, k, v: layer.attend(q, k, v, grid=(2, 3)), (q, k, v))


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_tiny_vit_runs_and_trains_at_two_sizes(size):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", attn_layer="sparse", attn_args={"pattern": "fixed"}, num_classes=3)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_save_load_round_trip_keeps_the_pattern(tmp_path):
    torch.manual_seed(0)
    args = {"pattern": "fixed", "stride": 5, "c": 2}
    model = create_model("vit_nano_patch4_32", attn_layer="sparse", attn_args=args, num_classes=3).eval()
    model.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m").eval()
    attn = back.blocks[0].attn
    assert (type(attn), attn.pattern, attn.stride, attn.c) == (SparseAttention, "fixed", 5, 2)
    x = torch.randn(1, 3, 24, 40)
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"pattern": "dilated"}, "pattern 'dilated' is not a sparse pattern; choose one of strided, fixed"),
        ({"stride": 0}, "stride 0 must be a positive int"),
        ({"stride": 2.5}, "stride 2.5 must be a positive int"),
        ({"pattern": "fixed", "c": 0}, "c 0 must be a positive int"),
        ({"c": 2}, "c=2 applies only to pattern='fixed'"),
        ({"pattern": "fixed", "stride": 3, "c": 4}, "c 4 must be at most the block length stride=3"),
    ],
)
def test_bad_options_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        create_model("vit_nano_patch4_32", attn_layer="sparse", attn_args=args)


def test_c_wider_than_the_grid_width_is_refused_at_run_time():
    layer = SparseAttention(12, num_heads=3, pattern="fixed", c=3)
    with pytest.raises(ValueError, match="c 3 exceeds the block length 2"):
        layer(torch.randn(1, 1 + 6, 12), grid=(3, 2))
