"""vitkit: Vision Transformers on PyTorch.

import vitkit
model = vitkit.create_model("vit_small_patch16_224", num_classes=10)
logits, attentions = model(images, return_attention=[-1])
"""

from vitkit._version import __version__
from vitkit.models import (  # noqa: E402
    HybridCNNViT,
    HybridViT,
    VisionTransformer,
    ViTConfig,
    ViTDETR,
    create_model,
    create_vit_base,
    create_vit_huge,
    create_vit_large,
    create_vit_model,
    create_vit_small,
    create_vit_tiny,
    list_models,
)
from vitkit.weights import load_native, save_pretrained  # noqa: E402


def load_model(path: str, **kwargs):
    """Load a model from a local path: a vitkit model or run directory, or a foreign checkpoint (see vitkit.weights).

    A run directory (from `vitkit train`) loads its best/ checkpoint, else last/, and says which on stderr.
    """
    from vitkit.weights import load_model as _load

    return _load(path, **kwargs)


__all__ = [
    "HybridCNNViT",
    "HybridViT",
    "VisionTransformer",
    "ViTConfig",
    "ViTDETR",
    "__version__",
    "create_model",
    "create_vit_base",
    "create_vit_huge",
    "create_vit_large",
    "create_vit_model",
    "create_vit_small",
    "create_vit_tiny",
    "list_models",
    "load_model",
    "load_native",
    "save_pretrained",
]
