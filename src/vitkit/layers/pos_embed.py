"""Position embeddings: fixed 2-D sin-cos tables, the one function that resamples a learned table, and CPVT's
position generator (a conditional encoding with no table)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / "Simple ViT"), shape (H'*W', dim).

    A quarter of the channels encode sin and cos of the row, a quarter of the column, each at dim/4 frequencies.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y = y.flatten()[:, None] * omega[None, :]  # (N, dim/4)
    x = x.flatten()[:, None] * omega[None, :]  # (N, dim/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (N, dim)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resample a learned position table to another patch grid, leaving prefix tokens untouched.

    This one function serves both when loading weights made for another input size and at run time when the
    model sees a new size. Bicubic like the ViT/DeiT fine-tuning recipes; antialiased when shrinking so that the
    smaller table is a proper low-pass version of the old one rather than an aliased sample of it.

    Args:
        pos_embed: (1, prefix + H*W, D) table.
        new_grid: target (H', W').
        old_grid: source (H, W); square is assumed when None.
        num_prefix_tokens: leading entries (class token, distillation token) that carry no grid position.
        interpolation: torch interpolation mode ("bicubic", "bilinear", "nearest").
    """
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise ValueError(f"interpolation={interpolation!r} is not allowed; choose 'bicubic', 'bilinear' or 'nearest'")
    if pos_embed.ndim != 3:
        raise ValueError(f"position table must be (1, N, D), got shape {tuple(pos_embed.shape)}")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.isqrt(num_grid))
        if side * side != num_grid:
            raise ValueError(
                f"position table has {num_grid} grid entries, which is not a square; pass old_grid=(H, W) explicitly"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid:
        raise ValueError(f"old_grid {tuple(old_grid)} does not match the {num_grid} grid entries of the position table")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]  # (1, P, D), (1, H*W, D)
    dim = grid.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # (1, D, H, W)
    shrinking = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    antialias = shrinking and interpolation in ("bilinear", "bicubic")
    align = False if interpolation in ("bilinear", "bicubic") else None
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, align_corners=align, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(orig_dtype)  # (1, H'*W', D)
    return torch.cat([prefix, grid], dim=1)


def resample_pos_embed_traced(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """`resample_pos_embed` without a Python branch on the new grid, for `torch.export` with symbolic sizes.

    The eager function returns the table itself at the old grid and antialiases only when shrinking: two branches
    on sizes that an exporter would freeze at the example size. Here the table is always interpolated (at the same
    grid the interpolation is the identity: the source points fall on the table's entries) and both filters are
    computed, one kept by a 0/1 factor made from the sizes. Numerically the eager function's result at every grid.

    Args: as `resample_pos_embed`, with `old_grid` required and `new_grid` possibly symbolic.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]  # (1, P, D), (1, H*W, D)
    dim = grid.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # (1, D, H, W)
    align = False if interpolation in ("bilinear", "bicubic") else None
    out = F.interpolate(grid, size=new_grid, mode=interpolation, align_corners=align)  # (1, D, H', W')
    if interpolation in ("bilinear", "bicubic"):
        shrink = torch.sym_min(
            1, torch.sym_max(0, old_grid[0] - new_grid[0]) + torch.sym_max(0, old_grid[1] - new_grid[1])
        )
        smooth = F.interpolate(grid, size=new_grid, mode=interpolation, align_corners=align, antialias=True)
        out = out * (1 - shrink) + smooth * shrink  # one factor is 0, the other 1: exactly one of the two tables
    out = out.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(orig_dtype)  # (1, H'*W', D)
    return torch.cat([prefix, out], dim=1)


class PosConv(nn.Module):
    """CPVT's position encoding generator (PEG; Chu et al. 2023, "Conditional Positional Encodings for Vision
    Transformers"): x + depthwise 3x3 conv(x) on the patch tokens laid out as their grid.

    Zero padding at the border tells each token where it is, so the encoding is conditioned on the input and works
    at any grid with nothing to resample. Prefix tokens (class, distillation, registers) pass through unchanged.

    Args:
        dim: token width D.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        """Tokens (B, prefix + H'*W', D) -> the same, with the positional term added to the patch tokens."""
        B, N, D = x.shape
        gh, gw = grid
        if N - num_prefix_tokens != gh * gw:
            raise ValueError(
                f"the position generator got {N} tokens, which is not {num_prefix_tokens} prefix tokens and a "
                f"{gh}x{gw} grid"
            )
        prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]  # (B, P, D), (B, H'*W', D)
        maps = patches.transpose(1, 2).reshape(B, D, gh, gw)  # (B, D, H', W')
        maps = maps + self.proj(maps)  # (B, D, H', W')
        return torch.cat([prefix, maps.flatten(2).transpose(1, 2)], dim=1)  # (B, P + H'*W', D)
