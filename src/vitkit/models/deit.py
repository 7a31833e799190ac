"""DeiT: data-efficient image transformers (Touvron et al. 2021, "Training data-efficient image transformers &
distillation through attention").

Read top-down: the config, the model, then the registered variants.

A DeiT is a ViT (`vitkit.models.vit`) trained on ImageNet-1k alone with strong augmentation. The distilled
variants add a second learned token next to the class token: the distillation token, with its own classifier
`head_dist`, is trained to match a CNN teacher's predictions while the class token matches the labels. At
inference the two heads' logits are averaged; in training (`set_distilled_training(True)`) both are returned so a
distillation objective can use them. The token layout, position table and two-head averaging are the
VisionTransformer's (`distilled=True`); this family adds the training-time outputs, the one-head layout of
transformers' `DeiTForImageClassification` (`dist_head=False`) and the DeiT names with their preprocessing.
Parameter names follow timm (`dist_token`, `head_dist.*`), so timm DeiT state dicts load as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vitkit.models.base import config_kwargs
from vitkit.models.registry import register_family, register_model
from vitkit.models.vit import IMAGENET_PRE, WIDTHS, Pool, VisionTransformer, ViTConfig


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DeiTConfig(ViTConfig):
    """Architecture of a DeiT: a ViTConfig (defaults DeiT-B/16 at 224 px) plus where the distillation token goes.

    `distilled` (inherited) adds the distillation token after the class token, with a position of its own.
    """

    # A classifier on the distillation token, averaged with the class token's. None = exactly when distilled
    # (timm's deit_*_distilled and transformers' DeiTForImageClassificationWithTeacher). False with distilled=True
    # = the token is kept but only the class token is classified, as in transformers' DeiTForImageClassification.
    dist_head: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dist_head is not None and not isinstance(self.dist_head, bool):
            raise TypeError(f"dist_head must be True, False or None, got {self.dist_head!r}")
        if self.dist_head and not self.distilled:
            raise ValueError("dist_head=True needs distilled=True (the head reads the distillation token)")

    @property
    def has_dist_head(self) -> bool:
        """Whether the distillation token has its own classifier (`head_dist`)."""
        return self.distilled if self.dist_head is None else self.dist_head


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class DeiT(VisionTransformer):
    """DeiT classifier: a VisionTransformer with the optional distillation token and head.

    Token layout: [class, distillation (distilled only), patches...]. Logits are the class token's head, or with a
    distillation head the mean of both heads; in training mode after `set_distilled_training(True)` the forward
    returns the two heads' logits `(cls_logits, dist_logits)` instead (timm's behaviour).

    Args:
        cfg: architecture; `DeiTConfig()` (DeiT-B/16, not distilled) when None. A ViTConfig is accepted and
            converted.
        **overrides: fields of DeiTConfig to change, with the spellings VisionTransformer accepts.
    """

    family = "deit"

    def __init__(self, cfg: DeiTConfig | ViTConfig | None = None, **overrides):
        if cfg is not None and not isinstance(cfg, DeiTConfig):
            if not isinstance(cfg, ViTConfig):
                raise TypeError(f"DeiT takes a DeiTConfig (or a ViTConfig), got {type(cfg).__name__}")
            cfg = DeiTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ViTConfig)})
        overrides = config_kwargs(DeiTConfig, overrides, base=cfg)
        cfg = DeiTConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        super().__init__(cfg)
        if not self.cfg.has_dist_head:
            self.head_dist = None  # the distillation token (if any) still runs through the blocks, unclassified
        self.distilled_training = False

    def describe(self) -> DeiTConfig:
        """The config of the model as it is now; `dist_head` follows a `head_dist` assigned or removed by hand."""
        cfg = super().describe()
        has = self.head_dist is not None
        return cfg if has == cfg.has_dist_head else dataclasses.replace(cfg, dist_head=has)

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return `(cls_logits, dist_logits)` instead of their mean (for a distillation loss).

        Eval mode always returns the mean. Off by default, so a plain classification loss keeps working.

        Raises:
            ValueError: enabling it on a model without a distillation head.
        """
        if enable and self.head_dist is None:
            raise ValueError(
                f"set_distilled_training(True) needs a distillation head; this model has distilled="
                f"{self.cfg.distilled}, dist_head={self.cfg.dist_head} (use a deit_*_distilled_* model)"
            )
        self.distilled_training = bool(enable)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, token_sizes: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, D) -> logits (B, classes); in distilled training, `(cls_logits, dist_logits)`."""
        if pre_logits or self.head_dist is None or not (self.distilled_training and self.training):
            return super().forward_head(x, pre_logits=pre_logits, token_sizes=token_sizes)
        x_cls, x_dist = self.fc_norm(x[:, 0]), self.fc_norm(x[:, 1])  # (B, D) each: class, distillation token
        return self.head(self.head_drop(x_cls)), self.head_dist(self.head_drop(x_dist))

    def reset_classifier(self, num_classes: int, pool: Pool | None = None) -> None:
        """Replace the head(s) (randomly initialised) for `num_classes` outputs; 0 removes them.

        Raises:
            ValueError: a pool other than 'token' for a model with a distillation token.
        """
        if pool not in (None, "token") and self.cfg.distilled:
            raise ValueError(
                f"a DeiT with a distillation token reads its leading tokens; pool={pool!r} is not possible"
            )
        super().reset_classifier(num_classes, pool=pool)


register_family("deit", DeiTConfig, DeiT)


# ----------------------------------------------------------------------------------------------------------------
# Variants (timm's names): patch 16 at 224 px, widths of the DeiT paper (Ti 192, S 384, B 768).
# ----------------------------------------------------------------------------------------------------------------
def _register_deit(name: str, width: str, distilled: bool, doc: str) -> None:
    def builder(**overrides) -> DeiT:
        dim, depth, heads = WIDTHS[width]
        # The variant first, so spellings such as mlp_dim resolve against this width.
        base = DeiTConfig(embed_dim=dim, depth=depth, num_heads=heads, patch_size=16, img_size=224, distilled=distilled)
        return DeiT(base, **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    # DeiT was trained with ImageNet mean/std and evaluated with a bicubic resize to 256 and a 224 centre crop.
    register_model(name, family="deit", preprocess={**IMAGENET_PRE, "interpolation": "bicubic"})(builder)


_register_deit("deit_tiny_patch16_224", "tiny", False, "DeiT-Ti, 5.7M params.")
_register_deit("deit_small_patch16_224", "small", False, "DeiT-S, 22.1M params.")
_register_deit("deit_base_patch16_224", "base", False, "DeiT-B, 86.6M params.")
_register_deit("deit_tiny_distilled_patch16_224", "tiny", True, "DeiT-Ti distilled (2 heads), 5.9M params.")
_register_deit("deit_small_distilled_patch16_224", "small", True, "DeiT-S distilled (2 heads), 22.4M params.")
_register_deit("deit_base_distilled_patch16_224", "base", True, "DeiT-B distilled (2 heads), 87.3M params.")
