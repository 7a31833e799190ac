"""Faithfulness and localisation metrics for saliency maps.

Deletion and insertion (RISE, Petsiuk et al. 2018) ask whether the pixels a map calls important are the ones the
model needs: delete patches from the most to the least salient and the target-class probability should fall
fast (low area under the curve is good); insert them into a blurred image and it should rise fast (high area is
good). Patches are the unit here, since a ViT sees nothing finer.

The pointing game (Zhang et al. 2016) and the energy share ask whether a map points at the object when its mask
is known (the `shapes` data).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.explain.maps import Target, eval_mode, resolve_targets

Mode = Literal["deletion", "insertion"]
Baseline = Literal["zeros", "blur"]


def patch_saliency(saliency: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, H', W') patch-grid maps, or (B, H, W) pixel maps average-pooled onto the grid -> (B, H', W')."""
    if saliency.ndim != 3:
        raise ValueError(f"saliency maps must be (B, H', W') or (B, H, W), got shape {tuple(saliency.shape)}")
    gh, gw = grid
    h, w = saliency.shape[-2:]
    if (h, w) == (gh, gw):
        return saliency.float()
    if h % gh or w % gw:
        raise ValueError(f"saliency maps of size {h}x{w} match neither the patch grid {gh}x{gw} nor a multiple of it")
    return F.avg_pool2d(saliency[:, None].float(), kernel_size=(h // gh, w // gw))[:, 0]


def blur(images: Tensor, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur (kernel 4 sigma + 1, edges replicated): the insertion start image, as in RISE."""
    k = 2 * int(2 * sigma) + 1
    x = torch.arange(k, dtype=images.dtype, device=images.device) - k // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    C = images.shape[1]
    y = F.pad(images, (k // 2,) * 4, mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, k).expand(C, 1, 1, k), groups=C)  # blur rows
    return F.conv2d(y, g.view(1, 1, k, 1).expand(C, 1, k, 1), groups=C)  # then columns


def _steps(num_patches: int, max_steps: int) -> tuple[int, Tensor]:
    """Patches changed per step and the fraction of patches changed at each point of the curve."""
    per_step = max(1, math.ceil(num_patches / max_steps))
    counts = torch.arange(0, num_patches + per_step, per_step).clamp(max=num_patches)
    counts = torch.unique_consecutive(counts)
    return per_step, counts


def perturbation_curves(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    mode: Mode = "deletion",
    target: Target = None,
    baseline: Baseline = "zeros",
    max_steps: int = 64,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Target-class probability as patches are deleted (or inserted) in order of decreasing saliency.

    Args:
        model: classifier taking normalised images.
        images: normalised float batch (B, C, H, W).
        saliency: (B, H', W') or (B, H, W) maps; higher = more important. Ties keep patch order.
        mode: "deletion" starts from the image and replaces patches with `baseline`; "insertion" starts from the
            blurred image and puts the original patches back.
        target: class per image; None = the model's prediction on the clean image.
        baseline: what deleted patches become: "zeros" (the dataset mean colour, since images are normalised) or
            "blur". Insertion always starts from the blurred image.
        max_steps: at most this many perturbation steps (several patches per step on big grids).
        batch_size: perturbed images per forward pass.

    Returns:
        (fractions (S,), probabilities (B, S)): the share of patches changed at each step and the curve.
    """
    check_choice("mode", mode, ("deletion", "insertion"))
    check_choice("baseline", baseline, ("zeros", "blur"))
    B, C, H, W = images.shape
    grid = tuple(model.patch_grid(H, W))
    sal = patch_saliency(saliency.to(images.device), grid).flatten(1)  # (B, patches)
    if sal.shape[0] != B:
        raise ValueError(f"got {sal.shape[0]} saliency maps for {B} images")
    num_patches = sal.shape[1]
    order = sal.argsort(dim=1, descending=True, stable=True)  # (B, patches), most salient first
    rank = order.argsort(dim=1)  # rank[b, p] = position of patch p in the order
    _, counts = _steps(num_patches, max_steps)
    S = counts.numel()
    blurred = blur(images)
    if mode == "deletion":
        start, source = images, (torch.zeros_like(images) if baseline == "zeros" else blurred)
    else:
        start, source = blurred, images
    ph, pw = H // grid[0], W // grid[1]
    with eval_mode(model), torch.no_grad():
        targets = resolve_targets(target, model(images))
        probs = torch.empty(B, S, device=images.device)
        # Enumerate (image, step) pairs and run them in chunks of `batch_size`.
        pairs = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(S), indexing="ij"), dim=-1).reshape(-1, 2)
        for chunk in pairs.split(batch_size):
            b, s = chunk[:, 0].to(images.device), chunk[:, 1]
            changed = rank[b] < counts[s].to(images.device)[:, None]  # (n, patches)
            m = changed.reshape(-1, 1, *grid).float()
            m = m.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)  # (n, 1, H, W)
            x = start[b] * (1 - m) + source[b] * m
            p = model(x).softmax(dim=-1).gather(1, targets[b][:, None])[:, 0]
            probs[b, s.to(images.device)] = p
    return counts.float() / num_patches, probs


def auc(fractions: Tensor, curves: Tensor) -> Tensor:
    """Area under each curve (B, S) over fractions in [0, 1] by the trapezoid rule -> (B,)."""
    return torch.trapezoid(curves, fractions.to(curves.device), dim=-1)


def deletion_auc(model: nn.Module, images: Tensor, saliency: Tensor, target: Target = None, **kwargs) -> Tensor:
    """Deletion AUC per image (lower = more faithful). Keyword arguments go to `perturbation_curves`."""
    x, y = perturbation_curves(model, images, saliency, mode="deletion", target=target, **kwargs)
    return auc(x, y)


def insertion_auc(model: nn.Module, images: Tensor, saliency: Tensor, target: Target = None, **kwargs) -> Tensor:
    """Insertion AUC per image (higher = more faithful). Keyword arguments go to `perturbation_curves`."""
    x, y = perturbation_curves(model, images, saliency, mode="insertion", target=target, **kwargs)
    return auc(x, y)


def _pixel_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps.float()


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Whether each map's maximum lies on the object: bool (B,).

    Args:
        maps: (B, H, W) saliency, or patch-grid maps that are upsampled (bilinear) to the mask size first.
        masks: bool object masks (B, H, W).
        tolerance: pixels by which the mask is dilated first (0 = strict; Zhang et al. used 15 px at 224).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {tuple(masks.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    maps = _pixel_maps(maps.to(masks.device), tuple(masks.shape[-2:]))
    m = masks.float()[:, None]
    if tolerance:
        m = F.max_pool2d(m, kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)
    idx = maps.flatten(1).argmax(dim=1)  # first maximum on ties
    return m.flatten(1).gather(1, idx[:, None])[:, 0] > 0


def energy_in_mask(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's (positive) mass that falls inside the object mask, in [0, 1]: (B,)."""
    maps = _pixel_maps(maps.to(masks.device), tuple(masks.shape[-2:])).clamp(min=0)
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks.float()).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def random_maps(batch: int, grid: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """Uniform random patch-grid maps (B, H', W'): the baseline every method must beat."""
    return torch.rand(batch, *grid, generator=generator)
