"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s").

Read top-down: the config, then the parts (block, stage, head), then the model, then the registered variants.

A ResNet modernised step by step towards a Swin Transformer: a 4x4 "patchify" stem, four stages of inverted
bottleneck blocks (7x7 depthwise conv -> LayerNorm -> 4x wide MLP -> layer scale, plus the residual), separate
2x2 strided downsampling layers between stages, LayerNorm instead of BatchNorm, and GELU. The head averages the
last map, normalises and classifies. Parameter and buffer names follow timm's layout (`stem.0`, `stages.N.
downsample.1`, `stages.N.blocks.M.conv_dw`, `head.fc` ...), so timm state dicts load with `load_state_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.layers import DropPath, LayerNorm2d, Mlp, drop_path_rates, get_layer, lowp_in_fp32, resolve_intermediates
from vitkit.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, config_kwargs
from vitkit.models.contract import ContractMixin
from vitkit.models.registry import register_family, register_model


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ConvNeXtConfig:
    """Architecture of a ConvNeXt. Defaults are ConvNeXt-T at 224 px, as in the paper."""

    img_size: int | tuple[int, int] = 224  # native input (H, W); any side >= the total stride (32) also works
    in_chans: int = 3  # input channels (RGB)
    num_classes: int = 1000  # classifier outputs; 0 means no classifier (pooled, normalised features out)
    depths: tuple[int, ...] = (3, 3, 9, 3)  # blocks per stage; the paper's 1:1:3:1 ratio, after Swin
    dims: tuple[int, ...] = (96, 192, 384, 768)  # channels per stage, doubling as the map halves
    patch_size: int = 4  # stem: non-overlapping patch x patch conv, as Swin's 4x4 patches
    kernel_size: int = 7  # depthwise kernel; 7x7 matches Swin's window and saturated accuracy in the paper
    mlp_ratio: float = 4.0  # inverted bottleneck: hidden width / channels, 4 as in the transformer MLP
    ls_init_value: float | None = 1e-6  # layer scale (CaiT) initial gain; None disables it (no `gamma`)
    drop_path_rate: float = 0.0  # stochastic depth at the last block, rising linearly from 0 (0.1 for T in paper)
    drop_rate: float = 0.0  # dropout on the pooled features just before the classifier
    norm_eps: float = 1e-6  # LayerNorm epsilon of the stem, downsampling layers and blocks (timm and the paper)
    head_norm_eps: float = 1e-6  # epsilon of the head's LayerNorm; transformers' ConvNext configs use 1e-12
    act_layer: str = "gelu"  # MLP activation by name (vitkit.layers.create); exact GELU as in the paper

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(s) for s in self.img_size)
        self.depths = tuple(self.depths)
        self.dims = tuple(self.dims)
        if len(self.img_size) != 2:
            raise ValueError(f"img_size must be an int or (height, width), got {self.img_size}")
        if not self.depths or len(self.depths) != len(self.dims):
            raise ValueError(
                f"depths {self.depths} and dims {self.dims} must give one entry per stage (same length, >= 1)"
            )
        for name, values in (("depths", self.depths), ("dims", self.dims)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values}")
        for name in ("in_chans", "patch_size", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so 'same' padding keeps the map size, got {self.kernel_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {self.num_classes}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.ls_init_value is not None and self.ls_init_value <= 0:
            raise ValueError(
                f"ls_init_value must be positive (or None to disable layer scale), got {self.ls_init_value}"
            )
        for name in ("drop_path_rate", "drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("norm_eps", "head_norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        get_layer("act", self.act_layer)  # a ValueError listing the known names
        check_input_size(*self.img_size, self.min_size)

    @property
    def min_size(self) -> int:
        """Smallest input side: the total stride (stem patch x 2 per later stage), so the last map is >= 1 px."""
        return self.patch_size * 2 ** (len(self.depths) - 1)


def check_input_size(height: int, width: int, min_size: int) -> None:
    """Raise a ValueError naming the side that is smaller than the model's total stride `min_size`."""
    for name, size in (("height", height), ("width", width)):
        if size < min_size:
            raise ValueError(
                f"image {name} {size} is smaller than ConvNeXt's total stride {min_size}; give sides >= {min_size} "
                f"(sides that are not multiples of {min_size} work: each strided layer floors, as in timm)"
            )


# ----------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """x + drop_path(gamma * mlp(norm(dwconv(x)))), on a (B, C, H, W) map.

    The norm and the MLP act on channels-last (B, H, W, C) tensors, where the 1x1 convolutions are `nn.Linear`
    layers: the faster of the paper's two equivalent forms in PyTorch, and the layout of timm's weights.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer)
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """The 7x7 depthwise convolution. At inference on a CPU without low-precision kernels
        (`vitkit.layers.linear.lowp_in_fp32`), bf16/fp16 maps are convolved in fp32 and rounded back once: PyTorch
        falls back to a per-channel generic loop there (~85x slower here), while fp32 holds every bf16/fp16 input
        exactly. Outputs differ from that loop's by at most one rounding step of the low-precision type."""
        if lowp_in_fp32(x):
            conv = self.conv_dw
            bias = None if conv.bias is None else conv.bias.float()
            return conv._conv_forward(x.float(), conv.weight.float(), bias).to(x.dtype)
        return self.conv_dw(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self._depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        return shortcut + self.drop_path(x)


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm2d -> 2x2 stride-2 conv) then `depth` blocks; stage 0 keeps the stem's map."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, drop_paths: Sequence[float], **block):
        super().__init__()
        if downsample:
            eps = block["norm_eps"]
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=eps), nn.Conv2d(in_chs, out_chs, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.ModuleList(ConvNeXtBlock(out_chs, drop_path=drop_paths[j], **block) for j in range(depth))
        self.grad_checkpointing = False  # set by ConvNeXt.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chs, H, W) -> (B, out_chs, H / 2, W / 2) (or the same size for stage 0). The model calls the
        stage module itself, so hooks on `feature_info`'s `stages.i` fire; blocks are checkpointed when enabled."""
        x = self.downsample(x)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return x


class NormLinearHead(nn.Module):
    """Global average pool -> LayerNorm -> dropout -> Linear (timm's `NormMlpClassifierHead` without hidden layer)."""

    def __init__(self, dim: int, num_classes: int, eps: float, drop_rate: float):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=eps)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((2, 3), keepdim=True)).flatten(1)  # (B, C)
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class ConvNeXt(ContractMixin, nn.Module):
    """ConvNeXt classifier: stem -> stages -> pooled, normalised head.

    Any input whose sides are at least the total stride (32 for the four-stage models) works; sides that are not
    multiples of a stride are floored at each strided layer, exactly as timm and transformers do.

    Args:
        cfg: architecture; `ConvNeXtConfig()` (ConvNeXt-T) when None.
        **overrides: fields of ConvNeXtConfig to change, e.g. `num_classes=10, depths=(2, 2, 6, 2)`. The
            tutorials' spellings (`n_classes`, `in_channels`, `image_size` ...) are accepted too; anything else is a
            TypeError listing the accepted names.
    """

    family = "convnext"

    def __init__(self, cfg: ConvNeXtConfig | None = None, **overrides):
        super().__init__()
        overrides = config_kwargs(ConvNeXtConfig, overrides, base=cfg)
        # A private copy: reset_classifier edits the config, and two models must never share one.
        cfg = ConvNeXtConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        self.cfg = cfg
        self.preprocess = Preprocess(input_size=cfg.img_size)
        self.num_features = cfg.dims[-1]
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, cfg.dims[0], cfg.patch_size, stride=cfg.patch_size),
            LayerNorm2d(cfg.dims[0], eps=cfg.norm_eps),
        )
        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))  # linear over all blocks of all stages
        block = dict(
            kernel_size=cfg.kernel_size,
            mlp_ratio=cfg.mlp_ratio,
            ls_init_value=cfg.ls_init_value,
            norm_eps=cfg.norm_eps,
            act_layer=get_layer("act", cfg.act_layer),
        )
        stages, prev, start = [], cfg.dims[0], 0
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            stages.append(ConvNeXtStage(prev, dim, depth, i > 0, rates[start : start + depth], **block))
            prev, start = dim, start + depth
        self.stages = nn.ModuleList(stages)
        self.head = NormLinearHead(cfg.dims[-1], cfg.num_classes, cfg.head_norm_eps, cfg.drop_rate)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's init: truncated normal 0.02 for convolutions and linear layers, zero biases; norms at 1 and 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- forward --------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"expected {self.cfg.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        check_input_size(x.shape[2], x.shape[3], self.cfg.min_size)

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.stages[i](x)  # (B, C_i, H / 2, W / 2) after stage 0

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """Checked images (B, C, H, W) -> the stem's map (B, dims[0], H / 4, W / 4).

        On the inference path (eval mode, no autograd) the maps are channels-last from here on: each block's
        (B, C, H, W) <-> (B, H, W, C) permutes around its LayerNorm and MLP, and LayerNorm2d's, become free views
        instead of copies, and oneDNN's convolutions take that layout as it is. Values are bit-identical (the same
        kernels on the same numbers); the public outputs are made contiguous again.
        """
        self._check_input(x)
        if not self.training and not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)  # (B, dims[0], H / 4, W / 4)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return x  # channels-last on the inference path

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the last stage's map (B, num_features, H / 32, W / 32) (sides floored)."""
        return self._features(x).contiguous()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map (B, C, H', W') -> logits (B, classes), or the pooled, normalised features (B, C) when `pre_logits`."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, classes)."""
        return self.forward_head(self._features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, as_maps: bool = True, norm: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of chosen stages.

        Args:
            x: images (B, C, H, W).
            indices: an int n for the last n stages, or stage indices (negatives from the end); None = all.
            as_maps: (B, C_i, H_i, W_i) maps (see `feature_info`); False flattens each to (B, H_i * W_i, C_i) tokens.
            norm: accepted for the contract; a no-op, as ConvNeXt normalises only after pooling (timm's `norm_pre`
                is Identity for these models).

        Raises:
            ValueError: an n outside 1..stages, or a stage index out of range.
        """
        depth = len(self.stages)
        wanted = resolve_intermediates(indices, depth, "stage")
        x = self._stem(x)
        outs = []
        for i in range(max(wanted) + 1):  # stop after the last wanted stage
            x = self._run_stage(i, x)
            if i in wanted:
                y = x.contiguous()
                outs.append(y if as_maps else y.flatten(2).transpose(1, 2))  # (B, C, H', W') or (B, H'*W', C)
        return outs

    # --- the contract's metadata ----------------------------------------------------------------------------
    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage, as timm: `num_chs` (channels), `reduction` (stride in pixels), `module` (name)."""
        p = self.cfg.patch_size
        return [{"num_chs": dim, "reduction": p * 2**i, "module": f"stages.{i}"} for i, dim in enumerate(self.cfg.dims)]

    @property
    def num_layer_ids(self) -> int:
        """Layer ids run 0 (stem) .. total blocks (last block), then one more for the head."""
        return sum(self.cfg.depths) + 2

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter, for layer-wise LR decay and freezing.

        0 = stem; then one id per block in order (`stages.i.blocks.j` -> 1 + blocks before stage i + j), a
        stage's downsampling layer sharing the id of the stage's first block; head (`head.norm`, `head.fc`) last.

        Raises:
            ValueError: a name that is not one of this model's parameters' prefixes.
        """
        parts = name.split(".")
        if parts[0] == "stem":
            return 0
        if parts[0] == "head":
            return self.num_layer_ids - 1
        if parts[0] == "stages" and len(parts) > 2 and parts[1].isdigit():
            i = int(parts[1])
            before = 1 + sum(self.cfg.depths[:i])
            if parts[2] == "downsample":
                return before
            if parts[2] == "blocks" and len(parts) > 3 and parts[3].isdigit():
                return before + int(parts[3])
        raise ValueError(
            f"{name!r} is not a ConvNeXt parameter name (stem.*, stages.i.downsample.*, stages.i.blocks.j.*, head.*)"
        )

    def is_classifier(self, name: str) -> bool:
        """Whether a parameter belongs to the classifier head (`head.norm`, `head.fc`)."""
        return name.startswith("head.")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear (randomly initialised, same device and dtype) for `num_classes`; 0 removes it.

        The head's LayerNorm is kept: it normalises the pooled features whatever the classes.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no classifier), got {num_classes!r}")
        self.cfg.num_classes = num_classes
        like = dict(device=self.head.norm.weight.device, dtype=self.head.norm.weight.dtype)
        if num_classes > 0:
            fc = nn.Linear(self.num_features, num_classes, **like)
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
            self.head.fc = fc
        else:
            self.head.fc = nn.Identity()
        if self.preprocess.class_names is not None and len(self.preprocess.class_names) != num_classes:
            self.preprocess.class_names = None

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.grad_checkpointing = bool(enable)
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Nothing besides norms, biases and layer scales (1-D parameters, which the optimiser skips anyway)."""
        return set()


register_family("convnext", ConvNeXtConfig, ConvNeXt)


# ----------------------------------------------------------------------------------------------------------------
# Variants: timm's names; widths and depths from the paper (Table 9 / section 3).
# ----------------------------------------------------------------------------------------------------------------
# timm's pretrained_cfg for the ImageNet ConvNeXts: ImageNet statistics, bicubic, 0.875 centre crop at 224 px.
IMAGENET_PRE = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_fraction": 0.875, "interpolation": "bicubic"}


def _register_convnext(name: str, depths: tuple[int, ...], dims: tuple[int, ...], doc: str) -> None:
    def builder(**overrides) -> ConvNeXt:
        return ConvNeXt(ConvNeXtConfig(depths=depths, dims=dims), **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    register_model(name, family="convnext", preprocess=IMAGENET_PRE)(builder)


_register_convnext("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), "ConvNeXt-T, 28.6M params, 4.5 GMACs.")
_register_convnext("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768), "ConvNeXt-S, 50.2M params, 8.7 GMACs.")
_register_convnext("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024), "ConvNeXt-B, 88.6M params, 15.4 GMACs.")
