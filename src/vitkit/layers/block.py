"""The pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vitkit.layers.attention import Attention
from vitkit.layers.drop import DropPath
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.mlp import Mlp


def _accepts_grid(module: nn.Module) -> bool:
    """Whether `module.forward` takes a `grid` keyword (or any keyword)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward: call it the plain way
        return False
    return "grid" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Block(nn.Module):
    """Pre-norm transformer block built from pluggable layers. Disabled parts (layer scale, drop path) are Identity.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on the q, k, v projection.
        qk_norm: normalise q and k per head.
        proj_drop: dropout after the attention projection and inside the MLP.
        attn_drop: dropout on attention probabilities.
        drop_path: stochastic-depth rate of this block.
        init_values: LayerScale initial gain, or None for no LayerScale.
        norm_layer: norm constructor taking the width (e.g. `partial(nn.LayerNorm, eps=1e-6)`).
        act_layer: MLP activation constructor.
        attn_layer: attention class, called as `attn_layer(dim, num_heads, qkv_bias=, qk_norm=, attn_drop=,
            proj_drop=, norm_layer=, **attn_args)`; `attn(x, grid=(H', W'))` maps (B, N, dim) -> (B, N, dim).
        mlp_layer: MLP class, called as `mlp_layer(dim, hidden, drop=, act_layer=)`.
        attn_args: extra keyword arguments for `attn_layer` (variant options).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        attn_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **(attn_args or {}),
        )
        # Attention layers written before the grid was passed (`forward(x)` only) keep working without it.
        self._attn_takes_grid = _accepts_grid(self.attn)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=proj_drop, act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, N, dim) -> tokens (B, N, dim); `grid` is the patch grid (H', W') of the last H'*W' tokens,
        passed to the attention (variants that mix tokens by position need it)."""
        h = self.attn(self.norm1(x), grid=grid) if self._attn_takes_grid else self.attn(self.norm1(x))
        x = x + self.drop_path1(self.ls1(h))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_queries(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Tokens (B, N, dim) -> the block's outputs for the first `n` tokens (B, n, dim), attending to all N; the
        attention must have `forward_queries` (vitkit's "mha"). For inference: a classifier that reads only its
        prefix tokens skips the other rows of the last block (its MLP, projection and queries)."""
        x_n = x[:, :n] + self.drop_path1(self.ls1(self.attn.forward_queries(self.norm1(x), n)))
        return x_n + self.drop_path2(self.ls2(self.mlp(self.norm2(x_n))))
