"""Semantic segmentation heads on any backbone of the zoo: a linear head, Segmenter's mask transformer, a UNETR decoder.

Read top-down: the configs, the shared backbone wrapper, the heads (`LinearHead`, `MaskTransformer`, `UNETRDecoder`),
the two models (`ViTSegmentation`, `ViTUNet`) and their registration.

Every head reads the backbone through the model contract only: `forward_intermediates(x, indices, as_maps=True)`
gives (B, C_i, H_i, W_i) maps for any family (a ViT's patch tokens on their grid with the prefix tokens dropped;
Swin / ConvNeXt / ResNet / hybrid feature maps), and `feature_info` says their widths and strides. The output is
(B, K, H, W) logits at the input size, for square and non-square inputs alike.

- Linear (Strudel et al. 2021, the "linear" baseline): a 1x1 projection of the last features to K classes, upsampled
  bilinearly.
- Segmenter's mask transformer (Strudel et al. 2021): K learned class embeddings join the patch tokens in a few
  transformer layers; masks are the scalar products of L2-normalised patch features and class embeddings.
- UNETR (Hatamizadeh et al. 2022): features from several depths are brought to successively finer resolutions by
  transposed convolutions and fused with the upsampled deeper state, ending with a skip from the image itself.

config.json stays plain JSON: the backbone is stored by registered name plus its config overrides (as the hybrid
ViTs store theirs) and rebuilt from them by `vitkit.load_model`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.block import Block
from vitkit.models.base import Preprocess, check_literal, config_kwargs
from vitkit.models.hybrid import _backbone_from_module
from vitkit.models.registry import create_model, list_models, register_family
from vitkit.models.serialization import save_pretrained

SegHead = Literal["linear", "segmenter"]
SEG_HEADS: tuple[str, ...] = ("linear", "segmenter", "unetr")  # what `vitkit train --seg-head` offers


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
def _check_backbone(backbone: str | None, backbone_args: Any) -> None:
    if backbone is not None and backbone not in list_models():
        import difflib

        close = difflib.get_close_matches(str(backbone), list_models(), n=5, cutoff=0.5)
        raise ValueError(
            f"backbone={backbone!r} is not a registered model; "
            + (f"closest: {', '.join(close)}" if close else "see vitkit.list_models() (e.g. vit_nano_patch4_32)")
        )
    if not isinstance(backbone_args, dict):
        raise TypeError(f"backbone_args must be a dict of config overrides, got {backbone_args!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class SegmentationConfig:
    """A per-pixel classifier on a backbone's last features. Defaults: a 1.2M-parameter ViT, background + 4 classes."""

    backbone: str | None = "vit_nano_patch4_32"  # registered zoo model; None only for a foreign module (not savable)
    backbone_args: dict[str, Any] = field(default_factory=dict)  # its config overrides (JSON), e.g. {"img_size": 64}
    num_classes: int = 5  # K, background included (the procedural scenes: background + 4 shapes)
    head: SegHead = "linear"  # linear: 1x1 projection; segmenter: Strudel et al.'s mask transformer
    feature_index: int = -1  # which `feature_info` entry feeds the head (-1 = the last block / stage)
    decoder_depth: int = 2  # segmenter: transformer layers over patch tokens + class embeddings (the paper's 2)
    decoder_dim: int | None = None  # segmenter: their width; None = the backbone feature width (as the paper)
    decoder_heads: int | None = None  # segmenter: attention heads; None = width / 64 (at least 1), as ViTs
    drop_rate: float = 0.0  # dropout on the features before the linear head

    def __post_init__(self) -> None:
        _check_backbone(self.backbone, self.backbone_args)
        self.backbone_args = dict(self.backbone_args)
        check_literal("head", self.head, SegHead)
        _check_positive("num_classes", self.num_classes)
        _check_positive("decoder_depth", self.decoder_depth)
        for name in ("decoder_dim", "decoder_heads"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if isinstance(self.feature_index, bool) or not isinstance(self.feature_index, int):
            raise ValueError(f"feature_index must be an int (a feature_info index), got {self.feature_index!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")


@dataclass
class ViTUNetConfig:
    """A UNETR-style decoder with skips from several depths of a backbone and from the image itself."""

    backbone: str | None = "vit_nano_patch4_32"  # registered zoo model; None only for a foreign module (not savable)
    backbone_args: dict[str, Any] = field(default_factory=dict)  # its config overrides (JSON)
    num_classes: int = 5  # K, background included
    # Features that feed the decoder (feature_info indices, any order). None = UNETR's choice: for a token model of
    # stride P, log2(P) evenly spaced blocks ending at the last (ViT-B/16: blocks 3, 6, 9, 12); every stage of a
    # hierarchical one (Swin, ConvNeXt, ResNet).
    skip_indices: tuple[int, ...] | None = None
    decoder_channels: int = (
        16  # width at full resolution (UNETR's feature_size, 16); doubles per halving, capped at 256
    )

    def __post_init__(self) -> None:
        _check_backbone(self.backbone, self.backbone_args)
        self.backbone_args = dict(self.backbone_args)
        _check_positive("num_classes", self.num_classes)
        _check_positive("decoder_channels", self.decoder_channels)
        if self.skip_indices is not None:
            self.skip_indices = tuple(self.skip_indices)
            if not self.skip_indices or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.skip_indices
            ):
                raise ValueError(f"skip_indices must be a non-empty list of ints or None, got {self.skip_indices!r}")


