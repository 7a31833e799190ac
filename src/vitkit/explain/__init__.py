"""Why a ViT predicts what it does: attention maps, rollout, gradient-based relevance, and faithfulness metrics.

    from vitkit.explain import explain
    maps = explain(model, images, method="relevance")  # (B, H, W), one map per image
    cam = segmentation_cam(seg_model, images)          # why is this region class k (vitkit.explain.dense)
    out = detr_cross_attention(detector, images)       # where each DETR query looks (vitkit.explain.cross_attention)

See docs/explain.md for the methods, their definitions and how they compare on the `shapes` data.
"""

from vitkit.explain.cross_attention import DETRCrossAttention, detr_cross_attention, query_detections
from vitkit.explain.dense import (
    DENSE_METHODS,
    SegmentationCAM,
    backbone_attention,
    dense_kind,
    prepare_dense_images,
    segmentation_cam,
)
from vitkit.explain.evaluate import (
    EVAL_METHODS,
    evaluate_checkpoint,
    evaluate_explanations,
    format_table,
    save_results,
)
from vitkit.explain.inputs import decode_image, load_checkpoint, prepare_image, resolve_checkpoint
from vitkit.explain.maps import (
    HEAD_FUSIONS,
    METHODS,
    attention_flow,
    attention_from_attentions,
    attention_map,
    attention_rollout,
    discard_lowest,
    explain,
    flow_from_attentions,
    forward_with_attention,
    fuse_heads,
    grad_rollout,
    grad_rollout_from_attentions,
    mean_attention_distance,
    mean_attention_distance_from_attentions,
    relevance_from_attentions,
    relevance_map,
    rollout_from_attentions,
)
from vitkit.explain.metrics import (
    auc,
    deletion_auc,
    energy_in_mask,
    insertion_auc,
    perturbation_curves,
    pointing_game,
    random_maps,
)

__all__ = [
    "DENSE_METHODS",
    "DETRCrossAttention",
    "EVAL_METHODS",
    "HEAD_FUSIONS",
    "METHODS",
    "attention_flow",
    "attention_from_attentions",
    "attention_map",
    "attention_rollout",
    "auc",
    "backbone_attention",
    "deletion_auc",
    "dense_kind",
    "detr_cross_attention",
    "decode_image",
    "discard_lowest",
    "energy_in_mask",
    "evaluate_checkpoint",
    "evaluate_explanations",
    "explain",
    "flow_from_attentions",
    "format_table",
    "forward_with_attention",
    "fuse_heads",
    "grad_rollout",
    "grad_rollout_from_attentions",
    "insertion_auc",
    "load_checkpoint",
    "mean_attention_distance",
    "mean_attention_distance_from_attentions",
    "perturbation_curves",
    "pointing_game",
    "prepare_dense_images",
    "prepare_image",
    "query_detections",
    "random_maps",
    "relevance_from_attentions",
    "relevance_map",
    "resolve_checkpoint",
    "save_results",
    "SegmentationCAM",
    "segmentation_cam",
    "rollout_from_attentions",
]
