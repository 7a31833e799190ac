"""The transformer's position-wise feed-forward network, plain and gated."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitkit.layers.linear import Linear


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout, the ViT MLP (hidden width = mlp_ratio * dim)."""

    def __init__(
        self, in_features: int, hidden_features: int, drop: float = 0.0, act_layer: Callable[[], nn.Module] = nn.GELU
    ):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class GluMlp(nn.Module):
    """Gated MLP (Shazeer 2020, "GLU Variants Improve Transformer"): fc2(act(x W) * (x V)); SwiGLU with SiLU.

    `hidden_features` is the width of each of the two branches (timm's SwiGLU layout: fc1_g, fc1_x, fc2).
    """

    def __init__(
        self, in_features: int, hidden_features: int, drop: float = 0.0, act_layer: Callable[[], nn.Module] = nn.SiLU
    ):
        super().__init__()
        self.fc1_g = Linear(in_features, hidden_features)
        self.fc1_x = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x))))
