"""Multi-head self-attention: the fused kernel for normal use (three plain ops for bf16 inference on CPUs with
native bf16, where they are faster), an explicit path while a map is captured."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.cpu import has_native_bf16
from vitkit.layers.linear import Linear, linear

# Receives (module, probabilities (B, heads, N, N)) while `vitkit.layers.capture_attention` is active.
CaptureFn = Callable[[nn.Module, torch.Tensor], None]


# bf16 attention on a CPU with native bf16 (`vitkit.cpu.has_native_bf16`: AVX-512-bf16 or AMX): below this many
# attention-matrix elements (batch x heads x queries x keys; 2**24 is 32 MB in bf16) and without autograd,
# `scaled_dot_product_attention` computes softmax(q k^T / sqrt(d)) v in three plain ops instead of PyTorch's fused
# CPU kernel. On an AVX-512-bf16 EPYC that kernel ran bf16 attention 1.6x-2.4x slower than the three ops at ViT sizes
# (49-785 tokens), and whole ViT-S/B bf16 models 1.09x-1.14x faster with the three ops, with the same error against
# fp32 (benchmarks/RESULTS.md, "bf16 attention on CPU"); at 10^8 elements the fused kernel was faster (0.81x). On a
# CPU without native bf16 the three ops are emulated bf16 matmuls, 11x-33x slower than the fused kernel (an AVX2
# EPYC, same section), so such CPUs always take the fused kernel; so do fp32 (equal or faster there) and fp16 (not
# measured). Set to 0 to always use the fused kernel.
CPU_HALF_EXPLICIT_MAX_ELEMENTS = 2**24

_forced_explicit = False  # set by `explicit_attention()`


@contextlib.contextmanager
def explicit_attention() -> Iterator[None]:
    """Within the block, `scaled_dot_product_attention` always computes the three explicit ops, whatever the device,
    dtype or autograd state, and also while exporting. For graphs captured in fp32 that run in bf16 later: the int8
    PT2E graph with mixed bf16 (`vitkit.deploy.quantize(..., mixed_bf16=True)`) is exported with it, so that its
    attention runs as bf16 matmuls rather than the fused CPU kernel (1.2x-1.3x faster int8 models measured,
    benchmarks/RESULTS.md). Not thread-safe: it sets a module-wide switch."""
    global _forced_explicit
    before, _forced_explicit = _forced_explicit, True
    try:
        yield
    finally:
        _forced_explicit = before


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)` with the default scale 1/sqrt(d), computed
    by whichever is faster where it runs: the fused kernel, or (bf16 on a CPU with native bf16, no autograd, no
    dropout, an attention matrix of at most `CPU_HALF_EXPLICIT_MAX_ELEMENTS` elements, or inside
    `explicit_attention()`) softmax(q k^T / sqrt(d) + mask) v.

    Args:
        q: (..., N, d) queries; k, v: (..., M, d) keys and values.
        attn_mask: None, a boolean mask broadcastable to (..., N, M) (True = may attend; every row needs a True), or
            a float bias added to the logits.
        dropout_p: dropout on the probabilities (training).
    """
    if (
        _forced_explicit
        or (
            q.device.type == "cpu"
            and q.dtype == torch.bfloat16
            and has_native_bf16()  # a constant: decided before the size test, so compiled graphs need no size guard
            and dropout_p == 0.0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not torch.compiler.is_exporting()
            and q.shape[:-1].numel() * k.shape[-2] <= CPU_HALF_EXPLICIT_MAX_ELEMENTS
        )
    ):
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (..., N, M)
        if attn_mask is not None:
            logits = (
                logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
            )
        probs = logits.softmax(dim=-1)
        return (F.dropout(probs, dropout_p) if dropout_p else probs) @ v  # dropout only when forced in training
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def split_tokens(n_tokens: int, grid: tuple[int, int] | None, layer: str) -> int:
    """The number of prefix tokens in a sequence of `n_tokens` whose last H'*W' tokens form the patch `grid`.

    Raises:
        ValueError: no grid was given (the layer mixes tokens by position), or the grid does not fit the sequence.
    """
    if grid is None:
        raise ValueError(
            f"attn_layer={layer!r} mixes tokens by their grid position and needs grid=(H', W'); "
            "call it through a model (VisionTransformer passes the grid) or pass grid= yourself"
        )
    gh, gw = grid_sides(grid)
    prefix = n_tokens - gh * gw
    if gh < 1 or gw < 1 or prefix < 0:
        raise ValueError(f"grid {tuple(grid)} does not fit a sequence of {n_tokens} tokens (needs N >= H'*W')")
    return prefix