# ----------------------------------------------------------------------------------------------------------------
# The backbone wrapper shared by both models
# ----------------------------------------------------------------------------------------------------------------
class _SegmentationModel(nn.Module):
    """A backbone (zoo name or module) + a dense head; the model contract where it applies to a dense model."""

    family: str
    config_cls: type

    def _init_backbone(self, backbone: Any, cfg: Any, overrides: dict[str, Any]) -> tuple[Any, nn.Module]:
        """(the config, the backbone module): `backbone` is a name, a contract module or the whole config."""
        name = type(self).__name__
        if isinstance(backbone, self.config_cls):
            if cfg is not None:
                raise TypeError(f"{name}: give the config once (as the first argument or as cfg=)")
            backbone, cfg = None, backbone
        module, self._unsavable = None, None
        if isinstance(backbone, str):
            overrides["backbone"] = backbone
        elif isinstance(backbone, nn.Module):
            if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "feature_info"):
                raise TypeError(
                    f"{name}: the backbone {type(backbone).__name__} has no forward_intermediates/feature_info (the "
                    "model contract); use a vitkit zoo model (vitkit.create_model) or its name"
                )
            module = backbone
            if hasattr(module, "reset_classifier"):
                module.reset_classifier(0)  # a dense head replaces the classifier; described without it
            bname, args, self._unsavable = _backbone_from_module(module)
            overrides.update(backbone=bname, backbone_args=args)
        elif backbone is not None:
            raise TypeError(
                f"{name}: backbone must be a registered model name or an nn.Module, got {type(backbone).__name__}"
            )
        overrides = config_kwargs(self.config_cls, overrides)
        cfg = self.config_cls(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        if module is None:
            if cfg.backbone is None:
                raise ValueError(f"{name}: backbone=None needs a backbone module; pass a registered name or a module")
            module = create_model(cfg.backbone, **{**cfg.backbone_args, "num_classes": 0})
        if getattr(module, "tome_r", None) is not None and any(module.tome_r):
            raise ValueError(f"{name}: the backbone merges tokens (ToMe), which removes the patch grid; set_tome(0)")
        return cfg, module

    def _finish_init(self) -> None:
        pre = getattr(self.backbone, "preprocess", None)
        # The backbone's normalisation and input size; class names are the segmentation classes (set by training).
        self.preprocess = dataclasses.replace(pre, class_names=None) if pre is not None else Preprocess()

    def _features(self, x: Tensor, indices: list[int]) -> list[Tensor]:
        """(B, C_i, H_i, W_i) maps of the chosen `feature_info` entries. `norm=True`: a ViT's final norm on each
        (the features its later blocks and a classifier were trained to read); a no-op for the CNN families."""
        return self.backbone.forward_intermediates(x, indices, as_maps=True, norm=True)

    # --- the contract, where it applies ---------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def describe(self) -> Any:
        """The config as it is now, for saving.

        Raises:
            ValueError: the backbone was given as a module that config.json cannot describe.
        """
        if self._unsavable is not None:
            raise ValueError(f"cannot save this {type(self).__name__}: {self._unsavable}")
        return dataclasses.replace(self.cfg)

    def save_pretrained(self, directory, **extra) -> None:
        """Write `config.json` + `model.safetensors` (atomically); `vitkit.load_model(directory)` rebuilds it."""
        save_pretrained(self, directory, **extra)

    def is_classifier(self, name: str) -> bool:
        """Head parameters (the whole decoder): `head_lr_mult` applies to them, as to a classifier."""
        return not name.startswith("backbone.")

    def no_weight_decay(self) -> set[str]:
        own = {"backbone." + n for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
        return own | {n for n, _ in self.named_parameters() if n.endswith("cls_emb")}

    @property
    def num_layer_ids(self) -> int:
        return int(self.backbone.num_layer_ids)

    def layer_id(self, name: str) -> int:
        """The backbone's layer ids (layer-wise LR decay, freezing); the head is in the last id, as a classifier."""
        if name.startswith("backbone."):
            return int(self.backbone.layer_id(name.removeprefix("backbone.")))
        return self.num_layer_ids - 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not hasattr(self.backbone, "set_grad_checkpointing"):
            raise TypeError(f"the backbone {type(self.backbone).__name__} has no set_grad_checkpointing")
        self.backbone.set_grad_checkpointing(enable)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The backbone's (`module` names prefixed with `backbone.`)."""
        return [{**fi, "module": f"backbone.{fi['module']}"} for fi in self.backbone.feature_info]


def _resolve_index(index: int, n: int, what: str) -> int:
    if not -n <= index < n:
        raise ValueError(
            f"{what} {index} is out of range for a backbone with {n} feature_info entries (use {-n}..{n - 1})"
        )
    return index % n


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------
class LinearHead(nn.Module):
    """(B, C, h, w) features -> (B, K, h, w) logits by one 1x1 projection."""

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.proj = nn.Conv2d(in_chs, num_classes, kernel_size=1)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, f: Tensor) -> Tensor:
        return self.proj(self.drop(f))


class MaskTransformer(nn.Module):
    """Segmenter's decoder (Strudel et al. 2021, section 3.2): K class embeddings processed jointly with the patch
    tokens; mask k at a patch = <normalised patch feature, normalised class embedding k>, then a LayerNorm over K."""

    def __init__(self, in_chs: int, num_classes: int, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder_dim {dim} is not divisible by decoder_heads {num_heads}")
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(in_chs, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Linear(dim, dim, bias=False)
        self.proj_classes = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, f: Tensor) -> Tensor:
        B, _, h, w = f.shape
        x = self.proj_dec(f.flatten(2).transpose(1, 2))  # (B, h*w, dim)
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)  # (B, h*w + K, dim)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(self.proj_patch(x[:, : h * w]), dim=-1)  # (B, h*w, dim)
        classes = F.normalize(self.proj_classes(x[:, h * w :]), dim=-1)  # (B, K, dim)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h*w, K)
        return masks.transpose(1, 2).reshape(B, self.num_classes, h, w)  # (B, K, h, w)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each with BatchNorm and ReLU (UNETR's blocks, with BatchNorm)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


class Upsample(nn.Sequential):
    """`steps` x2 transposed convolutions (each followed by a ConvBlock except the last when `refine` is off)."""

    def __init__(self, in_chs: int, out_chs: int, steps: int, refine: bool) -> None:
        layers: list[nn.Module] = []
        for s in range(steps):
            layers.append(nn.ConvTranspose2d(in_chs if s == 0 else out_chs, out_chs, kernel_size=2, stride=2))
            if refine:
                layers.append(ConvBlock(out_chs, out_chs))
        if not steps:  # same resolution: only a projection to the level's width
            layers.append(ConvBlock(in_chs, out_chs) if refine else nn.Conv2d(in_chs, out_chs, 1))
        super().__init__(*layers)


def _fit(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize to `size` where strides do not divide the input (e.g. ceil-rounded Swin stages); exact sizes pass."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UNETRDecoder(nn.Module):
    """Features of several depths (deep to shallow, with strides `reductions`) + the image -> (B, K, H, W).

    The deepest map is the initial state at its stride t_0. Level j brings the state to stride
    t_j = max(1, min(r_j, t_{j-1} // 2)) by transposed convolutions, brings skip j from its stride r_j to t_j the same
    way (each step refined by a ConvBlock, UNETR's "blue blocks"), concatenates and fuses them. A last level at full
    resolution fuses a ConvBlock of the image itself, and a 1x1 convolution gives the logits.
    """

    def __init__(self, in_chs: list[int], reductions: list[int], img_chs: int, num_classes: int, channels: int) -> None:
        super().__init__()

        def width(t: int) -> int:
            return min(channels * t, 256)

        self.strides = [int(reductions[0])]
        self.skips = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        state_chs, t_prev = in_chs[0], int(reductions[0])
        for chs, r in zip(in_chs[1:], reductions[1:]):
            t = max(1, min(int(r), t_prev // 2))
            self.skips.append(Upsample(chs, width(t), round(math.log2(max(r / t, 1))), refine=True))
            self.ups.append(Upsample(state_chs, width(t), round(math.log2(max(t_prev / t, 1))), refine=False))
            self.fuse.append(ConvBlock(2 * width(t), width(t)))
            self.strides.append(t)
            state_chs, t_prev = width(t), t
        self.image_skip = ConvBlock(img_chs, width(1))
        self.up_final = Upsample(state_chs, width(1), round(math.log2(max(t_prev, 1))), refine=False)
        self.fuse_final = ConvBlock(2 * width(1), width(1))
        self.classifier = nn.Conv2d(width(1), num_classes, kernel_size=1)

    def forward(self, feats: list[Tensor], image: Tensor) -> Tensor:
        H, W = image.shape[-2:]
        x = feats[0]
        for f, t, skip, up, fuse in zip(feats[1:], self.strides[1:], self.skips, self.ups, self.fuse):
            size = (math.ceil(H / t), math.ceil(W / t))
            x = fuse(torch.cat([_fit(up(x), size), _fit(skip(f), size)], dim=1))  # (B, width(t), H/t, W/t)
        x = _fit(self.up_final(x), (H, W))
        x = self.fuse_final(torch.cat([x, self.image_skip(image)], dim=1))  # (B, width(1), H, W)
        return self.classifier(x)  # (B, K, H, W)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class ViTSegmentation(_SegmentationModel):
    """A backbone + a linear or Segmenter head: images (B, C, H, W) -> logits (B, K, H, W) at the input size.

    `ViTSegmentation(vit_model, num_classes)` as in the user documents; `head="segmenter"` for the mask transformer.

    Args:
        backbone: a registered zoo name ("vit_nano_patch4_32", "swin_tiny_patch4_window7_224" ...), a built zoo model
            (its weights are kept, e.g. a pretrained classifier; its classifier is removed) or a whole
            `SegmentationConfig` (as `vitkit.load_model` passes it).
        num_classes: K classes, background included.
        head: "linear" or "segmenter".
        cfg: a `SegmentationConfig` to start from.
        **overrides: other `SegmentationConfig` fields (`backbone_args`, `decoder_depth`, `feature_index` ...).

    Raises:
        TypeError: a backbone that is neither a name nor a module with `forward_intermediates` and `feature_info`.
        ValueError: an unknown backbone name or head, a feature index the backbone does not have; at save time, a
            backbone module config.json cannot describe.
    """

    family = "segmentation"
    config_cls = SegmentationConfig

    def __init__(
        self,
        backbone: str | nn.Module | SegmentationConfig | None = None,
        num_classes: int | None = None,
        head: SegHead | None = None,
        cfg: SegmentationConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        overrides.update({k: v for k, v in (("num_classes", num_classes), ("head", head)) if v is not None})
        self.cfg, self.backbone = self._init_backbone(backbone, cfg, overrides)
        info = self.backbone.feature_info
        self.index = _resolve_index(self.cfg.feature_index, len(info), "feature_index")
        chs = int(info[self.index]["num_chs"])
        if self.cfg.head == "linear":
            self.head = LinearHead(chs, self.cfg.num_classes, self.cfg.drop_rate)
        else:
            dim = self.cfg.decoder_dim or chs
            heads = self.cfg.decoder_heads or max(1, dim // 64)
            self.head = MaskTransformer(chs, self.cfg.num_classes, dim, self.cfg.decoder_depth, heads)
        self._finish_init()

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> per-pixel class logits (B, K, H, W)."""
        f = self._features(x, [self.index])[0]  # (B, C, h, w)
        logits = self.head(f)  # (B, K, h, w)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)


class ViTUNet(_SegmentationModel):
    """A backbone + a UNETR-style decoder with skips from several depths: images (B, C, H, W) -> logits (B, K, H, W).

    `ViTUNet(vit_model, num_classes)` as in the user documents (the brain-tumour example). Works on every family:
    a ViT's blocks all have one stride, so its skips are brought to finer resolutions by transposed convolutions
    (UNETR); a hierarchical backbone's stages already have decreasing strides.

    Args:
        backbone: a registered zoo name, a built zoo model (weights kept, classifier removed) or a `ViTUNetConfig`.
        num_classes: K classes, background included.
        cfg: a `ViTUNetConfig` to start from.
        **overrides: other `ViTUNetConfig` fields (`skip_indices`, `decoder_channels`, `backbone_args`).

    Raises:
        TypeError / ValueError: as `ViTSegmentation`; a skip index the backbone does not have.
    """

    family = "segmentation_unet"
    config_cls = ViTUNetConfig

    def __init__(
        self,
        backbone: str | nn.Module | ViTUNetConfig | None = None,
        num_classes: int | None = None,
        cfg: ViTUNetConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        self.cfg, self.backbone = self._init_backbone(backbone, cfg, overrides)
        info = self.backbone.feature_info
        self.indices = sorted(
            {_resolve_index(i, len(info), "skip index") for i in (self.cfg.skip_indices or default_skips(info))},
            reverse=True,
        )  # deep to shallow
        in_chans = getattr(getattr(self.backbone, "cfg", None), "in_chans", 3)
        self.decoder = UNETRDecoder(
            [int(info[i]["num_chs"]) for i in self.indices],
            [int(info[i]["reduction"]) for i in self.indices],
            in_chans,
            self.cfg.num_classes,
            self.cfg.decoder_channels,
        )
        self._finish_init()

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> per-pixel class logits (B, K, H, W)."""
        feats = self._features(x, sorted(self.indices))[::-1]  # deep to shallow, each (B, C_i, H_i, W_i)
        return self.decoder(feats, x)


def default_skips(info: list[dict[str, Any]]) -> list[int]:
    """UNETR's skips: every stage of a hierarchical backbone; for a single-stride token model of stride P,
    log2(P) (at least 1, at most 4) evenly spaced blocks ending at the last (12 blocks, P=16: 2, 5, 8, 11)."""
    n = len(info)
    if len({int(fi["reduction"]) for fi in info}) > 1:
        return list(range(n))
    k = min(4, n, max(1, round(math.log2(max(int(info[-1]["reduction"]), 2)))))
    return sorted({max(0, round(n * (j + 1) / k) - 1) for j in range(k)})


register_family(ViTSegmentation.family, SegmentationConfig, ViTSegmentation)
register_family(ViTUNet.family, ViTUNetConfig, ViTUNet)


def segmentation_model(
    backbone: str | nn.Module,
    num_classes: int,
    head: Literal["linear", "segmenter", "unetr"] = "linear",
    **overrides: Any,
) -> nn.Module:
    """`ViTUNet` for head="unetr", else `ViTSegmentation` with that head (what `vitkit train --seg-head` builds).

    Raises:
        ValueError: an unknown head, naming the allowed ones.
    """
    check_literal("head", head, Literal["linear", "segmenter", "unetr"])
    if head == "unetr":
        return ViTUNet(backbone, num_classes, **overrides)
    return ViTSegmentation(backbone, num_classes, head, **overrides)
