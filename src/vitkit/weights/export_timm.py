"""Weights out as a timm state dict: one file (`.safetensors`, or `.pth`/`.pt`/`.bin` through `torch.save`).

vitkit's families already use timm's parameter names (checked per family against timm's source in
tests/weights/test_export.py): ViT `cls_token`/`pos_embed`/`blocks.N.attn.qkv`/`ls1.gamma`/`reg_token`, DeiT
`dist_token`/`head_dist`, Swin >= timm 0.9 (`layers.N.downsample` at the start of stages 1.., `head.fc`; the
`relative_position_index` and `attn_mask` buffers are not stored, as in timm), ConvNeXt (`stem.0`, `stages.N.
blocks.M.conv_dw`, `gamma`, `head.norm`/`head.fc`), ResNet (torchvision's names), ResNetV2 (timm's
`resnetv2`: `stem.conv/norm`, `stages.N.blocks.M.conv1..3/norm1..3`). So the file is the model's state dict as
it is; so is a hybrid ViT on a ResNetV2 backbone (timm's `vision_transformer_hybrid`:
`patch_embed.backbone.stem/stages`, `patch_embed.proj`). What a state dict cannot carry is the config: a file is
read back by shapes and a registered name (`vitkit.load_model(file, model_name=...)`), and fields that neither
decides are named in a warning when written.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vitkit._io import atomic_path
from vitkit._version import __version__
from vitkit.models.registry import create_model, list_models, model_family
from vitkit.weights._log import LogFn, Reporter, as_reporter
from vitkit.weights.timm import infer_vit_config

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
TIMM_FAMILIES = ("vit", "deit", "swin", "convnext", "resnet", "resnetv2", "vit_hybrid")
# vitkit layer names timm's VisionTransformer has a counterpart for (same tensor names).
_TIMM_LAYERS = {"attn_layer": ("mha",), "embed_layer": ("patch",)}
# timm's vision_transformer_hybrid: a ViT whose patch embedding is a ResNetV2 (the R50/R26 hybrids' layout).
_TIMM_HYBRID_LAYERS = {"attn_layer": ("mha",), "embed_layer": ("hybrid",)}


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under timm's names (independent, contiguous CPU copies).

    Raises:
        ValueError: a family or layer timm has no counterpart for, named.
    """
    family = getattr(model, "family", None)
    if family not in TIMM_FAMILIES:
        raise ValueError(
            f"family {family!r} ({type(model).__name__}) has no timm layout here; families written as timm state "
            f"dicts: {', '.join(TIMM_FAMILIES)}"
        )
    cfg = model.describe() if hasattr(model, "describe") else model.cfg
    layers = _TIMM_LAYERS
    if family == "vit_hybrid":
        layers = _TIMM_HYBRID_LAYERS
        if model_family(cfg.backbone) != "resnetv2":
            raise ValueError(
                f"backbone={cfg.backbone!r} has no timm layout: timm's hybrid ViTs (vision_transformer_hybrid) are "
                "built on its ResNetV2 (vitkit's resnetv2_* backbones, as in vit_base_r50_s16_224)"
            )
    for name, allowed in layers.items():
        value = getattr(cfg, name, allowed[0])
        if value not in allowed:
            raise ValueError(f"{name}={value!r} has no timm counterpart (timm's ViT has {', '.join(allowed)})")
    if getattr(cfg, "pos_embed", None) == "peg":
        raise ValueError("pos_embed='peg' has no timm counterpart: timm's ViT has no position generator (pos_block)")
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _reload_differences(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[str | None, list[str]]:
    """(the registered name vitkit would reload the file with, config fields that reload would not recover)."""
    cfg = model.describe()
    name = getattr(model, "model_name", None)
    name = name if name in list_models() and model_family(name) == model.family else None
    skip = {"num_classes", "img_size", "drop_rate", "attn_drop_rate", "drop_path_rate", "head_drop_rate"}
    if model.family in ("vit", "deit"):  # the shapes decide a ViT; a name adds the heads
        arch = None
        for candidate in dict.fromkeys([name, None]):  # a name whose architecture the model no longer has: shapes
            try:
                arch, _ = infer_vit_config(state, model_name=candidate, log=lambda _: None)
            except ValueError as e:
                error = e
                continue
            name = candidate
            break
        if arch is None:
            return None, [f"(the shapes do not decide the architecture: {_unprefixed(error)})"]
        if arch.get("distilled") and "head.weight" in state and "head_dist.weight" not in state:
            arch["dist_head"] = False  # as from_timm_state_dict decides it on reload
        rebuilt = dataclasses.replace(type(cfg)(img_size=cfg.img_size), **arch)
    elif name is not None:
        with torch.device("meta"):
            rebuilt = create_model(name).cfg
    else:
        return None, ["(no registered model name: vitkit reloads a non-ViT state dict only by a registered name)"]
    diffs = [
        f"{f.name}={getattr(cfg, f.name)!r} (reload gives {getattr(rebuilt, f.name)!r})"
        for f in dataclasses.fields(cfg)
        if f.name not in skip and _value(cfg, f.name) != _value(rebuilt, f.name)
    ]
    return name, diffs


def _unprefixed(error: ValueError) -> str:
    """An importer error without its leading "state dict: " source name (the warning names the file already)."""
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith("state dict: ") else text


def _value(cfg: Any, name: str) -> Any:
    """A config value as it acts: a ViT's fc_norm=None means "on exactly when pool='avg'", a DeiT's dist_head=None
    "a distillation head exactly when distilled"."""
    value = getattr(cfg, name)
    if name == "fc_norm" and value is None:
        return cfg.pool == "avg"
    if name == "dist_head" and value is None:
        return cfg.distilled
    return value


def save_timm(model: nn.Module, path: str | os.PathLike, *, log: LogFn | Reporter | None = None) -> Path:
    """Write the model's timm-layout state dict to one file, atomically; the format is chosen by the suffix.

    Args:
        model: a vitkit model of a family in `TIMM_FAMILIES`.
        path: `.safetensors` (safetensors), or `.pth` / `.pt` / `.bin` (`torch.save` of a plain dict of tensors,
            readable with `torch.load(weights_only=True)`).
        log: receives a warning naming config fields that `vitkit.load_model(path, model_name=...)` cannot
            recover from the file (e.g. a non-default activation), and the name to reload it with.

    Raises:
        ValueError: another suffix, a directory at `path`, or a model timm has no layout for.
    """
    rep = as_reporter(log)
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: suffix {path.suffix or '(none)'!r} is not a state dict format; use one of {', '.join(SUFFIXES)}"
        )
    if path.is_dir():
        raise ValueError(f"{path} is a directory; --to timm writes one file ({', '.join(SUFFIXES)})")
    state = timm_state_dict(model)
    name, diffs = _reload_differences(model, state)
    meta: dict[str, Any] = {"format": "pt", "producer": f"vitkit {__version__}"}
    if name:
        meta["model_name"] = name
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(state, str(tmp), metadata=meta)
        else:
            torch.save(state, tmp)
    how = f"model_name={name!r}" if name else "model_name=NAME (a registered name of this architecture)"
    if diffs and diffs[0].startswith("("):  # no reload by shapes or name gives this model: say why, not a field list
        rep.warn(
            f"{path}: a state dict holds no config, and this one does not give the model back by itself "
            f"{diffs[0]}. Keep a vitkit directory (--to vitkit) to reload it"
        )
    elif diffs:
        rep.warn(
            f"{path}: a state dict holds no config, and vitkit.load_model(..., {how}) would rebuild this model with "
            f"other values for: {'; '.join(diffs)}. Keep a vitkit directory (--to vitkit) to keep them"
        )
    else:
        rep.info(f"{path}: load it back with vitkit.load_model(path, {how})")
    return path