def grid_sides(grid: tuple[int, int]) -> tuple[int, int]:
    """(H', W') as Python ints; symbolic sizes (torch.export, `vitkit.deploy.export`) stay symbolic, because int() of
    one would freeze the exported program at the example size."""
    return tuple(g if isinstance(g, torch.SymInt) else int(g) for g in grid)  # type: ignore[return-value]


class Attention(nn.Module):
    """Multi-head self-attention over all N tokens (global attention, as in ViT).

    The normal path calls `scaled_dot_product_attention` (this module's), which picks a fused kernel (flash /
    memory-efficient on GPU, a blocked kernel on CPU) that never materialises the N x N matrix; only for bf16
    inference on a CPU with native bf16 and a matrix of at most `CPU_HALF_EXPLICIT_MAX_ELEMENTS` elements (32 MB)
    does it compute the three ops instead, which were faster there. Only while a capture is attached (see
    `vitkit.layers.capture_attention`, which `model(x, return_attention=...)` uses) does this layer compute
    softmax(q k^T / sqrt(d)) explicitly and hand the probabilities to the capture; every other layer stays fused.
    `forward` always returns a plain tensor, so forward hooks and exporters see an ordinary module.

    Args:
        dim: token width.
        num_heads: number of heads; dim must be divisible by it.
        qkv_bias: bias on the q, k, v projection (True in ViT/DeiT).
        qk_norm: normalise q and k per head (ViT-22B): stabilises training at scale.
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the output projection.
        norm_layer: the q/k norm (a class called with the head width).
    """

    # An (N x N) map over every token exists, so rollout/relevance can read it; variants without one say False.
    global_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.capture: CaptureFn | None = None  # set only inside `capture_attention`

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, N, C) -> tokens (B, N, C).

        Args:
            x: tokens laid out as [prefix tokens..., patch tokens in row-major order of the grid].
            grid: the patch grid (H', W'); N - H'*W' leading tokens are prefix tokens (class, distillation,
                registers). Global attention ignores it; the variants of the attention zoo (local, axial, relative
                position ...) need it and raise a ValueError without it.
        """
        q, k, v = self.project_qkv(x)  # each (B, h, N, d)
        return self.project_out(self.attend(q, k, v, grid))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, N, C) -> q, k, v, each (B, heads, N, head_dim), with the q/k norm applied."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)  # each (B, h, N, d)
        return self.q_norm(q), self.k_norm(k), v

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (B, heads, N, head_dim) -> tokens (B, N, C) through the output projection."""
        B, h, N, d = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, h * d)))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The token mixing itself: q, k, v (B, heads, N, d) -> (B, heads, N, d). Variants override this (and keep
        the projections, so their state dicts share the `qkv`/`proj` keys with plain multi-head attention)."""
        capture = self.capture  # read once: another thread may close its capture meanwhile
        if capture is not None:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
            capture(self, attn)
            return self.attn_drop(attn) @ v  # (B, h, N, d)
        return scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)

    def masked_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Dense attention restricted by a boolean mask: q, k, v (B, h, N, d), mask (N, N) or broadcastable to
        (B, h, N, N), True where a query may attend a key (every row needs at least one True). The fused kernel
        normally; the explicit softmax (handed to a capture) while one is attached. Variants defined by a mask
        (local, sparse) use this as their reference path."""
        capture = self.capture
        # Exporting (vitkit.deploy.export) takes the explicit path too: the ONNX exporter's decomposition of the
        # masked fused kernel changes its output layout and then fails on the reshape that follows.
        if capture is not None or torch.compiler.is_exporting():
            logits = ((q * self.scale) @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))  # (B, h, N, N)
            attn = logits.softmax(dim=-1)
            if capture is not None:
                capture(self, attn)
            return self.attn_drop(attn) @ v
        p = self.attn_drop.p if self.training else 0.0
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    def forward_queries(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Tokens (B, N, C) -> the outputs of the first `n` tokens only (B, n, C): every token is a key and a value,
        only the first n are queries. Equals `forward(x)[:, :n]` (up to float summation order) without computing the
        other N - n rows of q, attention, projection. For inference (no dropout, no capture)."""
        B, N, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = linear(x[:, :n], w[:C], None if b is None else b[:C])  # (B, n, C)
        kv = linear(x, w[C:], None if b is None else b[C:])  # (B, N, 2C)
        q = q.reshape(B, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, n, d)
        k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        x = scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (B, h, n, d)
        return self.proj(x.transpose(1, 2).reshape(B, n, C))
