"""Hybrid CNN-ViTs: a Vision Transformer whose patch embedding is a convolutional network.

Read top-down: the configs, `HybridViT` (any zoo CNN truncated at a stage, then the ViT), `HybridCNNViT` (a small
conv stem for small data), then the registered variants.

The ViT paper's hybrids (Dosovitskiy et al. 2021, section 3.1) feed the feature map of a ResNet's stage 3 (stride
16) to the transformer: each feature-map pixel is projected by a 1x1 convolution to one token. The CNN brings
locality and translation equivariance, the transformer global mixing. The models are `VisionTransformer`s: only the
patch embedding differs (`vitkit.layers.HybridEmbed` / `ConvStemEmbed`), so position embeddings, blocks, heads,
attention capture and every tool that reads ViTs work unchanged. Parameter names are timm's
(`vision_transformer_hybrid.py`): `patch_embed.backbone.*` (the CNN, in its own family's layout) and
`patch_embed.proj.*`, then the ViT's `cls_token`, `pos_embed`, `blocks.*`, `norm`, `head`.

config.json stays plain JSON: the backbone is stored by registered name plus its config overrides, and rebuilt
from them on load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vitkit.layers import get_layer
from vitkit.models.base import config_kwargs, config_to_dict
from vitkit.models.registry import create_model, list_models, model_family, register_family, register_model
from vitkit.models.vit import IMAGENET_PRE, JAX_PRE, JAX_PRE_384, VisionTransformer, ViTConfig


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class HybridViTConfig(ViTConfig):
    """A ViT on a CNN backbone. Defaults: R50+ViT-B/16 at 224 px (the paper's hybrid), 1x1 projection to tokens."""

    backbone: str | None = "resnetv2_r50_s16"  # registered zoo model used as the CNN; None only for a foreign module
    backbone_args: dict[str, Any] = field(default_factory=dict)  # its config overrides (JSON), e.g. {"depths": [2]}
    stage: int | None = None  # backbone stage whose map becomes the tokens; None = the stage at stride 16
    patch_size: int = 1  # projection kernel on the feature map: 1 = one token per feature pixel, as in the paper
    embed_layer: str = "hybrid"  # the embedding is the backbone + projection (vitkit.layers.HybridEmbed)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embed_layer != "hybrid":
            raise ValueError(
                f"embed_layer={self.embed_layer!r} is not possible for a HybridViT, which embeds through its CNN "
                "backbone: embed_layer must be 'hybrid' (use a plain ViT, e.g. vit_small_patch16_224, for "
                f"embed_layer={self.embed_layer!r})"
            )
        if self.backbone is not None and self.backbone not in list_models():
            import difflib

            close = difflib.get_close_matches(str(self.backbone), list_models(), n=5, cutoff=0.5)
            raise ValueError(
                f"backbone={self.backbone!r} is not a registered model; "
                + (f"closest: {', '.join(close)}" if close else "see vitkit.list_models() (e.g. resnet50)")
            )
        if not isinstance(self.backbone_args, dict):
            raise TypeError(f"backbone_args must be a dict of config overrides, got {self.backbone_args!r}")
        self.backbone_args = dict(self.backbone_args)
        if self.stage is not None and (isinstance(self.stage, bool) or not isinstance(self.stage, int)):
            raise ValueError(f"stage must be a stage index (int) or None (the stage at stride 16), got {self.stage!r}")


@dataclass
class HybridCNNViTConfig(ViTConfig):
    """A small ViT on a few-conv stem, for small data. Defaults: 32 px input, stride 4 (8x8 tokens), 6 blocks of
    width 384 (the user documents' `HybridCNNViT(n_classes=10, embed_dim=384, depth=6)`)."""

    img_size: int | tuple[int, int] = 32  # native input (H, W); other multiples of patch_size work
    patch_size: int = 4  # total stride of the stem: log2(patch_size) stride-2 3x3 convs (4 -> 8x8 tokens at 32 px)
    num_classes: int = 10  # CIFAR-10 / digits sized by default
    embed_dim: int = 384  # token width (ViT-S width)
    depth: int = 6  # half of ViT-S: small data does not feed 12 blocks
    num_heads: int = 6  # 64 channels per head, as every ViT
    embed_layer: str = "conv_stem"  # 3x3 conv + BN + ReLU stem, then a 1x1 projection (vitkit.layers.ConvStemEmbed)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def _backbone_from_module(module: nn.Module) -> tuple[str | None, dict[str, Any], str | None]:
    """(registered name, config overrides, None) for a zoo model; (None, {}, why) for a module config.json cannot
    describe, the reason being raised only when the hybrid is saved."""
    name = getattr(module, "model_name", None)
    family = getattr(module, "family", None)
    if name is None or name not in list_models() or model_family(name) != family or not hasattr(module, "describe"):
        why = (
            f"its backbone is a {type(module).__name__} module that is not a registered vitkit model (config.json "
            "stores the backbone by registered name and config overrides, to rebuild it on load); build the backbone "
            "with vitkit.create_model(name, ...) or pass its name, or save this model's state_dict with torch.save"
        )
        return None, {}, why
    args = config_to_dict(module.describe())
    args["num_classes"] = 0
    return name, args, None


class HybridViT(VisionTransformer):
    """ViT whose tokens are a CNN's feature map (the ViT paper's hybrid), e.g. `HybridViT("resnet50", n_classes=10)`.

    The CNN runs up to `stage`; a `patch_size` convolution (1 by default) projects its (B, C, H/f, W/f) map to
    (B, H/f * W/f, D) tokens; a class token and learned positions are added and the ViT blocks follow. Inputs must
    be multiples of the total stride f * patch_size (16 for the defaults).

    Args:
        backbone: a registered zoo model name ("resnet50", "convnext_tiny", "resnetv2_r50_s16" ...), or a built
            model with the vitkit contract (its weights are kept, e.g. a pretrained one; it is truncated in place).
            A `HybridViTConfig` here is the whole config (as `vitkit.load_model` passes it).
        cfg: a `HybridViTConfig` to start from.
        **overrides: HybridViTConfig fields (`img_size`, `embed_dim`, `depth`, `num_heads`, `num_classes`,
            `backbone_args`, `stage` ...) and the tutorials' spellings (`n_classes`, `n_heads`, `dim`, `mlp_dim`,
            `in_channels` ...); `out_index` is accepted for `stage`.

    Raises:
        TypeError: a backbone that is not a name nor a module with `feature_info` and `forward_intermediates`.
        ValueError: an unknown backbone name, a stage the backbone does not have, an input size that is not a
            multiple of the total stride; at save time, a backbone module config.json cannot describe.
    """

    family = "vit_hybrid"

    def __init__(self, backbone: str | nn.Module | HybridViTConfig | None = None, cfg: HybridViTConfig | None = None,
                 **overrides):  # fmt: skip
        if isinstance(backbone, HybridViTConfig):
            if cfg is not None:
                raise TypeError("HybridViT: give the config once (as the first argument or as cfg=)")
            backbone, cfg = None, backbone
        if "out_index" in overrides:
            if "stage" in overrides:
                raise TypeError("HybridViT: 'stage' and 'out_index' both set the backbone stage; give one")
            overrides["stage"] = overrides.pop("out_index")
        module, unsavable = None, None
        if isinstance(backbone, str):
            overrides["backbone"] = backbone
        elif isinstance(backbone, nn.Module):
            module = backbone
            if hasattr(module, "reset_classifier"):
                module.reset_classifier(0)  # the head is dropped anyway; described without it, whatever it was
            name, args, unsavable = _backbone_from_module(module)
            overrides.update(backbone=name, backbone_args=args)
        elif backbone is not None:
            raise TypeError(
                f"HybridViT: backbone must be a registered model name or an nn.Module, got {type(backbone).__name__}"
            )
        overrides = config_kwargs(HybridViTConfig, overrides, base=cfg)
        cfg = HybridViTConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        if cfg.backbone is None and module is None:
            raise ValueError("HybridViT: backbone=None needs a backbone module; pass a registered name or a module")
        # Handed to build_patch_embed, which VisionTransformer.__init__ calls before any submodule exists (so not
        # through nn.Module's attribute machinery).
        self.__dict__["_pending_backbone"] = module
        super().__init__(cfg)
        self._unsavable = unsavable

    def build_patch_embed(self, cfg: HybridViTConfig) -> nn.Module:
        """The backbone (built from its name, or the given module) + projection as the patch embedding."""
        backbone = self.__dict__.pop("_pending_backbone", None)
        if backbone is None:
            backbone = create_model(cfg.backbone, **{**cfg.backbone_args, "num_classes": 0, "in_chans": cfg.in_chans})
        else:
            chans = getattr(getattr(backbone, "cfg", None), "in_chans", cfg.in_chans)
            if chans != cfg.in_chans:
                raise ValueError(
                    f"the backbone takes {chans} input channels but in_chans={cfg.in_chans}; make them agree"
                )
        return get_layer("embed", cfg.embed_layer)(
            cfg.patch_size, cfg.in_chans, cfg.embed_dim, backbone=backbone, stage=cfg.stage
        )

    def describe(self) -> HybridViTConfig:
        """The config as it is now, for saving.

        Raises:
            ValueError: the backbone was given as a module that config.json cannot describe (naming why), or a
                head config.json cannot describe.
        """
        if self._unsavable is not None:
            raise ValueError(f"cannot save this {type(self).__name__}: {self._unsavable}")
        return super().describe()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's (and the backbone's blocks') activations in the backward pass."""
        super().set_grad_checkpointing(enable)
        if hasattr(self.patch_embed.backbone, "set_grad_checkpointing"):
            self.patch_embed.backbone.set_grad_checkpointing(enable)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per ViT block: `num_chs` = D, `reduction` = the total stride (backbone stage x patch size)."""
        stride = self.patch_embed.stride[0]
        return [
            {"num_chs": self.embed_dim, "reduction": stride, "module": f"blocks.{i}"} for i in range(len(self.blocks))
        ]

    def _source_stride(self, source_cfg: dict[str, Any]) -> tuple[int, int]:
        """Pixels per token of the source of a state dict (`adapt_state_dict` resamples its position table): the
        source is assumed to share this model's total stride (same backbone, stage and patch size)."""
        return tuple(self.patch_embed.stride)


class HybridCNNViT(VisionTransformer):
    """A small ViT on a convolutional stem, for small datasets: `HybridCNNViT(n_classes=10, embed_dim=384, depth=6)`.

    A few 3x3 stride-2 convolutions with BatchNorm and ReLU (log2(patch_size) of them) turn a 32-64 px image into
    an (H/4 or H/8)-sided grid of tokens; then class token, positions and ViT blocks as usual. The conv stem's
    locality prior is what lets a transformer learn from thousands rather than millions of images.

    Args:
        cfg: a `HybridCNNViTConfig`; its defaults when None.
        **overrides: its fields and the tutorials' spellings (`n_classes`, `n_heads`, `dim`, `in_channels` ...).
    """

    family = "vit_hybrid_cnn"

    def __init__(self, cfg: HybridCNNViTConfig | None = None, **overrides):
        overrides = config_kwargs(HybridCNNViTConfig, overrides, base=cfg)
        cfg = HybridCNNViTConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        super().__init__(cfg)


register_family("vit_hybrid", HybridViTConfig, HybridViT)
register_family("vit_hybrid_cnn", HybridCNNViTConfig, HybridCNNViT)


# ----------------------------------------------------------------------------------------------------------------
# Variants. The paper's hybrids under timm's names: R50 (3, 4, 9) to stride 16, or R26 (2, 2, 2, 2) to stride 32,
# with a 1x1 projection; then the small-data models.
# ----------------------------------------------------------------------------------------------------------------
def _register_hybrid(
    name: str, backbone: str, stage: int, width: tuple[int, int, int], size: int, doc: str, pre: dict
) -> None:
    dim, depth, heads = width

    def builder(**overrides) -> HybridViT:
        base = HybridViTConfig(
            backbone=backbone, stage=stage, embed_dim=dim, depth=depth, num_heads=heads, img_size=size
        )
        # cfg= by keyword: a `backbone=` override (a name or a module) then binds to HybridViT's backbone argument.
        return HybridViT(cfg=base, **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    register_model(name, family="vit_hybrid", preprocess=pre)(builder)


R50, R26 = "resnetv2_r50_s16", "resnetv2_r26_s32"
_register_hybrid("vit_base_r50_s16_224", R50, 2, (768, 12, 12), 224, "R50+ViT-B/16, 97.9M params.", JAX_PRE)
_register_hybrid("vit_base_r50_s16_384", R50, 2, (768, 12, 12), 384, "R50+ViT-B/16 at 384 px.", JAX_PRE_384)
_register_hybrid("vit_small_r26_s32_224", R26, 3, (384, 12, 6), 224, "R26+ViT-S/32, 36.4M params.", JAX_PRE)


def _register_cnn_vit(name: str, width: tuple[int, int, int], patch: int, size: int, doc: str) -> None:
    dim, depth, heads = width

    def builder(**overrides) -> HybridCNNViT:
        base = HybridCNNViTConfig(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=size)
        return HybridCNNViT(base, **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    register_model(name, family="vit_hybrid_cnn", preprocess=IMAGENET_PRE)(builder)


_register_cnn_vit("vit_hybrid_cnn_tiny_s4_32", (192, 6, 3), 4, 32, "Conv stem (stride 4) + 6 blocks of 192, 32 px.")
_register_cnn_vit("vit_hybrid_cnn_small_s4_32", (384, 6, 6), 4, 32, "Conv stem (stride 4) + 6 blocks of 384, 32 px.")
_register_cnn_vit("vit_hybrid_cnn_small_s8_64", (384, 6, 6), 8, 64, "Conv stem (stride 8) + 6 blocks of 384, 64 px.")
