"""Explaining dense models: segmentation (`ViTSegmentation`, `ViTUNet`) and DETR detection (`ViTDETR`) checkpoints.

    maps = backbone_attention(seg_or_detr, x, method="rollout")       # (B, H', W'), the backbone's self-attention
    cam = segmentation_cam(seg_model, x, target=None)                  # why is this region class k
    cam.maps, cam.targets, cam.masks                                   # (B, H', W'), (B,), (B, H, W)

What applies to which model (`DENSE_METHODS`):

- "attention", "rollout", "flow" (both kinds): the backbone's self-attention, computed by the pure functions of
  `vitkit.explain.maps`. A dense head reads every patch token, not a class token, so the map is read from the
  mean of the patch queries (the row a mean-pooled classifier is explained by), whatever prefix tokens the backbone
  has; every block of the backbone takes part in rollout and flow. A Swin backbone gives "attention" as one block's
  window attention on its stage grid (`vitkit.explain.windows`, already a mean over the queries) and refuses rollout
  and flow; CNN backbones (ConvNeXt, ResNet) refuse all three by name, as for classifiers.
- "gradcam" (segmentation): Seg-Grad-CAM (Vinogradova et al. 2020, "Towards Interpretable Semantic
  Segmentation via Gradient-weighted Class Activation Mapping"): the score of image b is the logit of class k_b
  summed over the pixels the model assigns to k_b (its argmax), and Grad-CAM weights the feature map the head
  reads (`feature_index`; a UNet's deepest skip) by that score's spatial mean gradient. The default k_b is the
  most frequent predicted class other than background (class 0), or background when nothing else is predicted.
  A class predicted nowhere has an empty region: its map is all zeros.
- "cross-attention" (detection): the DETR decoder's attention of each object query over the patch grid, see
  `vitkit.explain.cross_attention`.

Inputs are the model's own: `prepare_dense_images` decodes as `vitkit predict` does for these models (the run's
decode size, then a stretch to the input size, no centre crop), so any aspect ratio is explained whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.data.images import ImageLike
from vitkit.explain._common import Target, _check_images, _upsample, eval_mode
from vitkit.explain.gradcam import stage_grad_cam
from vitkit.explain.maps import (
    HEAD_FUSIONS,
    HeadFusion,
    attention_from_attentions,
    attention_map,
    check_attention_model,
    check_discard_ratio,
    check_head,
    check_layer,
    flow_from_attentions,
    forward_with_attention,
    rollout_from_attentions,
)
from vitkit.explain.windows import window_blocks
from vitkit.layers import attention_layers
from vitkit.models.base import model_label

DenseKind = Literal["segmentation", "detection"]
BACKBONE_METHODS = ("attention", "rollout", "flow")
DENSE_METHODS: dict[str, tuple[str, ...]] = {
    "segmentation": ("gradcam", *BACKBONE_METHODS),
    "detection": ("cross-attention", *BACKBONE_METHODS),
}
DEFAULT_DENSE_METHOD = {"segmentation": "gradcam", "detection": "cross-attention"}  # the first of each list


def dense_kind(model: nn.Module) -> DenseKind | None:
    """The kind of dense model: "segmentation" (ViTSegmentation, ViTUNet), "detection" (ViTDETR), else None."""
    from vitkit.models.detr import ViTDETR
    from vitkit.models.segmentation import ViTSegmentation, ViTUNet

    if isinstance(model, (ViTSegmentation, ViTUNet)):
        return "segmentation"
    if isinstance(model, ViTDETR):
        return "detection"
    return None


def check_dense_method(model: nn.Module, method: str) -> DenseKind:
    """The model's kind, or raise naming the methods that apply to it.

    Raises:
        ValueError: not a dense model, or a method that does not apply to this kind of dense model.
    """
    kind = dense_kind(model)
    if kind is None:
        raise ValueError(f"{model_label(model)} is not a segmentation or detection model")
    allowed = DENSE_METHODS[kind]
    if method not in allowed:
        why = {
            "grad-rollout": "it reads a class token's row, which a dense head does not use",
            "relevance": "it reads a class token's row, which a dense head does not use",
            "gradcam": "a detector has no per-pixel logits to sum over a region",
            "cross-attention": "only a DETR decoder has object queries",
        }.get(method, "it is not an explanation method")
        raise ValueError(
            f"method={method!r} does not apply to a {kind} model ({model_label(model)}): {why}; "
            f"the {kind} methods are {', '.join(allowed)}"
        )
    return kind


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def prepare_dense_images(images: Sequence[ImageLike], model: nn.Module) -> tuple[list[np.ndarray], Tensor]:
    """Images as a dense model sees them in `vitkit predict`: (the decoded uint8 (H_i, W_i, 3) images, the
    normalised (B, 3, h, w) batch stretched to the input size).

    A segmentation model's images go through the run's decode-size step first (`predict_masks`: a folder or COCO
    run decoded its files to `load_size` squares); a detector's are taken whole (`predict_detection`: its boxes are
    given in the file's pixels). Maps, masks and boxes are drawn on the decoded images, so a non-square file keeps
    its shape in the figures.
    """
    from vitkit.data.images import decode_image, naming_the_file
    from vitkit.data.inference import decode_for_model
    from vitkit.data.segmentation import SegEvalTransform

    if not images:
        raise ValueError("no images given")
    pre = model.preprocess
    device = next(model.parameters()).device
    # SegEvalTransform is also the detectors' eval transform (DetectionTransform with train=False, without boxes):
    # a bilinear, antialiased stretch to the input size, then the normalisation.
    tf = SegEvalTransform(pre.input_size, pre.mean, pre.std).to(device)
    detector = dense_kind(model) == "detection"

    def decode(im: ImageLike) -> Tensor:  # uint8 (3, H_i, W_i)
        with naming_the_file(im):  # a corrupt file named, as predict does
            if detector:
                return torch.from_numpy(np.ascontiguousarray(decode_image(im))).permute(2, 0, 1)
            return decode_for_model(im, model)

    decoded = [decode(im) for im in images]
    x = torch.cat([tf(d[None].to(device)) for d in decoded])  # (B, 3, h, w)
    return [d.permute(1, 2, 0).numpy() for d in decoded], x


# ----------------------------------------------------------------------------------------------------------------
# The backbone's self-attention
# ----------------------------------------------------------------------------------------------------------------
def backbone_attention(
    model: nn.Module,
    images: Tensor,
    method: str = "rollout",
    layer: int | None = None,
    head: int | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    upsample_to: tuple[int, int] | None = None,
) -> Tensor:
    """Attention, rollout or flow of a dense model's backbone, read from the mean patch query -> (B, H', W').

    Args:
        model: a segmentation model or detector whose backbone has global self-attention (a ViT).
        images: normalised float batch (B, C, H, W), any size the backbone accepts.
        method: "attention" (one block), "rollout" or "flow" (every block).
        layer: block for "attention" (None = the last).
        head: head for "attention" (None fuses the heads with `head_fusion`).
        head_fusion: "mean" | "max" | "min".
        discard_ratio: rollout and flow: share of each row's lowest weights dropped, in [0, 1).
        upsample_to: (H, W) to resize the maps to, or None for the patch grid.

    Raises:
        ValueError: a method other than these three, a backbone without global self-attention (naming its family;
            a Swin backbone gives "attention" only), a layer or head out of range.
    """
    check_choice("method", method, BACKBONE_METHODS)
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    check_discard_ratio(discard_ratio)
    _check_images(images)
    backbone = getattr(model, "backbone", None)
    if backbone is None or dense_kind(model) is None:
        raise ValueError(f"{model_label(model)} is not a segmentation or detection model with a backbone")
    if method == "attention" and not attention_layers(backbone) and window_blocks(backbone):
        # A windowed (Swin) backbone: one block's window attention, already the mean over the stage's queries.
        layer = -1 if layer is None else layer
        return attention_map(backbone, images, layer, head=head, head_fusion=head_fusion, upsample_to=upsample_to)
    check_attention_model(backbone, f"{method} maps of a dense model's backbone")
    P = int(backbone.num_prefix_tokens)
    grid = tuple(backbone.patch_grid(images.shape[-2], images.shape[-1]))
    if method == "attention":
        depth = len(attention_layers(backbone))
        layer = check_layer(-1 if layer is None else layer, depth)
        check_head(head, attention_layers(backbone)[layer].num_heads)
        _, attns, _, _ = forward_with_attention(backbone, images, layers=[layer])
        maps = attention_from_attentions(attns[0], grid, P, False, head=head, head_fusion=head_fusion)
    else:
        _, attns, _, _ = forward_with_attention(backbone, images, layers=True)
        fn = rollout_from_attentions if method == "rollout" else flow_from_attentions
        maps = fn(attns, grid, P, False, head_fusion=head_fusion, discard_ratio=discard_ratio)
    return _upsample(maps, upsample_to)


# ----------------------------------------------------------------------------------------------------------------
# Segmentation: why is this region class k
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationCAM:
    """What `segmentation_cam` returns (all detached).

    Attributes:
        maps: (B, H', W') non-negative Grad-CAM maps on the stage's grid (or (B, H, W) with `upsample_to`).
        targets: (B,) the class explained per image.
        masks: (B, H, W) the predicted class of every input pixel (the argmax of the logits).
        shares: (B,) the share of each image's pixels predicted as its target (the region the score sums over).
    """

    maps: Tensor
    targets: Tensor
    masks: Tensor
    shares: Tensor


def default_segmentation_layer(model: nn.Module) -> int:
    """The `feature_info` stage the head reads: `feature_index` of a linear/segmenter head, a UNet's deepest skip."""
    if hasattr(model, "index"):
        return int(model.index)
    return int(max(model.indices))


