"""torchvision Swin Transformer v1 state dicts (`torchvision.models.swin_t/s/b`) -> timm keys (vitkit's).

torchvision keeps the network in one `features` Sequential: `features.0` is the patch embedding (`0` the 4x4
conv, `2` its LayerNorm), odd entries are a stage's blocks (`features.1` = stage 0, `features.3` = stage 1 ...)
and even entries from 2 on are the patch merging that starts the next stage (timm's `layers.{i}.downsample`).
Blocks keep the official names (`norm1`, `attn.qkv`, `attn.proj`, `attn.relative_position_bias_table`, `norm2`)
except the MLP, a Sequential whose Linears are `mlp.0` and `mlp.3`; the head is a bare `head` Linear. Patch merging
concatenates the 2x2 neighbours in the official order, as timm and vitkit do, so only names change. The stored
`relative_position_index` buffers are dropped (vitkit computes them). Swin V2 (`cpb_mlp`, `logit_scale`) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_STAGE = re.compile(r"features\.(\d+)\.(.+)")
_MLP = {"mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}


def looks_like_torchvision_swin(state: Mapping[str, object]) -> bool:
    """Whether a state dict has torchvision's Swin layout (`features.0.0` embedding, `features.1.0.attn` blocks)."""
    return "features.0.0.weight" in state and any(k.startswith("features.1.0.attn.") for k in state)


def torchvision_swin_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision Swin v1 state dict into timm keys, loadable with `load_state_dict(strict=True)` into
    the registered Swin of the same size (`swin_tiny_patch4_window7_224` for `swin_t` ...).

    Raises:
        ValueError: a Swin V2 checkpoint, or keys with no counterpart (listed by name).
    """
    v2 = sorted(k for k in state if "cpb_mlp" in k or "logit_scale" in k)
    if v2:
        raise ValueError(
            f"a torchvision Swin V2 state dict ({v2[0]}, ...); vitkit implements Swin v1 (swin_t/s/b) only"
        )
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        m = _STAGE.fullmatch(key)
        if key.startswith("features.0.0."):
            out["patch_embed.proj." + key[len("features.0.0.") :]] = value
        elif key.startswith("features.0.2."):
            out["patch_embed.norm." + key[len("features.0.2.") :]] = value
        elif m and int(m.group(1)) >= 1:
            n, rest = int(m.group(1)), m.group(2)
            if n % 2:  # a stage's blocks: features.{2i+1}.{j}.* -> layers.i.blocks.j.*
                j, tail = rest.split(".", 1)
                for theirs, ours in _MLP.items():
                    if tail.startswith(theirs):
                        tail = ours + tail[len(theirs) :]
                out[f"layers.{(n - 1) // 2}.blocks.{j}.{tail}"] = value
            elif rest.startswith(("reduction.", "norm.")):  # patch merging starting stage n/2
                out[f"layers.{n // 2}.downsample.{rest}"] = value
            else:
                unknown.append(key)
        elif key.startswith("norm."):
            out[key] = value
        elif key.startswith("head."):
            out["head.fc." + key[len("head.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"torchvision Swin state dict: keys with no counterpart: {', '.join(unknown[:8])}")
    return out
