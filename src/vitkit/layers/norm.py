"""Normalisation layers for channels-first feature maps (CNN families)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, at every position (ConvNeXt's "channels_first" norm).

    The parameters are those of `nn.LayerNorm(C)` (`weight`, `bias`), so timm and transformers weights load as
    they are. The map is moved to channels-last for the normalisation and back, which is what timm does.

    Args:
        num_channels: C, the width normalised over.
        eps: added to the variance; ConvNeXt uses 1e-6.
        elementwise_affine: learn a per-channel scale and shift.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"LayerNorm2d expects a (B, C, H, W) map, got a tensor of shape {tuple(x.shape)}")
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)
