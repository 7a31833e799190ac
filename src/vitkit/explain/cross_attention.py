"""Where a DETR object query looks: the decoder's cross-attention over the patch grid (Carion et al. 2020, Fig. 6).

    out = detr_cross_attention(detector, images)   # one forward pass
    out.maps        # (B, Q, H', W') attention of every query over the backbone's feature grid, heads fused
    out.logits      # (B, Q, K + 1), out.boxes (B, Q, 4) cx, cy, w, h normalised: the model's own outputs

Each decoder layer's cross-attention (`nn.MultiheadAttention`, called with `need_weights=False` for speed) is asked
for its per-head weights by a forward pre-hook for the length of one forward pass and read by a forward hook; the
model's outputs are unchanged. The memory is the feature map flattened row by row, so key n is cell (n // W', n % W')
of the grid. Each query's row sums to one over the grid (softmax over the keys), before any head fusion by max or
min.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.explain._common import _check_images, _upsample, eval_mode
from vitkit.explain.maps import HEAD_FUSIONS, HeadFusion, check_head, check_layer, fuse_heads
from vitkit.models.base import model_label


@dataclass
class DETRCrossAttention:
    """What `detr_cross_attention` returns (all detached).

    Attributes:
        maps: (B, Q, H', W') cross-attention of each query over the feature grid (or (B, Q, H, W) upsampled).
        logits: (B, Q, K + 1) class logits, the last "no object".
        boxes: (B, Q, 4) boxes as cx, cy, w, h in [0, 1] of the input.
        layer: the decoder layer read (non-negative).
    """

    maps: Tensor
    logits: Tensor
    boxes: Tensor
    layer: int


def detr_cross_attention(
    model: nn.Module,
    images: Tensor,
    layer: int = -1,
    head: int | None = None,
    head_fusion: HeadFusion = "mean",
    upsample_to: tuple[int, int] | None = None,
) -> DETRCrossAttention:
    """The cross-attention of every object query of one decoder layer, with the detector's outputs.

    Args:
        model: a `ViTDETR` (any backbone: the grid is that of the feature map the decoder reads).
        images: normalised float batch (B, C, H, W), any size the backbone accepts.
        layer: decoder layer (negatives from the end; -1 = the last, whose queries give the final boxes).
        head: one attention head, or None to fuse the heads with `head_fusion`.
        head_fusion: "mean" | "max" | "min" over heads.
        upsample_to: (H, W) to resize the maps to (bilinear), or None for the feature grid.

    Raises:
        ValueError: not a ViTDETR, a layer or head out of range.
    """
    from vitkit.models.detr import ViTDETR

    if not isinstance(model, ViTDETR):
        raise ValueError(f"cross-attention maps need a DETR detector (ViTDETR), got {model_label(model)}")
    _check_images(images)
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    layers = model.decoder.layers
    layer = check_layer(layer, len(layers))
    attn_module = layers[layer].cross_attn
    head = check_head(head, attn_module.num_heads)
    seen: dict[str, Any] = {}

    def ask_for_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> None:
        seen["weights"] = output[1]  # (B, heads, Q, H'*W')

    def keep_grid(module: nn.Module, args: tuple, output: Tensor) -> None:
        seen["grid"] = tuple(output.shape[-2:])  # the projected feature map (B, D, H', W')

    hooks = [
        attn_module.register_forward_pre_hook(ask_for_weights, with_kwargs=True),
        attn_module.register_forward_hook(keep_weights),
        model.input_proj.register_forward_hook(keep_grid),
    ]
    try:
        with eval_mode(model), torch.no_grad():
            out = model(images)
    finally:
        for h in hooks:
            h.remove()
    weights = seen["weights"].float()
    a = fuse_heads(weights, head_fusion) if head is None else weights[:, head]  # (B, Q, H'*W')
    gh, gw = seen["grid"]
    maps = a.reshape(a.shape[0], a.shape[1], gh, gw)  # (B, Q, H', W'): key n = cell (n // W', n % W')
    if upsample_to is not None:
        B, Q = maps.shape[:2]
        maps = _upsample(maps.reshape(B * Q, gh, gw), upsample_to).reshape(B, Q, *upsample_to)  # (B, Q, H, W)
    return DETRCrossAttention(
        maps=maps.detach(), logits=out["pred_logits"].detach(), boxes=out["pred_boxes"].detach(), layer=layer
    )


def query_detections(
    result: DETRCrossAttention,
    sizes: Sequence[tuple[int, int]],
    threshold: float = 0.5,
    max_queries: int = 6,
) -> list[list[dict[str, Any]]]:
    """Per image the queries to draw: those scoring at least `threshold`, best first, at most `max_queries`.

    An image where no query reaches the threshold gets its best query alone, marked `"below_threshold": True`, so
    a figure of an untrained or unsure detector still shows where its most confident query looks.

    Args:
        result: `detr_cross_attention` output.
        sizes: per image the (H, W) to give the boxes in (the picture drawn on).
        threshold: lowest score drawn, in [0, 1].
        max_queries: most queries drawn per image (>= 1).

    Returns:
        Per image [{"query": index, "box": [x0, y0, x1, y1] pixels, "label": class index, "score",
        "below_threshold"}], best first.

    Raises:
        ValueError: a threshold outside [0, 1], max_queries < 1, or not one size per image.
    """
    from vitkit.data.boxes import clip_boxes, cxcywh_to_xyxy, denormalize_boxes

    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"max_queries must be a positive integer, got {max_queries!r}")
    if len(sizes) != result.logits.shape[0]:
        raise ValueError(f"got {len(sizes)} sizes for {result.logits.shape[0]} images")
    prob = result.logits.float().softmax(-1)[..., :-1]  # (B, Q, K): "no object" left out, as DETR's PostProcess
    scores, labels = prob.max(-1)
    out = []
    for b, size in enumerate(sizes):
        size = (int(size[0]), int(size[1]))
        boxes = clip_boxes(denormalize_boxes(cxcywh_to_xyxy(result.boxes[b].float()), size), size)  # (Q, 4)
        order = scores[b].argsort(descending=True)
        keep = [int(q) for q in order if float(scores[b, q]) >= threshold][:max_queries]
        below = not keep
        keep = keep or [int(order[0])]
        out.append(
            [
                {
                    "query": q,
                    "box": [round(float(v), 2) for v in boxes[q]],
                    "label": int(labels[b, q]),
                    "score": round(float(scores[b, q]), 4),
                    "below_threshold": below,
                }
                for q in keep
            ]
        )
    return out
