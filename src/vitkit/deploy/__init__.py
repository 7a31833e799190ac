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

__all__ = ["ExportCheckError", "check_export", "export_model", "load_export_source", "read_metadata", "size_rule"]
