"""Measure models side by side: `compare` (several models, data fractions, probes) and `sweep` (one model, varied
settings). Each writes a resumable output directory with report.html, report.md, results.json and figures.

    from vitkit.compare import compare, sweep
    compare(["vit_nano_patch4_32", "resnet18"], data="digits", out="runs/compare", epochs=10)
    sweep("vit_nano_patch4_32", {"depth": [2, 4, 6]}, data="digits", out="runs/sweep", epochs=10)

See docs/compare.md for what each section measures and how.
"""

from vitkit.compare.compare import DEFAULT_FRACTIONS, compare, explain_best, measure_cost, probe_model
from vitkit.compare.measure import (
    PeakMemory,
    attention_distance_from_maps,
    count_params,
    effective_receptive_field,
    erf_radius,
    inference_throughput,
    loglog_slope,
    mean_attention_distance,
    model_erf,
    model_gmacs,
    occlusion_accuracy,
    rotation_accuracy,
    shift_consistency,
    shift_images,
    train_step_time,
)
from vitkit.compare.units import ModelSpec

__all__ = [
    "DEFAULT_FRACTIONS",
    "ModelSpec",
    "PeakMemory",
    "attention_distance_from_maps",
    "compare",
    "count_params",
    "effective_receptive_field",
    "erf_radius",
    "explain_best",
    "inference_throughput",
    "loglog_slope",
    "mean_attention_distance",
    "measure_cost",
    "model_erf",
    "model_gmacs",
    "occlusion_accuracy",
    "probe_model",
    "rotation_accuracy",
    "shift_consistency",
    "shift_images",
    "train_step_time",
]
