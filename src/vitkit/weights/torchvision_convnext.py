"""torchvision ConvNeXt state dicts (`torchvision.models.convnext_*`) -> timm keys.

torchvision keeps everything in one `features` Sequential: `features.0` is the stem, then a stage's blocks and
the next stage's downsampling layer alternate (`features.1` = stage 0 blocks, `features.2` = stage 1's
downsampling, `features.3` = stage 1 blocks ...). Each block is a Sequential (`block.0` depthwise conv, `block.2`
LayerNorm, `block.3`/`block.5` the MLP's Linears) with a `layer_scale` of shape (C, 1, 1). The architecture is
read from the tensor shapes; torchvision has no config file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_BLOCK_PARTS = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}


def looks_like_torchvision_convnext(state: Mapping[str, Any]) -> bool:
    """Whether a state dict has torchvision's ConvNeXt layout (a stem `features.0.0` and `block.N` blocks)."""
    return "features.0.0.weight" in state and any(re.fullmatch(r"features\.1\.0\.block\.0\.weight", k) for k in state)


def torchvision_convnext_to_timm(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rename a torchvision ConvNeXt state dict into timm keys and infer its architecture.

    Args:
        state: a torchvision `ConvNeXt` state dict (`features.*`, `classifier.0` LayerNorm2d, `classifier.2` Linear).

    Returns:
        `(arch, state)`: `ConvNeXtConfig` keyword arguments (depths, dims, in_chans, num_classes; torchvision uses
        1e-6 for every LayerNorm, including the head's) and the state dict in timm keys (layer scales reshaped from
        (C, 1, 1) to (C,)), loadable with `load_state_dict(strict=True)`.

    Raises:
        ValueError: keys with no counterpart (listed by name), or a layout whose stages cannot be told apart.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    depths: dict[int, int] = {}
    for key, value in state.items():
        new = _rename(key, value, depths)
        if new is None:
            unknown.append(key)
        else:
            out[new[0]] = new[1]
    if unknown:
        raise ValueError(
            f"keys with no counterpart in vitkit's ConvNeXt (torchvision layout) ({len(unknown)}): {sorted(unknown)}"
        )
    stages = sorted(depths)
    if not stages or stages != list(range(len(stages))) or "stem.0.weight" not in out:
        raise ValueError(f"not a complete torchvision ConvNeXt: stem present={'stem.0.weight' in out}, stages {stages}")
    dims = tuple(int(out[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in stages)
    stem = out["stem.0.weight"]  # (dims[0], in_chans, 4, 4)
    fc = out.get("head.fc.weight")
    arch = {
        "depths": tuple(depths[i] for i in stages),
        "dims": dims,
        "in_chans": int(stem.shape[1]),
        "patch_size": int(stem.shape[-1]),
        "kernel_size": int(out["stages.0.blocks.0.conv_dw.weight"].shape[-1]),
        "num_classes": 0 if fc is None else int(fc.shape[0]),
        "norm_eps": 1e-6,
        "head_norm_eps": 1e-6,
    }
    return arch, out


def _rename(key: str, value: torch.Tensor, depths: dict[int, int]) -> tuple[str, torch.Tensor] | None:
    if m := re.fullmatch(r"features\.0\.([01])\.(weight|bias)", key):
        return f"stem.{m.group(1)}.{m.group(2)}", value
    if m := re.fullmatch(r"classifier\.([02])\.(weight|bias)", key):
        return f"head.{'norm' if m.group(1) == '0' else 'fc'}.{m.group(2)}", value
    m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if m is None or int(m.group(1)) == 0:
        return None
    index, rest = int(m.group(1)), m.group(2)
    if index % 2 == 0:  # features.2i = stage i's downsampling (LayerNorm2d, conv)
        if d := re.fullmatch(r"([01])\.(weight|bias)", rest):
            return f"stages.{index // 2}.downsample.{d.group(1)}.{d.group(2)}", value
        return None
    stage = (index - 1) // 2  # features.2i+1 = stage i's blocks
    if b := re.fullmatch(r"(\d+)\.layer_scale", rest):
        depths[stage] = max(depths.get(stage, 0), int(b.group(1)) + 1)
        return f"stages.{stage}.blocks.{b.group(1)}.gamma", value.reshape(-1)  # (C, 1, 1) -> (C,)
    if b := re.fullmatch(r"(\d+)\.block\.(\d)\.(weight|bias)", rest):
        part = _BLOCK_PARTS.get(b.group(2))
        if part is None:
            return None
        depths[stage] = max(depths.get(stage, 0), int(b.group(1)) + 1)
        return f"stages.{stage}.blocks.{b.group(1)}.{part}.{b.group(3)}", value
    return None
