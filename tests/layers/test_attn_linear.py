"""Linear attention (elu + 1 kernel) and efficient attention against their formulas written as N x N products."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vitkit.layers import LinearAttention
from vitkit.models import create_model
from vitkit.weights import load_model

ATOL = 1e-10  # float64: the O(N d^2) path and the explicit matrix differ only by summation order
EPS = 1e-6  # the layer's guard in the elu normaliser, part of the formula it computes


def _oracle_map(q, k, kernel):
    """The explicit N x N map of each paper's formula, one query row at a time."""
    rows = []
    for i in range(q.shape[2]):
        if kernel == "elu":
            s = (F.elu(q[:, :, i : i + 1]) + 1) @ (F.elu(k) + 1).transpose(-2, -1)  # (B, h, 1, N)
            rows.append(s / (s.sum(-1, keepdim=True) + EPS))
        else:
            rows.append(q[:, :, i : i + 1].softmax(-1) @ k.softmax(-2).transpose(-2, -1))
    return torch.cat(rows, dim=2)


def _qkv(n, b=2, h=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("prefix", [1, 3])
@pytest.mark.parametrize("kernel", ["elu", "softmax"])
def test_fast_path_and_capture_equal_the_explicit_formula(kernel, prefix):
    layer = LinearAttention(12, num_heads=3, kernel=kernel).double().eval()
    q, k, v = _qkv(prefix + 35)
    want_map = _oracle_map(q, k, kernel)
    want = want_map @ v
    torch.testing.assert_close(layer.attend(q, k, v, grid=(5, 7)), want, atol=ATOL, rtol=0)
    seen = []
    layer.capture = lambda m, a: seen.append(a)
    torch.testing.assert_close(layer.attend(q, k, v, grid=(5, 7)), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen[0], want_map, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones_like(want_map[..., 0]), atol=1e-7, rtol=0)  # eps
    assert (seen[0] > 0).all()  # every query, prefix or patch, attends every token


@pytest.mark.parametrize("kernel", ["elu", "softmax"])
def test_gradients_pass_gradcheck(kernel):
    layer = LinearAttention(4, num_heads=2, kernel=kernel).double()
    q, k, v = (t.requires_grad_() for t in _qkv(7, b=1, h=2, d=2, seed=2))
    assert torch.autograd.gradcheck(lambda q, k, v: layer.attend(q, k, v), (q, k, v))


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


@pytest.mark.parametrize("kernel", ["elu", "softmax"])
def test_fast_path_forms_no_n_by_n_tensor(kernel):
    layer = LinearAttention(8, num_heads=2, kernel=kernel)
    x = torch.randn(1, 1 + 2048, 8, requires_grad=True)
    with _LargestTensor() as spy:
        layer(x, grid=(32, 64)).sum().backward()
    assert spy.numel <= 3 * 2049 * 8  # the qkv projection output is the largest; an N x N map would be 4.2M


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    layer = LinearAttention(16, num_heads=2).eval()
    x = torch.randn(2, 257, 16)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)  # bf16 has 8 mantissa bits


def test_forward_queries_uses_the_linear_kernel():
    torch.manual_seed(0)
    layer = LinearAttention(12, num_heads=3).eval()
    x = torch.randn(2, 1 + 35, 12)
    torch.testing.assert_close(layer.forward_queries(x, 2), layer(x)[:, :2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_tiny_vit_runs_and_trains_at_two_sizes(size):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", attn_layer="linear", num_classes=3)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_save_load_round_trip_keeps_the_kernel(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", attn_layer="linear", attn_args={"kernel": "softmax"}, num_classes=3)
    model.eval().save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m").eval()
    assert (type(back.blocks[0].attn), back.blocks[0].attn.kernel) == (LinearAttention, "softmax")
    x = torch.randn(1, 3, 24, 40)
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"kernel 'relu' is not a linear-attention kernel; choose one of elu, softmax"):
        create_model("vit_nano_patch4_32", attn_layer="linear", attn_args={"kernel": "relu"})
    with pytest.raises(ValueError, match=r"attn_drop 0.1 cannot apply to linear attention"):
        create_model("vit_nano_patch4_32", attn_layer="linear", attn_drop_rate=0.1)
