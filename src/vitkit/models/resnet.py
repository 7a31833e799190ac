"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), the CNN baseline of the zoo.

Read top-down: the config, the two residual blocks, the model (stem -> stages -> pool -> fc), the variants.

A 7x7 stride-2 convolution and a 3x3 max-pool shrink the image 4x; four stages of residual blocks follow, each
but the first halving the map (strides 4, 8, 16, 32) while widening it; global average pooling feeds one linear
classifier. Blocks are torchvision's "ResNet v1.5" (the stride sits on the 3x3 convolution of a bottleneck), and
parameter and buffer names are torchvision's, which timm shares: `conv1`, `bn1`, `layer1..4.{i}.conv1/bn1/...`,
`downsample.0/1`, `fc`. State dicts from either library load with `load_state_dict` as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.layers import DropPath, drop_path_rates, resolve_intermediates
from vitkit.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    check_literal,
    check_savable_head,
    config_kwargs,
    follow_assigned_head,
)
from vitkit.models.contract import ContractMixin
from vitkit.models.registry import register_family, register_model

BlockType = Literal["basic", "bottleneck"]


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ResNetConfig:
    """Architecture of a ResNet. Defaults are ResNet-50 at 224 px, as in the paper and torchvision."""

    block: BlockType = "bottleneck"  # "basic" (two 3x3 convs, ResNet-18/34) or "bottleneck" (1x1-3x3-1x1, 50+)
    depths: tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage; stage i (from 0) has stride 4 * 2**i
    widths: tuple[int, ...] = (64, 128, 256, 512)  # inner width per stage; a bottleneck outputs 4x this
    stem_width: int = 64  # channels of the 7x7 stem convolution (64 in every published ResNet)
    img_size: int | tuple[int, int] = 224  # native input (H, W); any size works (maps are ceil(H / stride))
    in_chans: int = 3  # input channels (RGB)
    num_classes: int = 1000  # classifier outputs; 0 means no head (features only)
    drop_rate: float = 0.0  # dropout on the pooled features before fc (timm's drop_rate)
    drop_path_rate: float = 0.0  # stochastic depth at the last block, rising linearly from 0 over all blocks
    zero_init_last: bool = True  # last BN of each block starts at 0, so each block starts as identity (Goyal 2017)

    def __post_init__(self) -> None:
        check_literal("block", self.block, BlockType)
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
        if min(self.depths) < 1 or min(self.widths) < 1:
            raise ValueError(f"depths {list(self.depths)} and widths {list(self.widths)} must be positive")
        for name in ("stem_width", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------
def fast_inference(module: nn.Module) -> bool:
    """Whether `module` runs the inference path: eval mode and no autograd (`torch.no_grad` / `inference_mode`).

    Only then are BatchNorms folded into their convolutions and maps kept channels-last: with autograd on (training,
    or gradients through an eval model as Grad-CAM takes them) the model runs its layers as they are.
    """
    return not module.training and not torch.is_grad_enabled()


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`bn(conv(x))`; on the inference path one convolution with the BatchNorm folded in (`folded_conv_bn`).

    Folding rounds differently from two passes: max |delta| about 1e-6 of the output's magnitude in fp32.
    """
    if torch.compiler.is_compiling():
        # The compiler sees the whole graph and folds or fuses BatchNorm itself; the eager fold cache below keys on
        # version counters and `is_inference()`, which cannot be traced (a graph break in every block). A fold
        # cached by an earlier eager call stays guarded by its value fingerprints.
        return bn(conv(x))
    plain = bn.training or torch.is_grad_enabled() or bn.running_mean is None or bn.running_var is None
    # torch.export (vitkit.deploy.export) cannot trace the fold's cache (it keys on data pointers); ONNX runtimes
    # fold BatchNorm into the convolution themselves.
    plain = plain or torch.compiler.is_exporting()
    # Weights made inside `torch.inference_mode` (e.g. `model.to(dtype)` there) keep no version counter, so a fold
    # of them could not tell when it went stale: such a model runs unfolded.
    if plain or any(t.is_inference() for t in (conv.weight, bn.weight, bn.running_mean) if t is not None):
        if bn.training:
            # BatchNorm's kernel moves the running statistics without bumping their version counters.
            bn.__dict__.pop("_folded", None)
        return bn(conv(x))
    weight, bias = folded_conv_bn(conv, bn, x.is_contiguous(memory_format=torch.channels_last))
    return conv._conv_forward(x, weight, bias)


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to eval-mode `bn(conv(x))`, cached on `bn` while its inputs hold.

    w' = w * gamma / sqrt(var + eps), b' = beta + (b - mean) * gamma / sqrt(var + eps), computed in fp32 (fp64
    for fp64 weights) and cast to the weight's dtype. The cache keeps the tensors it was made from (so their memory
    cannot be reused by others) and their version counters: any in-place change (optimizer step,
    `load_state_dict`, `copy_`, `nn.init`), a replaced tensor (`.to()`, assignment) or another eps or memory format
    makes it stale, and it is rebuilt on the next call; a forward in training mode (which moves the running
    statistics without a version bump) drops it. It is not in `state_dict` and never used in training or with
    autograd on. Writes through `.data` (`conv.weight.data.add_(noise)`) bypass version counters, so the key also
    holds value fingerprints: the sum of every BatchNorm tensor and of every 97th convolution weight (reading all
    weights per call would cost about what the fold saves). The one change still unseen is a `.data` write that
    touches only unsampled convolution weights and no BatchNorm value: edit weights under `torch.no_grad()`
    without `.data` (in-place ops there bump the version) or assign a new tensor.
    """
    sources = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        sources.append(conv.bias)
    present = [t for t in sources if t is not None]
    with torch.no_grad():  # one sync for all fingerprints
        prints = torch.stack(
            [(t.reshape(-1)[::97] if t is conv.weight else t.reshape(-1)).sum(dtype=torch.float64) for t in present]
        ).tolist()
    key = (bn.eps, channels_last, [(t.data_ptr(), t._version) for t in present], prints)
    cache = bn.__dict__.get("_folded")
    if cache is not None and cache[0] == key:
        return cache[2], cache[3]
    with torch.no_grad():
        w = conv.weight
        acc = torch.promote_types(w.dtype, torch.float32)  # fp32 for fp16/bf16 weights, fp64 stays fp64
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        bias = -bn.running_mean.to(acc) * scale
        if conv.bias is not None:
            bias = bias + conv.bias.to(acc) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.to(acc)
        weight = (w.to(acc) * scale.view(-1, 1, 1, 1)).to(w.dtype)
        if channels_last:  # the layout oneDNN wants for a channels-last input: no reorder per call
            weight = weight.contiguous(memory_format=torch.channels_last)
        bias = bias.to(w.dtype)
    # Kept out of nn.Module's bookkeeping: no parameter, buffer or state_dict entry; `held` pins the sources' memory.
    held = [t.data if t is not None else None for t in sources]
    bn.__dict__["_folded"] = (key, held, weight, bias)
    return weight, bias


def _downsample(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """The projection shortcut (1x1 conv + BN) where a block changes width or stride; Identity elsewhere."""
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34); `stride` on the first."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_chs, out_chs, stride)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _shortcut(self.downsample, x)
        x = self.act1(conv_bn(self.conv1, self.bn1, x))
        x = conv_bn(self.conv2, self.bn2, x)
        return self.act2(self.drop_path(x) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, "v1.5"), 1x1 expand to 4x `planes`, with a residual connection."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_chs, out_chs, stride)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _shortcut(self.downsample, x)
        x = self.act1(conv_bn(self.conv1, self.bn1, x))
        x = self.act2(conv_bn(self.conv2, self.bn2, x))
        x = conv_bn(self.conv3, self.bn3, x)
        return self.act3(self.drop_path(x) + shortcut)


def _shortcut(downsample: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's shortcut: `x`, or its projection (1x1 conv + BN, folded on the inference path)."""
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
        return conv_bn(downsample[0], downsample[1], x)
    return downsample(x)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetStage(nn.Sequential):
    """A stage `layer{i}`: its blocks in sequence (torchvision's keys `layer1.0.conv1.weight` ...), checkpointed per
    block when enabled. The model calls this module, so hooks on `feature_info`'s `layer{i}` fire."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False  # set by ResNet.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self:
                x = _checkpointed(block, x)
            return x
        return super().forward(x)


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` with its activations recomputed in backward instead of stored.

    The recomputation runs the block's BatchNorms again in training mode, which would fold the batch statistics
    into the running averages a second time; their running statistics are put back after it, so a checkpointed
    step leaves exactly the buffers a plain one does.
    """
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return block(inp)
        bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        saved = [[b.clone() for b in m.buffers()] for m in bns]
        try:
            return block(inp)
        finally:
            with torch.no_grad():
                for m, bufs in zip(bns, saved):
                    for b, old in zip(m.buffers(), bufs):
                        b.copy_(old)

    return checkpoint(run, x, use_reentrant=False)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class ResNet(ContractMixin, nn.Module):
    """ResNet classifier in torchvision/timm layout.

    Args:
        cfg: architecture; `ResNetConfig()` (ResNet-50) when None.
        **overrides: fields of ResNetConfig to change, e.g. `num_classes=10`, `depths=(1, 1, 1, 1)`; the
            tutorials' spellings (`n_classes`, `in_channels`, `dropout`, `image_size`) are accepted too.
    """

    family = "resnet"

    def __init__(self, cfg: ResNetConfig | None = None, **overrides):
        super().__init__()
        overrides = config_kwargs(ResNetConfig, overrides, base=cfg)
        # A private copy: reset_classifier edits the config, and two models must never share one.
        cfg = ResNetConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        self.cfg = cfg
        # torchvision's weights: resize the short side to 256 (bilinear), centre-crop 224.
        self.preprocess = Preprocess(
            mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=cfg.img_size, crop_fraction=0.875, interpolation="bilinear"
        )
        self.grad_checkpointing = False
        block_cls = BLOCKS[cfg.block]

        # Stem: stride 2 convolution, then stride 2 max-pool: (B, C, H, W) -> (B, stem_width, H/4, W/4).
        self.conv1 = nn.Conv2d(cfg.in_chans, cfg.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        # Stages layer1..layerN (torchvision's names); the first block of each stage but the first halves the map.
        dpr = iter(drop_path_rates(cfg.drop_path_rate, sum(cfg.depths)))
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(cfg.depths)))
        self._feature_info = []
        in_chs = cfg.stem_width
        for i, (depth, planes) in enumerate(zip(cfg.depths, cfg.widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block_cls(in_chs, planes, stride=stride, drop_path=next(dpr)))
                in_chs = planes * block_cls.expansion
            self.add_module(self.stage_names[i], ResNetStage(*blocks))
            self._feature_info.append({"num_chs": in_chs, "reduction": 4 * 2**i, "module": self.stage_names[i]})
        self.num_features = in_chs

        # Head: global average pool -> dropout -> linear.
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(in_chs, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def stages(self) -> list[nn.Sequential]:
        """The stages in order (`layer1`, `layer2`, ...)."""
        return [getattr(self, name) for name in self.stage_names]

    # --- the head as it is ------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # `model.fc = nn.Linear(C, 5)` (the tutorials' way to change the class count) must leave a config and
        # class names that describe the new head, as reset_classifier does.
        if name == "fc" and isinstance(value, nn.Module) and "cfg" in self.__dict__:
            follow_assigned_head(self, value)

    def describe(self) -> ResNetConfig:
        """The config of the model as it is, for saving.

        Raises:
            ValueError: an `fc` that config.json cannot describe (not `nn.Linear(num_features, k)` with a bias, nor
                `nn.Identity()`).
        """
        check_savable_head("fc", self.fc, self.num_features)
        return dataclasses.replace(self.cfg, num_classes=self.num_classes)

    # --- initialisation -------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """torchvision/timm init: He-normal (fan-out) convolutions, BN at identity, last BN per block at 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    # --- forward --------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"expected images of shape (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}"
                + ("" if x.ndim != 4 else f" ({x.shape[1]} channels, the model has in_chans={self.cfg.in_chans})")
            )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, stem_width, ceil(H/4), ceil(W/4)).

        On the inference path (eval, no autograd) the maps are channels-last from here on, where oneDNN's
        convolutions run faster on CPU; values and shapes are the same, and the outputs of `forward_features` and
        `forward_intermediates` are made contiguous again.
        """
        self._check_input(x)
        if fast_inference(self):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.maxpool(self.act1(conv_bn(self.conv1, self.bn1, x)))

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        return stage(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for stage in self.stages:
            x = self._run_stage(stage, x)
        return x  # channels-last on the inference path

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> last stage's maps (B, num_features, ceil(H/32), ceil(W/32)) for 4 stages."""
        return self._features(x).contiguous()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Maps (B, C, H', W') -> logits (B, num_classes), or pooled features (B, num_features) with pre_logits."""
        x = self.global_pool(x).flatten(1)  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self._features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, as_maps: bool = True, norm: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of chosen stages, as `feature_info` describes them.

        Args:
            x: images (B, C, H, W).
            indices: an int n for the last n stages, or stage indices (negatives from the end); None = all.
            as_maps: (B, C_i, H_i, W_i) maps with H_i = ceil(H / reduction_i); False gives the same values as
                tokens (B, H_i * W_i, C_i), the layout of a ViT's patch tokens.
            norm: accepted for the contract; a ResNet has no final norm, so outputs are the same either way.

        Raises:
            ValueError: an index outside the stages, or an int n outside 1..num_stages.
        """
        n = len(self.stage_names)
        wanted = resolve_intermediates(indices, n, "stage")
        x = self.forward_stem(x)
        outs = []
        for i, stage in enumerate(self.stages[: max(wanted) + 1]):  # stop after the last wanted stage
            x = self._run_stage(stage, x)
            if i in wanted:
                y = x.contiguous()
                outs.append(y if as_maps else y.flatten(2).transpose(1, 2))  # (B, C, H', W') or (B, H'W', C)
        return outs

    # --- fine-tuning helpers --------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replace `fc` (randomly initialised, same device and dtype) for `num_classes` outputs; 0 removes it."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got {num_classes!r}")
        self.cfg.num_classes = num_classes
        like = dict(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        self.fc = nn.Linear(self.num_features, num_classes, **like) if num_classes > 0 else nn.Identity()
        if self.preprocess.class_names is not None and len(self.preprocess.class_names) != num_classes:
            self.preprocess.class_names = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory).

        BatchNorm running statistics are updated once per step, as without checkpointing.
        """
        self.grad_checkpointing = bool(enable)
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides norms and biases: none in a ResNet."""
        return set()

    def get_classifier(self) -> nn.Module:
        return self.fc

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage, as timm: `num_chs` (channels), `reduction` (stride in pixels), `module` (name)."""
        return [dict(fi) for fi in self._feature_info]

    @property
    def num_layer_ids(self) -> int:
        """0 = stem, i + 1 = stage i, num_stages + 1 = fc."""
        return len(self.stage_names) + 2

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter, for layer-wise LR decay and freezing: 0 = stem (conv1, bn1), i + 1 = stage
        `layer{i+1}`, the last id = the classifier `fc`.

        Raises:
            ValueError: a name that is no parameter or buffer of this model's layout.
        """
        root = name.split(".", 1)[0]
        if root in ("conv1", "bn1"):
            return 0
        if root in self.stage_names:
            return self.stage_names.index(root) + 1
        if root == "fc":
            return len(self.stage_names) + 1
        raise ValueError(f"{name!r} is not a parameter of {type(self).__name__} (conv1, bn1, layer1.., fc)")

    def is_classifier(self, name: str) -> bool:
        """Whether a parameter belongs to the classifier `fc`."""
        return name.startswith("fc.")


register_family("resnet", ResNetConfig, ResNet)


# ----------------------------------------------------------------------------------------------------------------
# Variants (timm's names): the number is the count of weighted layers.
# ----------------------------------------------------------------------------------------------------------------
# torchvision's ImageNet weights (timm's `*.tv_in1k`): ImageNet statistics, short side 256 (bilinear), crop 224.
RESNET_PRE = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_fraction": 0.875, "interpolation": "bilinear"}


def _register_resnet(name: str, block: BlockType, depths: tuple[int, ...], doc: str) -> None:
    def builder(**overrides) -> ResNet:
        return ResNet(ResNetConfig(block=block, depths=depths), **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    register_model(name, family="resnet", preprocess=RESNET_PRE)(builder)


_register_resnet("resnet18", "basic", (2, 2, 2, 2), "ResNet-18, 11.7M params (BasicBlock).")
_register_resnet("resnet34", "basic", (3, 4, 6, 3), "ResNet-34, 21.8M params (BasicBlock).")
_register_resnet("resnet50", "bottleneck", (3, 4, 6, 3), "ResNet-50, 25.6M params (Bottleneck, v1.5).")
