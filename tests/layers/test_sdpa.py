"""vitkit.layers.attention.scaled_dot_product_attention: the explicit half-precision CPU path equals the fused
kernel (no mask, boolean mask, float bias) and is taken only where it should be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.layers import attention
from vitkit.layers.attention import scaled_dot_product_attention


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach torch's fused kernel."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    return calls


def qkv(dtype, b=2, h=3, n=37, m=37, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, length, d, generator=g).to(dtype) for length in (n, m, m)]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "bias"])
def test_explicit_half_path_equals_the_fused_kernel(mask_kind, fused_calls, native_bf16):
    q, k, v = qkv(torch.bfloat16)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(37, 37, generator=torch.Generator().manual_seed(1)) > 0.5
        mask.fill_diagonal_(True)  # every query keeps a key
    elif mask_kind == "bias":
        mask = torch.randn(2, 1, 1, 37).to(torch.bfloat16)
    with torch.inference_mode():
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        fused = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask if mask is None or
                                               mask.dtype == torch.bool else mask.float())  # fmt: skip
    assert fused_calls == [torch.float32]  # only the reference above reached the fused kernel
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 37, 16)
    torch.testing.assert_close(out.float(), fused, atol=0.06, rtol=0.02)  # bf16 rounding of logits and output


def test_the_fused_kernel_is_kept_for_fp32_gradients_dropout_and_large_matrices(fused_calls, monkeypatch, native_bf16):
    q, k, v = qkv(torch.float32)
    scaled_dot_product_attention(q, k, v)  # fp32
    qb, kb, vb = qkv(torch.bfloat16)
    qb.requires_grad_(True)
    scaled_dot_product_attention(qb, kb, vb)  # autograd needs the fused kernel's backward
    with torch.no_grad():
        scaled_dot_product_attention(qb, kb, vb, dropout_p=0.1)  # dropout
        monkeypatch.setattr(attention, "CPU_HALF_EXPLICIT_MAX_ELEMENTS", 2 * 3 * 37 * 37 - 1)
        scaled_dot_product_attention(qb, kb, vb)  # one element over the limit
        monkeypatch.setattr(attention, "CPU_HALF_EXPLICIT_MAX_ELEMENTS", 2 * 3 * 37 * 37)
        scaled_dot_product_attention(qb, kb, vb)  # at the limit: explicit
    assert fused_calls == [torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16]


def test_a_bf16_vit_gives_the_same_features_either_way(monkeypatch, native_bf16):
    """Whole model: the explicit path's error against fp32 is that of the fused kernel (the linear layers dominate)."""
    import vitkit

    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model.forward_features(x)
        half = model.bfloat16()
        explicit = half.forward_features(x.bfloat16()).float()
        monkeypatch.setattr(attention, "CPU_HALF_EXPLICIT_MAX_ELEMENTS", 0)
        fused = half.forward_features(x.bfloat16()).float()
    err_explicit = ((explicit - ref).norm() / ref.norm()).item()
    err_fused = ((fused - ref).norm() / ref.norm()).item()
    assert err_explicit < 0.02 and err_explicit < 1.5 * err_fused, (err_explicit, err_fused)


def test_explicit_attention_forces_the_three_ops_in_any_dtype(fused_calls):
    q, k, v = qkv(torch.float32)
    q.requires_grad_(True)
    with attention.explicit_attention():
        out = scaled_dot_product_attention(q, k, v)
    assert fused_calls == []
    out.sum().backward()  # the explicit path is differentiable too
    assert q.grad is not None
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert not attention._forced_explicit  # restored on exit


def test_a_cpu_without_native_bf16_keeps_the_fused_kernel(fused_calls, monkeypatch):
    """Without AVX-512-bf16/AMX the three ops would be emulated bf16 matmuls (11x-33x slower than the fused kernel,
    benchmarks/RESULTS.md): bf16 and fp16 go to the fused kernel there (conftest: a CPU without native bf16)."""
    q, k, v = qkv(torch.bfloat16)
    with torch.inference_mode():
        scaled_dot_product_attention(q, k, v)
        scaled_dot_product_attention(*qkv(torch.float16))
        with attention.explicit_attention():  # forcing still works
            scaled_dot_product_attention(q, k, v)
    assert fused_calls == [torch.bfloat16, torch.float16]
    import importlib

    monkeypatch.setattr(importlib.import_module("vitkit.cpu"), "NATIVE_BF16", True)
    with torch.inference_mode():
        scaled_dot_product_attention(q, k, v)  # native bf16: the three ops
        scaled_dot_product_attention(*qkv(torch.float16))  # fp16: fused (not measured faster)
    assert fused_calls == [torch.bfloat16, torch.float16, torch.float16]
