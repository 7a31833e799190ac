"""Multi-head self-attention with a fused path and an explicit path that exposes the attention probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention.

    The normal path calls `scaled_dot_product_attention`, which picks a fused kernel (flash / memory-efficient on
    GPU, a blocked kernel on CPU) and never materialises the N x N matrix. When the caller asks for the
    attention probabilities (`return_attention=True`) the explicit path computes softmax(q k^T / sqrt(d)) so it
    can be returned; only the layers whose maps were requested pay for it.

    Args:
        dim: token width.
        num_heads: number of heads; dim must be divisible by it.
        qkv_bias: bias on the q, k, v projection (True in ViT/DeiT).
        qk_norm: LayerNorm on q and k per head (ViT-22B): stabilises training at scale.
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (output, attention probabilities or None)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)  # each (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = None
        if return_attention:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v  # (B, h, N, d)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        x = self.proj_drop(self.proj(x))
        return x, attn
