"""Deployment: exporting models (ONNX, torch.export) and int8 post-training quantization.

Sits beside `vitkit.explain` in the data flow (layers -> models -> weights -> data -> train -> explain/deploy -> cli):
it may use models, weights and data (for calibration and the preprocessing recorded in exports), never the CLI.
"""

from vitkit.deploy.export import (
    ExportCheckError,
    check_export,
    export_model,
    load_export_source,
    read_metadata,
    size_rule,
)
from vitkit.deploy.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_METHOD,
    Int8Method,
    Int8Model,
    calibration_batches,
    evaluate_int8,
    load_int8,
    predict_int8,
    quantize,
    save_int8,
)

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_METHOD",
    "ExportCheckError",
    "Int8Method",
    "Int8Model",
    "calibration_batches",
    "check_export",
    "evaluate_int8",
    "export_model",
    "load_export_source",
    "load_int8",
    "predict_int8",
    "quantize",
    "read_metadata",
    "save_int8",
    "size_rule",
]
