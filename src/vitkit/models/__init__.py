"""Model families and the registry. Importing this package registers every variant."""

# Import order = registration order = the order `vitkit models` lists the families in (hence noqa: I001).
from vitkit.models.registry import create_model, get_family, list_models, register_family, register_model  # noqa: I001
from vitkit.models.vit import (
    VisionTransformer,
    ViTConfig,
    create_vit_base,
    create_vit_huge,
    create_vit_large,
    create_vit_model,
    create_vit_small,
    create_vit_tiny,
)
from vitkit.models.deit import DeiT, DeiTConfig
from vitkit.models.swin import SwinConfig, SwinTransformer
from vitkit.models.convnext import ConvNeXt, ConvNeXtConfig
from vitkit.models.resnet import ResNet, ResNetConfig
from vitkit.models.resnetv2 import ResNetV2, ResNetV2Config
from vitkit.models.hybrid import HybridCNNViT, HybridCNNViTConfig, HybridViT, HybridViTConfig
from vitkit.models.mae import MAEConfig, MaskedAutoencoderViT, mae_from_vit
from vitkit.models.segmentation import SegmentationConfig, ViTSegmentation, ViTUNet, ViTUNetConfig
from vitkit.models.detr import DETRConfig, ViTDETR

__all__ = [
    "ConvNeXt",
    "ConvNeXtConfig",
    "DETRConfig",
    "DeiT",
    "DeiTConfig",
    "HybridCNNViT",
    "HybridCNNViTConfig",
    "HybridViT",
    "HybridViTConfig",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "ResNet",
    "ResNetConfig",
    "ResNetV2",
    "ResNetV2Config",
    "SegmentationConfig",
    "SwinConfig",
    "SwinTransformer",
    "VisionTransformer",
    "ViTConfig",
    "ViTSegmentation",
    "ViTUNet",
    "ViTUNetConfig",
    "ViTDETR",
    "create_model",
    "create_vit_base",
    "create_vit_huge",
    "create_vit_large",
    "create_vit_model",
    "create_vit_small",
    "create_vit_tiny",
    "get_family",
    "list_models",
    "mae_from_vit",
    "register_family",
    "register_model",
]
