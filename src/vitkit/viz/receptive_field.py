"""CNN receptive fields grow a few pixels per layer; a ViT token can see the whole image after one block.

`compare_receptive_fields` measures it rather than drawing a cartoon: the effective receptive field (Luo et al.
2016) of the centre output of a stack of 3x3 convolutions and of the centre patch token of a ViT is the gradient
magnitude of that output with respect to the input pixels, averaged over random inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from vitkit.explain._common import UnsupportedModelError
from vitkit.models.base import model_label
from vitkit.viz._common import finish, hide_ticks, new_figure

_THRESHOLD = 1e-3  # a pixel is "in" the effective field when its gradient is at least 0.1% of the largest one


def _conv_stack(depth: int, width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def cnn_effective_fields(depths: Sequence[int], size: int = 64, samples: int = 4, seed: int = 0) -> list[np.ndarray]:
    """|d centre output / d input| of a random 3x3 conv stack after each depth, (size, size) maps scaled to max 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _conv_stack(max(depths)).eval()
    x = torch.randn(samples, 3, size, size, generator=gen, requires_grad=True)
    maps = []
    for d in depths:
        y = net[: 2 * d](x)  # (B, width, size, size) after d conv+ReLU pairs
        (g,) = torch.autograd.grad(y[:, :, size // 2, size // 2].sum(), x)
        m = g.abs().sum(dim=1).mean(dim=0)
        maps.append((m / m.max().clamp_min(1e-12)).numpy())
    return maps


def vit_effective_fields(
    depths: Sequence[int], model: nn.Module | None = None, size: int = 64, samples: int = 4, seed: int = 0
) -> list[np.ndarray]:
    """|d centre patch token / d input| after each depth of a ViT (a random ViT with 4 px patches by default).

    The random ViT gets unit-gain weights (std 1/sqrt(fan_in)) and a unit-scale position table instead of the
    0.02 training init, under which every block is close to the identity and attention is uniform; a trained
    ViT is closer to the unit-gain one. Pass a trained `model` to measure the real thing.
    """
    if model is None:
        from vitkit.models.vit import VisionTransformer, ViTConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cfg = ViTConfig(img_size=size, patch_size=4, embed_dim=64, depth=max(depths), num_heads=4, num_classes=0)
            model = VisionTransformer(cfg)
            for mod in model.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=1 / math.sqrt(mod.in_features))
            nn.init.normal_(model.pos_embed, std=1.0)
    model = model.eval()
    device = next(model.parameters()).device
    size_hw = tuple(model.preprocess.input_size)  # the native size: (size, size) for the random ViT
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, model.cfg.in_chans, *size_hw, generator=gen).to(device).requires_grad_(True)
    gh, gw = model.patch_grid(*size_hw)
    centre = model.num_prefix_tokens + (gh // 2) * gw + gw // 2
    outs = model.forward_intermediates(x, indices=[d - 1 for d in depths])
    maps = []
    for y in outs:
        (g,) = torch.autograd.grad(y[:, centre].sum(), x, retain_graph=True)
        m = g.abs().sum(dim=1).mean(dim=0).cpu()
        maps.append((m / m.max().clamp_min(1e-12)).numpy())
    return maps


def compare_receptive_fields(
    depths: Sequence[int] = (1, 2, 4, 8),
    model: nn.Module | None = None,
    size: int = 64,
    save_path: str | os.PathLike | None = None,
) -> Figure:
    """Effective receptive fields of a CNN and a ViT side by side, measured by gradients.

    Top row: a stack of 3x3 convolutions (random weights) after each depth; bottom row: a ViT's centre patch
    token after the same number of blocks (a random 4 px-patch ViT, or `model`); right: the share of the image
    whose gradient is at least 0.1% of the peak, with the theoretical fields for reference: (2L + 1)^2 pixels
    for the CNN, the whole image from the first block on for the ViT. Gradient maps are on a log scale so the
    far field is visible (the residual path keeps each token's own patch the brightest).

    Args:
        depths: numbers of layers / blocks to compare.
        model: a ViT to measure instead of the random one (its native input size is used); needs max(depths)
            blocks.
        size: side of the random inputs for the CNN (and the random ViT).
        save_path: where to write the figure, or None.
    """
    depths = sorted({int(d) for d in depths})
    if not depths or depths[0] < 1:
        raise ValueError(f"depths must be positive layer counts, got {list(depths)}")
    if model is not None and not (hasattr(model, "patch_grid") and hasattr(model, "num_prefix_tokens")):
        family = getattr(model, "family", None)
        raise UnsupportedModelError(
            "the receptive-field figure's ViT row needs a token model (`patch_grid`, `num_prefix_tokens`); "
            f"{model_label(model)}{f' (family {family})' if family else ''} has none (leave out the model for a "
            "random ViT)"
        )
    if model is not None and max(depths) > len(model.feature_info):
        raise ValueError(f"depth {max(depths)} asked of a model with {len(model.feature_info)} blocks")
    cnn = cnn_effective_fields(depths, size=size)
    vit = vit_effective_fields(depths, model=model, size=size)
    fig = new_figure(2.3 * len(depths) + 4.5, 5.2)
    grid = fig.add_gridspec(2, len(depths) + 1, width_ratios=[1] * len(depths) + [1.9])
    for row, (name, maps) in enumerate((("CNN 3x3 conv", cnn), ("ViT block", vit))):
        for col, (d, m) in enumerate(zip(depths, maps, strict=True)):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(np.log10(np.maximum(m, 1e-4)), cmap="magma", vmin=-4, vmax=0)
            ax.set_title(f"{name} x{d}", fontsize=8)
            hide_ticks(ax)
    ax = fig.add_subplot(grid[:, -1])
    area = lambda maps: [float((m >= _THRESHOLD).mean()) for m in maps]  # noqa: E731
    ax.plot(depths, area(cnn), "o-", label="CNN, measured")
    ax.plot(depths, [min(1.0, (2 * d + 1) ** 2 / size**2) for d in depths], "k:", label="CNN, theoretical (2L+1)²")
    ax.plot(depths, area(vit), "s-", label="ViT, measured")
    ax.plot(depths, [1.0] * len(depths), "C1:", label="ViT, theoretical (all patches)")
    ax.set_xlabel("depth (layers / blocks)")
    ax.set_ylabel(f"share of image with gradient ≥ {_THRESHOLD:.1%} of peak")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(depths)
    ax.legend(fontsize=8)
    fig.suptitle("effective receptive field of the centre output: log10 |d output / d input|")
    return finish(fig, save_path)
