"""Model families and the registry. Importing this package registers every variant."""

from vitkit.models.convnext import ConvNeXt, ConvNeXtConfig  # registers the ConvNeXt family
from vitkit.models.registry import create_model, get_family, list_models, register_family, register_model
from vitkit.models.vit import (  # noqa: I001  (registers the ViT family)
    VisionTransformer,
    ViTConfig,
    create_vit_base,
    create_vit_huge,
    create_vit_large,
    create_vit_model,
    create_vit_small,
    create_vit_tiny,
)

__all__ = [
    "ConvNeXt",
    "ConvNeXtConfig",
    "VisionTransformer",
    "ViTConfig",
    "create_model",
    "create_vit_base",
    "create_vit_huge",
    "create_vit_large",
    "create_vit_model",
    "create_vit_small",
    "create_vit_tiny",
    "get_family",
    "list_models",
    "register_family",
    "register_model",
]
