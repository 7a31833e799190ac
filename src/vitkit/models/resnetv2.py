"""ResNetV2 backbone of the ViT paper's hybrids (Dosovitskiy et al. 2021; Kolesnikov et al. 2020, "Big Transfer").

Read top-down: the config, the parts (weight-standardised 'same' convolution, GroupNorm + ReLU, 'same' max-pool,
bottleneck), the model (stem -> stages -> pool -> head), the variants.

This is the backbone the R50+ViT hybrids were trained with, in timm's `resnetv2.py` layout with `preact=False`
and `stem_type='same'`: every convolution standardises its weights (zero mean, unit variance per output channel)
and is followed by GroupNorm(32), which together train well at any batch size; TensorFlow-style 'same' padding
(asymmetric for stride 2, from the input size) matches the JAX checkpoints exactly. The bottleneck is the
post-activation v1.5 one (stride on the 3x3), despite the family's name. Parameter names are timm's:
`stem.conv`, `stem.norm`, `stages.{i}.blocks.{j}.{conv1,norm1,conv2,norm2,conv3,norm3,downsample.conv,
downsample.norm}`. The classifier is vitkit's own `head` (timm has no classifier weights for this backbone).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.layers import DropPath, drop_path_rates, resolve_intermediates
from vitkit.models.base import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocess,
    check_savable_head,
    config_kwargs,
    follow_assigned_head,
)
from vitkit.models.contract import ContractMixin
from vitkit.models.registry import register_family, register_model


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ResNetV2Config:
    """Architecture of a ResNetV2 (non-pre-activation, GroupNorm, weight standardisation). Defaults: the R50 of the
    R50+ViT-B/16 hybrid, whose three stages stop at stride 16."""

    depths: tuple[int, ...] = (3, 4, 9)  # blocks per stage; the hybrid R50 moves stage 4's blocks into stage 3
    widths: tuple[int, ...] = (256, 512, 1024)  # output channels per stage (a bottleneck's inner width is 1/4)
    stem_width: int = 64  # channels of the 7x7 stride-2 stem convolution
    img_size: int | tuple[int, int] = 224  # native input (H, W); any size works (maps are ceil(H / stride))
    in_chans: int = 3  # input channels (RGB)
    num_classes: int = 1000  # classifier outputs; 0 means no head (features only, as inside a hybrid)
    gn_groups: int = 32  # GroupNorm groups (BiT / the ViT hybrids use 32)
    gn_eps: float = 1e-5  # GroupNorm epsilon (PyTorch's and timm's default)
    ws_eps: float = 1e-8  # weight-standardisation epsilon; 1e-8 as timm's hybrid backbones (StdConv2dSame)
    drop_rate: float = 0.0  # dropout on the pooled features before the head
    drop_path_rate: float = 0.0  # stochastic depth at the last block, rising linearly from 0 over all blocks

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(s) for s in self.img_size)
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise ValueError(f"img_size must be a positive int or (H, W), got {self.img_size}")
        self.depths = tuple(int(d) for d in self.depths)
        self.widths = tuple(int(w) for w in self.widths)
        if not self.depths or len(self.depths) != len(self.widths):
            raise ValueError(
                f"depths {list(self.depths)} and widths {list(self.widths)} need one entry per stage (at least one)"
            )
        if min(self.depths) < 1:
            raise ValueError(f"depths {list(self.depths)} must be positive")
        for w in (self.stem_width, *self.widths, *(w // 4 for w in self.widths)):
            if w < self.gn_groups or w % self.gn_groups:
                raise ValueError(
                    f"every width (stem_width {self.stem_width}, widths {list(self.widths)} and their quarters, the "
                    f"bottleneck widths) must be a positive multiple of gn_groups={self.gn_groups}; {w} is not"
                )
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {self.in_chans}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("gn_eps", "ws_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------
def _same_pad(size: int, kernel: int, stride: int) -> int:
    """Total padding TensorFlow's 'SAME' adds along one side of length `size` (output = ceil(size / stride))."""
    # = (ceil(size / stride) - 1) * stride + kernel - size, written with the remainder: the same for ints, and for
    # the symbolic sizes of torch.export (multiples of the stride) a constant instead of a nested ceil expression.
    rest = size % stride
    return max(kernel - (rest if rest else stride), 0)


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) as TensorFlow's 'SAME' does: the odd pixel goes to the bottom/right."""
    ph, pw = _same_pad(x.shape[-2], kernel, stride), _same_pad(x.shape[-1], kernel, stride)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Convolution with weight standardisation (Qiao et al. 2019) and 'same' padding, no bias (timm's layer).

    Stride 1 pads symmetrically at build time; a strided convolution pads from the input size at run time.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        static = stride == 1
        pad = (kernel_size - 1) // 2 if static else 0
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=pad, bias=False)
        self.dynamic_pad = not static
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(var + self.eps)  # per output channel: zero mean, unit variance
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by ReLU (or nothing with `act=False`); parameters `weight`/`bias` as nn.GroupNorm."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5, act: bool = True):
        super().__init__(groups, channels, eps=eps)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class MaxPool2dSame(nn.MaxPool2d):
    """3x3 stride-2 max-pool with 'same' padding by -inf (padding never wins the max)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, value=-float("inf")))


class DownsampleConv(nn.Module):
    """The projection shortcut: strided 1x1 standardised convolution + GroupNorm (no activation)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: ResNetV2Config):
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride, eps=cfg.ws_eps)
        self.norm = GroupNormAct(cfg.gn_groups, out_chs, eps=cfg.gn_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, each a standardised conv + GroupNorm; ReLU after the sum.
    The first block of every stage has the projection shortcut (timm's layout, even where the shape is kept)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, first: bool, drop_path: float, cfg: ResNetV2Config):
        super().__init__()
        mid = out_chs // 4
        g, eps, ws = cfg.gn_groups, cfg.gn_eps, cfg.ws_eps
        self.downsample = DownsampleConv(in_chs, out_chs, stride, cfg) if first else None
        self.conv1 = StdConv2dSame(in_chs, mid, 1, eps=ws)
        self.norm1 = GroupNormAct(g, mid, eps=eps)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride, eps=ws)
        self.norm2 = GroupNormAct(g, mid, eps=eps)
        self.conv3 = StdConv2dSame(mid, out_chs, 1, eps=ws)
        self.norm3 = GroupNormAct(g, out_chs, eps=eps, act=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class ResNetStage(nn.Module):
    """One stage: `blocks`, the first of which carries the stride and the projection shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int, dpr: list[float], cfg: ResNetV2Config):
        super().__init__()
        self.blocks = nn.Sequential(
            *(Bottleneck(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1, j == 0, dpr[j], cfg)
              for j in range(depth))
        )  # fmt: skip
        self.grad_checkpointing = False  # set by ResNetV2.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks; checkpointed per block when enabled (GroupNorm has no running statistics, so plain
        recomputation is exact). The model calls this module, so hooks on `feature_info`'s `stages.i` fire."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class ResNetV2(ContractMixin, nn.Module):
    """ResNetV2 classifier / backbone in timm's layout (`preact=False`, `stem_type='same'`).

    Args:
        cfg: architecture; `ResNetV2Config()` (the hybrid R50) when None.
        **overrides: fields of ResNetV2Config to change, e.g. `num_classes=0`; the tutorials' spellings
            (`n_classes`, `in_channels`, `dropout`, `image_size`) are accepted too.
    """

    family = "resnetv2"

    def __init__(self, cfg: ResNetV2Config | None = None, **overrides):
        super().__init__()
        overrides = config_kwargs(ResNetV2Config, overrides, base=cfg)
        # A private copy: reset_classifier edits the config, and two models must never share one.
        cfg = ResNetV2Config(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        self.cfg = cfg
        self.preprocess = Preprocess(mean=INCEPTION_MEAN, std=INCEPTION_STD, input_size=cfg.img_size)
        self.grad_checkpointing = False

        # Stem: (B, C, H, W) -> (B, stem_width, ceil(H/4), ceil(W/4)).
        self.stem = nn.Sequential(
            OrderedDict(
                conv=StdConv2dSame(cfg.in_chans, cfg.stem_width, 7, stride=2, eps=cfg.ws_eps),
                norm=GroupNormAct(cfg.gn_groups, cfg.stem_width, eps=cfg.gn_eps),
                pool=MaxPool2dSame(3, 2),
            )
        )
        dpr = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        stages, prev, start = [], cfg.stem_width, 0
        for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            stages.append(ResNetStage(prev, width, 1 if i == 0 else 2, depth, dpr[start : start + depth], cfg))
            prev, start = width, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(prev, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # --- the head as it is ------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # `model.head = nn.Linear(C, 5)` must leave a config and class names that describe the new head.
        if name == "head" and isinstance(value, nn.Module) and "cfg" in self.__dict__:
            follow_assigned_head(self, value)

    def describe(self) -> ResNetV2Config:
        """The config of the model as it is, for saving; a ValueError for a head config.json cannot describe."""
        check_savable_head("head", self.head, self.num_features)
        return dataclasses.replace(self.cfg, num_classes=self.num_classes)

    def init_weights(self) -> None:
        """timm's init: He-normal (fan-out) convolutions, GroupNorm at identity, normal(0.01) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    # --- forward --------------------------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, stem_width, ceil(H/4), ceil(W/4))."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected images of shape (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        return self.stem(x)

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.stages[i](x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the last stage's map (B, num_features, ceil(H/s), ceil(W/s)), s = 4 * 2**(n-1)."""
        x = self.forward_stem(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Maps (B, C, H', W') -> logits (B, classes), or the pooled features (B, C) with pre_logits."""
        x = self.head_drop(x.mean((2, 3)))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, as_maps: bool = True, norm: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of chosen stages, as `feature_info` describes them.

        Args:
            x: images (B, C, H, W).
            indices: an int n for the last n stages, or stage indices (negatives from the end); None = all.
            as_maps: (B, C_i, H_i, W_i) maps; False flattens each to tokens (B, H_i * W_i, C_i).
            norm: accepted for the contract; this backbone has no final norm (post-activation blocks).
        """
        wanted = resolve_intermediates(indices, len(self.stages), "stage")
        x = self.forward_stem(x)
        outs = []
        for i in range(max(wanted) + 1):  # stop after the last wanted stage
            x = self._run_stage(i, x)
            if i in wanted:
                outs.append(x if as_maps else x.flatten(2).transpose(1, 2))  # (B, C, H', W') or (B, H'W', C)
        return outs

    # --- fine-tuning helpers --------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (randomly initialised, same device and dtype) for `num_classes` outputs; 0 removes it."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got {num_classes!r}")
        self.cfg.num_classes = num_classes
        w = self.stem.conv.weight
        self.head = (
            nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype) if num_classes else nn.Identity()
        )
        if self.preprocess.class_names is not None and len(self.preprocess.class_names) != num_classes:
            self.preprocess.class_names = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.grad_checkpointing = bool(enable)
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides norms and biases: none."""
        return set()

    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage, as timm: `num_chs` (channels), `reduction` (stride in pixels), `module` (name)."""
        return [{"num_chs": w, "reduction": 4 * 2**i, "module": f"stages.{i}"} for i, w in enumerate(self.cfg.widths)]

    @property
    def num_layer_ids(self) -> int:
        """0 = stem, i + 1 = stage i, num_stages + 1 = head."""
        return len(self.stages) + 2

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter for layer-wise LR decay and freezing: 0 = stem, i + 1 = `stages.i`, last = head.

        Raises:
            ValueError: a name that is not a parameter of this layout.
        """
        parts = name.split(".")
        if parts[0] == "stem":
            return 0
        if parts[0] == "stages" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
        if parts[0] == "head":
            return len(self.stages) + 1
        raise ValueError(f"{name!r} is not a parameter of {type(self).__name__} (stem, stages.i, head)")

    def is_classifier(self, name: str) -> bool:
        """Whether a parameter belongs to the classifier `head`."""
        return name.startswith("head.")


register_family("resnetv2", ResNetV2Config, ResNetV2)


# ----------------------------------------------------------------------------------------------------------------
# Variants: the hybrids' backbones on their own (no timm classifier weights exist for them). The name gives the
# depth and the total stride; the JAX hybrids normalise inputs to [-1, 1].
# ----------------------------------------------------------------------------------------------------------------
RESNETV2_PRE = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "crop_fraction": 0.875, "interpolation": "bilinear"}
WIDTHS = (256, 512, 1024, 2048)


def _register_resnetv2(name: str, depths: tuple[int, ...], doc: str) -> None:
    def builder(**overrides) -> ResNetV2:
        return ResNetV2(ResNetV2Config(depths=depths, widths=WIDTHS[: len(depths)]), **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    register_model(name, family="resnetv2", preprocess=RESNETV2_PRE)(builder)


_register_resnetv2("resnetv2_r50_s16", (3, 4, 9), "The R50 of R50+ViT-B/16: 3 stages (3, 4, 9 blocks), stride 16.")
_register_resnetv2("resnetv2_r26_s32", (2, 2, 2, 2), "The R26 of R26+ViT-S/32: 4 stages of 2 blocks, stride 32.")