def _segmentation_targets(target: Target, masks: Tensor, num_classes: int) -> Tensor:
    """Per image: `target` broadcast to the batch, or the most frequent predicted non-background class."""
    B = masks.shape[0]
    if target is None:
        counts = torch.stack([torch.bincount(m.reshape(-1), minlength=num_classes) for m in masks])  # (B, K)
        counts[:, 0] = 0  # background explains only where nothing else is predicted
        best = counts.argmax(dim=1)
        return torch.where(counts.gather(1, best[:, None])[:, 0] > 0, best, torch.zeros_like(best))
    t = torch.as_tensor(target, device=masks.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"got {t.numel()} targets for a batch of {B} images (give one, or one per image)")
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"target class {int(bad[0])} is out of range for a model with {num_classes} classes (use 0..{num_classes - 1})"
        )
    return t.clone()


def segmentation_cam(
    model: nn.Module,
    images: Tensor,
    target: Target = None,
    layer: int | None = None,
    upsample_to: tuple[int, int] | None = None,
) -> SegmentationCAM:
    """Seg-Grad-CAM of a segmentation model for one class per image (see the module docstring).

    Args:
        model: a `ViTSegmentation` or `ViTUNet` (any backbone with `feature_info`).
        images: normalised float batch (B, C, H, W).
        target: class per image (int, one per image, or None for the most frequent predicted object class).
        layer: `feature_info` stage to weight (negatives from the end); None = the one the head reads.
        upsample_to: (H, W) to resize the maps to (bilinear), or None for the stage's grid.

    Raises:
        ValueError: not a segmentation model, a target or layer out of range.
    """
    _check_images(images)
    if dense_kind(model) != "segmentation":
        raise ValueError(f"segmentation_cam needs a ViTSegmentation or ViTUNet, got {model_label(model)}")
    K = int(model.num_classes)
    with eval_mode(model), torch.no_grad():
        masks = model(images).argmax(dim=1)  # (B, H, W)
    targets = _segmentation_targets(target, masks, K)
    region = masks == targets[:, None, None]  # (B, H, W): the pixels assigned to each image's target

    def score(logits: Tensor) -> Tensor:
        k = targets.to(logits.device)[:, None, None, None].expand(-1, 1, *logits.shape[-2:])
        return (logits.gather(1, k)[:, 0] * region).sum()  # summed over each region, then over the batch

    layer = default_segmentation_layer(model) if layer is None else layer
    maps = stage_grad_cam(model, images, score, layer, grid_model=model.backbone, upsample_to=upsample_to)
    shares = region.flatten(1).float().mean(dim=1)
    return SegmentationCAM(maps=maps, targets=targets, masks=masks, shares=shares)
