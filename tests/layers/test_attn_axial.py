"""Axial attention against the masked dense oracle (one softmax per axis), its map, gradients and a tiny ViT."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitkit.layers import AxialAttention
from vitkit.models import create_model
from vitkit.weights import load_model

ATOL = 1e-10  # float64 throughout: the fused and explicit paths differ only by summation order


def _axis_masks(prefix, gh, gw):
    """Row and column masks built entry by entry (independent of the layer's vectorised `axial_masks`)."""
    n = prefix + gh * gw
    row, col = torch.zeros(n, n, dtype=torch.bool), torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < prefix:
                row[i, j] = True  # a prefix query attends everything in the row step ...
                col[i, j] = i == j  # ... and keeps its result in the column step
                continue
            ri, ci = divmod(i - prefix, gw)
            if j < prefix:
                row[i, j] = col[i, j] = True
            else:
                rj, cj = divmod(j - prefix, gw)
                row[i, j], col[i, j] = ri == rj, ci == cj
    return row, col


def _oracle(q, k, v, prefix, grid, scale):
    row, col = _axis_masks(prefix, *grid)
    logits = (q * scale) @ k.transpose(-2, -1)
    a_row = logits.masked_fill(~row, float("-inf")).softmax(-1)
    a_col = logits.masked_fill(~col, float("-inf")).softmax(-1)
    return a_col @ (a_row @ v), a_col @ a_row


def _qkv(prefix, grid, b=2, h=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_fast_path_equals_the_masked_dense_oracle_on_a_non_square_grid(prefix):
    layer = AxialAttention(12, num_heads=3).double().eval()
    q, k, v = _qkv(prefix, (5, 7))
    want, _ = _oracle(q, k, v, prefix, (5, 7), layer.scale)
    got = layer.attend(q, k, v, grid=(5, 7))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # a prefix query's output is plain global attention
    if prefix:
        glob = ((q * layer.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        torch.testing.assert_close(got[:, :, :prefix], glob[:, :, :prefix], atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefix", [1, 3])
def test_capture_map_is_the_product_of_the_axis_maps_and_gives_the_output(prefix):
    layer = AxialAttention(12, num_heads=3).double().eval()
    q, k, v = _qkv(prefix, (5, 7), seed=1)
    want_out, want_map = _oracle(q, k, v, prefix, (5, 7), layer.scale)
    seen = []
    layer.capture = lambda m, a: seen.append(a)
    got = layer.attend(q, k, v, grid=(5, 7))
    (attn,) = seen
    torch.testing.assert_close(attn, want_map, atol=ATOL, rtol=0)
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn[..., 0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(got, want_out, atol=ATOL, rtol=0)
    assert (attn[..., prefix:, prefix:] > 0).all()  # two axial steps connect every patch pair


def test_gradients_pass_gradcheck():
    layer = AxialAttention(4, num_heads=2).double()
    q, k, v = (t.requires_grad_() for t in _qkv(1, (2, 3), b=1, h=2, d=2, seed=2))
    assert torch.autograd.gradcheck(lambda q, k, v: layer.attend(q, k, v, grid=(2, 3)), (q, k, v))


def test_capture_path_carries_gradients_to_the_map():
    layer = AxialAttention(4, num_heads=2).double()
    q, k, v = (t.requires_grad_() for t in _qkv(1, (2, 3), b=1, h=2, d=2, seed=3))
    maps = []
    layer.capture = lambda m, a: (a.retain_grad(), maps.append(a))
    layer.attend(q, k, v, grid=(2, 3)).sum().backward()
    torch.testing.assert_close(maps[0].grad, v.sum(-1).unsqueeze(-2).expand_as(maps[0]).detach())


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_fast_path_forms_no_n_by_n_tensor():
    layer = AxialAttention(8, num_heads=2)
    x = torch.randn(1, 1 + 32 * 64, 8, requires_grad=True)
    with _LargestTensor() as spy:
        layer(x, grid=(32, 64)).sum().backward()
    # at most one (P + W') score row per patch and head (266k); an N x N map would be 2049^2 = 4.2M
    assert spy.numel <= 2 * 2048 * (1 + 64)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_tiny_vit_runs_and_trains_at_two_sizes(size):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", attn_layer="axial", num_classes=3)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_save_load_round_trip_keeps_the_variant(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", attn_layer="axial", num_classes=3, reg_tokens=2).eval()
    model.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m").eval()
    assert type(back.blocks[0].attn) is AxialAttention
    x = torch.randn(1, 3, 24, 40)
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_grid_is_required():
    layer = AxialAttention(12, num_heads=3)
    with pytest.raises(ValueError, match="needs grid"):
        layer(torch.randn(1, 36, 12))
    with pytest.raises(ValueError, match=r"grid \(6, 7\) does not fit"):
        layer(torch.randn(1, 36, 12), grid=(6, 7))
    with pytest.raises(ValueError, match=r"'window'.*'axial' takes no options"):
        create_model("vit_nano_patch4_32", attn_layer="axial", attn_args={"window": 3})
