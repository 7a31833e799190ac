"""Patch embedding: cut an image into non-overlapping patches and project each to a token."""

from __future__ import annotations

import torch
from torch import nn


def _nearest_multiples(size: int, patch: int) -> str:
    lower = (size // patch) * patch
    upper = lower + patch
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


def check_image_size(height: int, width: int, patch_size: tuple[int, int]) -> tuple[int, int]:
    """Return the patch grid (H', W') for an image, or raise a ValueError naming the bad side.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        patch_size: (patch height, patch width).
    """
    ph, pw = patch_size
    for name, size, p in (("height", height, ph), ("width", width, pw)):
        if size < p or size % p != 0:
            raise ValueError(
                f"image {name} {size} is not a multiple of patch size {p} (try {_nearest_multiples(size, p)})"
            )
    return height // ph, width // pw


class PatchEmbed(nn.Module):
    """Strided-convolution patch projection: (B, C, H, W) -> (B, H/p * W/p, D).

    A convolution whose kernel and stride both equal the patch size is exactly a linear layer applied to each
    flattened patch, and it is the layout every published ViT checkpoint uses (`patch_embed.proj`).

    Args:
        patch_size: side of a square patch, or (height, width).
        in_chans: number of input channels.
        embed_dim: token width D.
        bias: whether the projection has a bias.
    """

    def __init__(
        self, patch_size: int | tuple[int, int] = 16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True
    ):
        super().__init__()
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (H', W') for an input of this size; raises ValueError for sizes that do not divide."""
        return check_image_size(height, width, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        self.grid_size(x.shape[2], x.shape[3])
        x = self.proj(x)  # (B, D, H', W')
        return x.flatten(2).transpose(1, 2)  # (B, H'*W', D)
