"""timm-layout state dicts: infer the architecture from tensor shapes and load strictly.

vitkit's VisionTransformer uses timm's parameter names, so a timm (or vitkit) state dict needs no renaming; the
work is deciding the architecture. Shapes and key presence decide everything except the number of attention
heads (q, k and v are one fused matrix whichever way it is split), which comes from a registered model name
when given and is otherwise guessed as embed_dim // 64 (the head width of every published ViT up to ViT-L).

The Hugging Face and JAX importers map their checkpoints into this layout and finish through `build_vit`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vitkit.layers import resample_pos_embed
from vitkit.models.base import Preprocess
from vitkit.models.registry import create_model, get_family, list_models, model_family
from vitkit.models.serialization import match_state_dtype
from vitkit.models.vit import VisionTransformer, ViTConfig
from vitkit.weights._log import LogFn, Reporter, as_reporter
from vitkit.weights.native import load_state_dict_strict

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Fields a registered model name must agree on with the checkpoint's shapes (others may differ legitimately:
# image size, classes, pooling).
_MUST_AGREE = ("embed_dim", "depth", "patch_size", "in_chans", "mlp_ratio", "qkv_bias", "qk_norm", "class_token",
               "reg_tokens", "distilled")  # fmt: skip


def as_img_size(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(H, W) from an int or a pair; TypeError for anything else."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return (img_size, img_size)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size):
        return (int(img_size[0]), int(img_size[1]))
    raise TypeError(f"img_size must be an int or an (height, width) pair of ints, got {img_size!r}")


# Families in the ViT layout: a DeiT is a VisionTransformer with its own family name (models/deit.py).
VIT_FAMILIES = ("vit", "deit")


def registered_config(model_name: str) -> ViTConfig:
    """The config of a registered ViT (or DeiT), without allocating its weights (built on the meta device)."""
    family = model_family(model_name)  # ValueError with close matches for unknown names
    if family not in VIT_FAMILIES:
        raise ValueError(
            f"model {model_name!r} is a {family!r} model; these converters build {' or '.join(VIT_FAMILIES)} models"
        )
    with torch.device("meta"):
        return create_model(model_name).cfg


def _grid_hints(
    reg: ViTConfig | None, model_name: str | None, img_size: int | tuple[int, int] | None, patch: int
) -> list[tuple[str, tuple[int, int]]]:
    """Candidate native patch grids, as (where from, grid): a registered model's size, then an explicit img_size."""
    hints = []
    if reg is not None:
        hints.append((f"model {model_name!r}", (reg.img_size[0] // patch, reg.img_size[1] // patch)))
    if img_size is not None:
        size = as_img_size(img_size)
        hints.append((f"img_size={size}", (size[0] // patch, size[1] // patch)))
    return hints


def _square_side(n: int) -> int | None:
    if n <= 0:
        return None
    side = math.isqrt(n)
    return side if side * side == n else None


def _native_grid(n_pos: int, n_prefix: int, hints: list[tuple[str, tuple[int, int]]], source: str) -> tuple[int, int]:
    """The patch grid a position table was trained for.

    Args:
        n_pos: rows of the table.
        n_prefix: rows the model expects for class/distillation tokens.
        hints: (where from, grid) candidates from a model name or img_size, tried first.
        source: name used in messages.
    """
    n_grid = n_pos - n_prefix
    for _, grid in hints:
        if grid[0] * grid[1] == n_grid:
            return grid
    no_embed_class = (
        "the class/register tokens carry no position (timm's no_embed_class layout, used by DINOv2 and the *_reg* "
        "register models, and big_vision's 'tok' pooling); vitkit's VisionTransformer gives the class token a "
        "position; pass img_size= (or model_name=) so vitkit can tell the layout apart and give the class token a "
        "zero position (the same function)"
    )
    if n_prefix and any(g[0] * g[1] == n_pos for _, g in hints):
        raise ValueError(
            f"{source}: pos_embed has {n_pos} rows, which cover the patch grid only, but the checkpoint has "
            f"{n_prefix} class/distillation token(s): {no_embed_class}"
        )
    full_side = _square_side(n_pos)
    if n_prefix and full_side and not _square_side(n_grid):
        raise ValueError(
            f"{source}: pos_embed has {n_pos} rows; after {n_prefix} class/distillation row(s) that leaves "
            f"{n_grid}, not a square grid. If the {n_pos} rows are a {full_side}x{full_side} patch grid, then "
            f"{no_embed_class}. If the checkpoint's grid is not square, pass img_size= (or model_name=) giving its "
            "native input size"
        )
    side = _square_side(n_grid)
    if side:
        return (side, side)
    tried = "; ".join(f"{where} gives a {g[0]}x{g[1]} grid" for where, g in hints)
    raise ValueError(
        f"{source}: pos_embed has {n_grid} grid rows (after {n_prefix} prefix rows), which is not a square grid"
        + (f" ({tried}, which does not match)" if tried else "")
        + "; pass model_name= (a registered name) or img_size= giving the checkpoint's native input size"
    )


def infer_vit_config(
    state: dict[str, torch.Tensor],
    *,
    model_name: str | None = None,
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    source: str = "state dict",
    log: LogFn | Reporter | None = None,
) -> tuple[dict[str, Any], tuple[int, int]]:
    """Decide a ViTConfig from a timm-layout state dict.

    Args:
        state: timm-layout tensors.
        model_name: a registered ViT; supplies the head count and image size and must agree with the shapes.
        num_heads: head count when the caller knows it (the JAX importer reads it from the kernels).
        img_size: helps pick the native grid of a non-square position table.
        source: name used in messages.
        log: receives one line per decision that the shapes alone could not make.

    Returns:
        ViTConfig keyword arguments (without img_size) and the checkpoint's native patch grid (H', W').
    """
    rep = as_reporter(log)
    if "patch_embed.proj.weight" not in state:
        raise ValueError(
            f"{source} is not a timm-layout ViT state dict: it has no 'patch_embed.proj.weight' "
            f"(first keys: {sorted(state)[:8]})"
        )
    proj = state["patch_embed.proj.weight"]
    if proj.ndim != 4:
        raise ValueError(f"{source}: patch_embed.proj.weight should be (D, C, p, p), got {tuple(proj.shape)}")
    D, in_chans, ph, pw = (int(s) for s in proj.shape)
    if ph != pw:
        raise ValueError(f"{source}: non-square {ph}x{pw} patches are not supported (ViTConfig.patch_size is one int)")

    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"{source}: transformer blocks should be numbered 0..n-1, found {blocks[:20]}")
    depth = len(blocks)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise ValueError(f"{source}: no 'blocks.0.mlp.fc1.weight' to read the MLP width from")
    hidden = int(fc1.shape[0])
    mlp_ratio = hidden / D
    if int(D * mlp_ratio) != hidden:
        raise ValueError(f"{source}: MLP width {hidden} is not reproducible as int({D} * mlp_ratio)")

    class_token = "cls_token" in state
    distilled = "dist_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    fc_norm = "fc_norm.weight" in state
    arch: dict[str, Any] = dict(
        patch_size=ph,
        in_chans=in_chans,
        num_classes=int(state["head.weight"].shape[0]) if "head.weight" in state else 0,
        embed_dim=D,
        depth=depth,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        class_token=class_token,
        reg_tokens=reg_tokens,
        distilled=distilled,
        # The norm after pooling (fc_norm) goes with mean pooling, as in timm; without a class token it is the
        # only pooling there is.
        pool="avg" if ((fc_norm and not distilled) or not class_token) else "token",  # DeiT: always its 2 tokens
        fc_norm=fc_norm,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,  # the value is overwritten by the weights
    )
    if fc_norm and class_token:
        rep.info(f"{source}: has fc_norm, so the head reads the mean of the patch tokens (pool='avg')")

    reg = registered_config(model_name) if model_name else None
    if reg is not None:
        clash = [f"{f} {arch[f]} (checkpoint) vs {getattr(reg, f)} ({model_name})" for f in _MUST_AGREE
                 if arch[f] != getattr(reg, f)]  # fmt: skip
        if clash:
            raise ValueError(f"{source} does not match model {model_name!r}: " + "; ".join(clash))
        arch["norm_eps"] = reg.norm_eps
        if arch["init_values"] is not None and reg.init_values:
            arch["init_values"] = reg.init_values

    # Heads: the one thing shapes cannot tell.
    if num_heads is not None:
        if reg is not None and reg.num_heads != num_heads:
            raise ValueError(f"{source} has {num_heads} attention heads but {model_name!r} has {reg.num_heads}")
        arch["num_heads"] = num_heads
    elif reg is not None:
        arch["num_heads"] = reg.num_heads
        rep.info(f"num_heads={reg.num_heads} from model {model_name!r}")
    else:
        if D % 64 != 0:
            raise ValueError(
                f"{source}: cannot tell the number of attention heads of a {D}-wide model from its weights; "
                "pass model_name= (a registered name, see vitkit.list_models())"
            )
        arch["num_heads"] = D // 64
        rep.info(
            f"num_heads={D // 64}: guessed as embed_dim {D} // 64 because the weights cannot tell; "
            "pass model_name= (a registered name) if the checkpoint uses another head width"
        )

    hints = _grid_hints(reg, model_name, img_size, ph)
    if "pos_embed" in state:
        arch["pos_embed"] = "learn"
        pos = state["pos_embed"]
        if pos.ndim != 3:
            raise ValueError(f"{source}: pos_embed should be (1, N, D), got {tuple(pos.shape)}")
        grid = _native_grid(int(pos.shape[1]), int(class_token) + int(distilled), hints, source)
    elif reg is not None:
        # Fixed sin-cos tables are computed, not stored; a name is the only way to know which kind it is.
        arch["pos_embed"] = reg.pos_embed
        rep.info(f"no pos_embed in the checkpoint: pos_embed={reg.pos_embed!r} from model {model_name!r}")
        grid = hints[0][1]
    else:
        raise ValueError(
            f"{source} has no pos_embed: the model uses either fixed sin-cos positions or none, which the weights "
            "cannot tell apart; pass model_name= (a registered name such as 'vit_small_patch16_224_gap')"
        )
    return arch, grid


def empty_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` without its random initialisation, for a strict load that overwrites every tensor anyway.

    The model is built on the meta device and given uninitialised CPU storage, which saves the (slow)
    truncated-normal init of every weight; a model with non-persistent buffers is built normally.
    """
    with torch.device("meta"):
        model = build()
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        # Buffers outside the state dict (Swin's relative_position_index) are computed by __init__ and no load
        # fills them: to_empty would leave them uninitialised, so such a model is built for real.
        return build()
    return model.to_empty(device="cpu")


def build_vit(
    arch: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    grid: tuple[int, int],
    img_size: int | tuple[int, int] | None = None,
    preprocess: Preprocess | None = None,
    source: str = "state dict",
    log: LogFn | Reporter | None = None,
    family: str | None = None,
) -> VisionTransformer:
    """Build a VisionTransformer and load `state` into it strictly, resampling positions for another size.

    Args:
        arch: ViTConfig (or DeiTConfig) fields except img_size.
        state: timm-layout tensors (not modified).
        grid: the checkpoint's native patch grid.
        img_size: input size for the model; None keeps the checkpoint's.
        preprocess: preprocessing metadata; its input_size is set to the model's.
        source: name used in error messages.
        log: receives a line when the position table is resampled.
        family: "vit" or "deit"; None = "deit" for a checkpoint with a distillation token, else "vit".
    """
    rep = as_reporter(log)
    family = family or ("deit" if arch.get("distilled") else "vit")
    if family not in VIT_FAMILIES:
        raise ValueError(f"family {family!r} is not in the ViT layout; expected one of {', '.join(VIT_FAMILIES)}")
    config_cls, model_cls = get_family(family)
    patch = arch["patch_size"]
    native_size = (grid[0] * patch, grid[1] * patch)
    target = as_img_size(img_size) if img_size is not None else native_size
    model = empty_model(lambda: model_cls(config_cls(**arch, img_size=target)))
    state = dict(state)
    if "pos_embed" in state and model.native_grid != tuple(grid):
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.native_grid, grid, model.num_pos_prefix)
        rep.info(
            f"resampled pos_embed from a {grid[0]}x{grid[1]} to a {model.native_grid[0]}x{model.native_grid[1]} "
            f"grid ({native_size[0]}x{native_size[1]} -> {target[0]}x{target[1]} px)"
        )
    model = match_state_dtype(model, state, source=source, log=rep.info)
    load_state_dict_strict(model, state, source=source)
    pre = preprocess if preprocess is not None else Preprocess()
    model.preprocess = dataclasses.replace(pre, input_size=target)
    return model


def _positions_for_prefix_tokens(
    state: dict[str, torch.Tensor],
    *,
    model_name: str | None,
    img_size: int | tuple[int, int] | None,
    log: Reporter,
) -> dict[str, torch.Tensor]:
    """Give the class/distillation tokens a zero position when the checkpoint's table covers the patches only.

    timm's `no_embed_class` layout (DINOv2, the `*_reg*` register models) adds positions to the patches alone.
    vitkit's table also has rows for the class and distillation tokens; a zero row there is exactly "no
    position", so the converted model computes the same function. Returns a new dict; `state` is not modified.
    """
    pos = state.get("pos_embed")
    n_prefix = int("cls_token" in state) + int("dist_token" in state)
    if pos is None or pos.ndim != 3 or n_prefix == 0:
        return state
    n_pos = int(pos.shape[1])
    proj = state.get("patch_embed.proj.weight")
    reg = registered_config(model_name) if model_name else None
    hints = _grid_hints(reg, model_name, img_size, int(proj.shape[-1])) if proj is not None and proj.ndim == 4 else []
    if hints:
        covers_patches_only = any(g[0] * g[1] == n_pos for _, g in hints)
    else:
        # Without a size we could only guess: 9 rows may be a 3x3 grid without a class row or a 2x4 grid with
        # one. Leave it to the grid inference, which raises and asks for img_size= or model_name=.
        covers_patches_only = False
    if not covers_patches_only:
        return state
    log.info(
        f"pos_embed has {n_pos} rows covering the patch grid only (timm's no_embed_class layout): giving the "
        f"{n_prefix} class/distillation token(s) a zero position, which is the same function"
    )
    return {**state, "pos_embed": torch.cat([pos.new_zeros(1, n_prefix, pos.shape[2]), pos], dim=1)}


# Key prefixes of the timm/torchvision layouts of the other families: their architecture is not read from the shapes,
# so such a file loads only with a registered name (checked in order: the hybrids also hold ViT keys).
_OTHER_LAYOUTS = (
    ("patch_embed.backbone.", "vit_hybrid", "a ViT on a CNN backbone (timm's vision_transformer_hybrid)"),
    ("patch_embed.stem.", "vit_hybrid_cnn", "a ViT on a convolutional stem"),
    ("layers.0.blocks.", "swin", "a Swin Transformer"),
    ("stages.0.blocks.0.conv_dw.", "convnext", "a ConvNeXt"),
    ("features.1.0.block.", "convnext", "a torchvision ConvNeXt"),
    ("stem.conv.", "resnetv2", "a ResNetV2"),
    ("layer1.0.", "resnet", "a ResNet"),
)


def _other_family_layout(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming the family and its registered names when the keys are another family's layout."""
    for prefix, family, what in _OTHER_LAYOUTS:
        if any(k.startswith(prefix) for k in state):
            names = [n for n in list_models() if model_family(n) == family]
            raise ValueError(
                f"{source} holds {what} ('{prefix}*' keys, family {family!r}), whose architecture a state dict does "
                f"not describe: pass model_name= (--model on the command line), one of: {', '.join(names)}"
            )


def from_timm_state_dict(
    state: dict[str, torch.Tensor],
    *,
    model_name: str | None = None,
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    preprocess: Preprocess | None = None,
    source: str = "state dict",
    log: LogFn | Reporter | None = None,
) -> VisionTransformer:
    """A ready VisionTransformer from a timm-layout state dict (timm, or vitkit's own `state_dict()`).

    Args:
        state: timm-layout tensors, already unwrapped (see `vitkit.weights.read_state_dict`).
        model_name: a registered ViT name; gives the head count (which shapes cannot) and is checked against
            the shapes.
        num_heads: head count, when known from elsewhere.
        img_size: input size for the model; the position table is resampled when it differs from the
            checkpoint's grid. Also used to recognise a non-square native grid.
        preprocess: preprocessing metadata; None means ImageNet mean/std (timm's default), logged as assumed.
        source: name used in messages.
        log: receives one line per inferred choice (heads, pooling, resampling).
    """
    rep = as_reporter(log)
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state):
        raise ValueError(
            f"{source} is a Hugging Face transformers state dict; load the directory that holds it together with "
            "its config.json (the config gives the architecture and LayerNorm epsilon)"
        )
    if model_name is None:
        _other_family_layout(state, source)
    state = _positions_for_prefix_tokens(state, model_name=model_name, img_size=img_size, log=rep)
    arch, grid = infer_vit_config(
        state, model_name=model_name, num_heads=num_heads, img_size=img_size, source=source, log=rep
    )
    if arch["distilled"] and "head.weight" in state and "head_dist.weight" not in state:
        arch["dist_head"] = False  # one head on the class token (transformers' DeiTForImageClassification)
    if preprocess is None:
        rep.info(
            "a timm state dict stores no preprocessing: assuming ImageNet mean/std, bicubic, crop 0.875 "
            "(set model.preprocess if the checkpoint was trained otherwise)"
        )
    family = model_family(model_name) if model_name else None  # "deit" for the DeiT names
    model = build_vit(
        arch, state, grid=grid, img_size=img_size, preprocess=preprocess, source=source, log=rep, family=family
    )
    if model_name:
        model.model_name = model_name
    return model
