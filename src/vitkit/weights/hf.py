"""Hugging Face transformers ViT directories (`config.json` + `model.safetensors` or `pytorch_model.bin`).

The config gives the architecture; the weights are renamed into timm layout (q, k and v fused into one qkv
matrix) and loaded strictly. Both the layout `save_pretrained` writes (`encoder.layer.{i}.attention.attention.
query`) and the module layout of transformers 5 (`layers.{i}.attention.q_proj`) are understood.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from vitkit.models.base import INCEPTION_MEAN, INCEPTION_STD, Preprocess
from vitkit.models.vit import VisionTransformer
from vitkit.runs import model_config
from vitkit.weights._log import LogFn, Reporter, as_reporter
from vitkit.weights.keymap import KeyRule, KeyTable
from vitkit.weights.safe_load import read_safetensors, read_torch, unwrap_state_dict
from vitkit.weights.timm import build_vit

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
# Weight files in the order transformers prefers them; an index file lists the shards of a split checkpoint.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SUPPORTED_ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
# PIL resampling filters as stored in preprocessor_config.json.
_PIL_FILTERS = {0: "nearest", 2: "bilinear", 3: "bicubic"}

_W = "{w:weight|bias}"
# transformers key (without the "vit." prefix) <-> timm key; {i} is the block index. Read by the importer and the
# exporter (weights/export_hf.py); the import-only rules are transformers 5's live module names. q/k/v apart.
KEYS = KeyTable(
    [
        ("embeddings.cls_token", "cls_token"),
        ("embeddings.position_embeddings", "pos_embed"),
        (f"embeddings.patch_embeddings.projection.{_W}", "patch_embed.proj.{w}"),
        (f"encoder.layer.{{i}}.layernorm_before.{_W}", "blocks.{i}.norm1.{w}"),
        KeyRule(f"layers.{{i}}.layernorm_before.{_W}", "blocks.{i}.norm1.{w}", export=False),
        (f"encoder.layer.{{i}}.layernorm_after.{_W}", "blocks.{i}.norm2.{w}"),
        KeyRule(f"layers.{{i}}.layernorm_after.{_W}", "blocks.{i}.norm2.{w}", export=False),
        (f"encoder.layer.{{i}}.attention.output.dense.{_W}", "blocks.{i}.attn.proj.{w}"),
        KeyRule(f"layers.{{i}}.attention.o_proj.{_W}", "blocks.{i}.attn.proj.{w}", export=False),
        (f"encoder.layer.{{i}}.intermediate.dense.{_W}", "blocks.{i}.mlp.fc1.{w}"),
        (f"encoder.layer.{{i}}.output.dense.{_W}", "blocks.{i}.mlp.fc2.{w}"),
        KeyRule(f"layers.{{i}}.mlp.{{fc:fc1|fc2}}.{_W}", "blocks.{i}.mlp.{fc}.{w}", export=False),
        (f"layernorm.{_W}", "norm.{w}"),
        (f"classifier.{_W}", "head.{w}"),
    ]
)
# The on-disk names of the three projections that timm fuses into `blocks.{i}.attn.qkv`, in that order.
QKV_PARTS = ("query", "key", "value")
QKV_KEY = "encoder.layer.{i}.attention.attention.{part}.{w}"
_QKV = [
    re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)"),
    re.compile(r"layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)"),
]
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}
_POOLER = re.compile(r"pooler\.dense\.(weight|bias)")


def hf_model_type(directory: str | os.PathLike) -> str | None:
    """The `model_type` of a Hugging Face model directory, or None when it is not one."""
    model_type = model_config(directory).get("model_type")
    return model_type if isinstance(model_type, str) else None


def looks_like_hf_state_dict(state: dict[str, Any]) -> bool:
    return any(k.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in state)


def hf_to_timm_state_dict(
    state: dict[str, torch.Tensor], *, source: str = "state dict", log: LogFn | Reporter | None = None
) -> dict[str, torch.Tensor]:
    """Rename a transformers ViT state dict into timm layout, fusing query/key/value into qkv.

    A `ViTModel` pooler (dense + tanh on the class token) has no vitkit counterpart: it is dropped, with a warning
    through `log`. Any other key without a counterpart raises.
    """
    rep = as_reporter(log)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    unknown, pooler = [], []
    for key, value in state.items():
        k = key.removeprefix("vit.")
        if _POOLER.fullmatch(k):
            pooler.append(key)
            continue
        m = next((m for p in _QKV if (m := p.fullmatch(k))), None)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[_QKV_ORDER[m.group(2)]] = value
            continue
        new = KEYS.to_timm(k)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"{source}: keys with no counterpart in vitkit's VisionTransformer ({len(unknown)}): {sorted(unknown)}"
        )
    for (block, kind), parts in sorted(qkv.items()):
        if sorted(parts) != [0, 1, 2]:
            missing = [n for n, i in (("query", 0), ("key", 1), ("value", 2)) if i not in parts]
            raise ValueError(f"{source}: block {block} attention {kind} is missing {missing}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)  # (3D, ...)
    if pooler:
        rep.warn(
            f"{source}: dropped the ViTModel pooler ({', '.join(sorted(pooler))}): vitkit has no pooler layer "
            "(it is a dense + tanh on the class token that image classification does not use)"
        )
    return out


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise ValueError(f"config {name}={value!r} should be an int or a [height, width] pair")


def check_hf_config(config: dict[str, Any], *, source: str) -> None:
    """Refuse transformers configs that are not a ViT classifier or backbone."""
    if config.get("model_type") != "vit":
        raise ValueError(
            f"{source}: model_type={config.get('model_type')!r} is not supported; only transformers ViT "
            "(model_type 'vit') directories can be imported"
        )
    archs = config.get("architectures") or []
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ValueError(
            f"{source}: architecture {bad} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def arch_from_hf_config(config: dict[str, Any], *, num_classes: int, source: str) -> dict[str, Any]:
    """ViTConfig fields (except img_size) from a transformers ViT config; refuses options vitkit lacks."""
    check_hf_config(config, source=source)
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(
            f"{source}: hidden_act={act!r} is not supported; vitkit's MLP uses exact GELU, i.e. hidden_act='gelu'"
        )
    ph, pw = _pair(config.get("patch_size", 16), "patch_size")
    if ph != pw:
        raise ValueError(f"{source}: non-square patch_size {[ph, pw]} is not supported")
    D = int(config.get("hidden_size", 768))
    hidden = int(config.get("intermediate_size", 4 * D))
    if int(D * (hidden / D)) != hidden:
        raise ValueError(f"{source}: intermediate_size {hidden} is not reproducible as int({D} * mlp_ratio)")
    return dict(
        patch_size=ph,
        in_chans=int(config.get("num_channels", 3)),
        num_classes=num_classes,
        embed_dim=D,
        depth=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 12)),
        mlp_ratio=hidden / D,
        qkv_bias=bool(config.get("qkv_bias", True)),
        class_token=True,
        pool="token",
        drop_rate=float(config.get("hidden_dropout_prob", 0.0)),
        attn_drop_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
    )


def _crop_fraction(crop: int, resized: int) -> float:
    """The crop fraction c with which vitkit's eval preprocessing, floor(crop / c), resizes to `resized` again.

    crop / resized alone can come back one pixel short in floating point (80 / (80 / 106) = 105.99...), so c is
    lowered by the few ulps that takes.
    """
    if crop >= resized:
        return 1.0
    c = crop / resized
    while math.floor(crop / c) < resized:
        c = math.nextafter(c, 0.0)
    return c


def preprocess_from_hf(
    preprocessor: dict[str, Any] | None,
    config: dict[str, Any],
    num_classes: int,
    rep: Reporter,
    model_size: tuple[int, int] = (224, 224),
) -> Preprocess:
    """Preprocess from preprocessor_config.json (ViTImageProcessor) and the labels from config.json's id2label."""
    class_names = None
    id2label = config.get("id2label") or {}
    if num_classes > 0 and id2label:
        labels = {int(k): str(v) for k, v in id2label.items()}
        if sorted(labels) == list(range(num_classes)):
            class_names = [labels[i] for i in range(num_classes)]
        else:
            rep.info(f"id2label has {len(labels)} entries for a {num_classes}-class head: class names not set")
    if preprocessor is None:
        rep.info(
            f"no {PREPROCESSOR_NAME}: assuming ViTImageProcessor defaults (mean=std=0.5, bilinear resize to the "
            "model size, no crop)"
        )
        return Preprocess(INCEPTION_MEAN, INCEPTION_STD, crop_fraction=1.0, interpolation="bilinear",
                          class_names=class_names)  # fmt: skip
    mean, std = INCEPTION_MEAN, INCEPTION_STD
    if preprocessor.get("do_normalize", True):
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if not preprocessor.get("do_rescale", True):
        rep.warn(f"{PREPROCESSOR_NAME} has do_rescale=false; vitkit's preprocessing always scales pixels to 0..1")
    resample = preprocessor.get("resample", 2)
    interpolation = _PIL_FILTERS.get(resample)
    if interpolation is None:
        rep.warn(f"{PREPROCESSOR_NAME} resample={resample!r} has no vitkit equivalent; using bicubic")
        interpolation = "bicubic"
    crop_fraction = 1.0
    size = preprocessor.get("size")
    fed = preprocessor.get("crop_size") if preprocessor.get("do_center_crop") else size
    if isinstance(fed, dict) and "height" in fed and (fed["height"], fed.get("width")) != tuple(model_size):
        rep.warn(
            f"{PREPROCESSOR_NAME} feeds {fed['height']}x{fed.get('width')} images to a model configured for "
            f"{model_size[0]}x{model_size[1]}; vitkit's preprocessing uses the model size"
        )
    crop = preprocessor.get("crop_size") if preprocessor.get("do_center_crop") else None
    if crop is not None and isinstance(size, dict) and "shortest_edge" in size:
        crop_h = crop["height"] if isinstance(crop, dict) else int(crop)
        crop_fraction = _crop_fraction(crop_h, int(size["shortest_edge"]))
    elif crop is not None and isinstance(size, dict) and "height" in size:  # resize to (h, w), then crop (DeiT's)
        crop_h = crop["height"] if isinstance(crop, dict) else int(crop)
        crop_fraction = _crop_fraction(crop_h, int(size["height"]))
    return Preprocess(mean, std, crop_fraction=crop_fraction, interpolation=interpolation, class_names=class_names)


def read_hf_weights(directory: Path, rep: Reporter) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a transformers model directory (single file or shards) and the file it came from."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_path = directory / shard
                obj = read_safetensors(shard_path) if shard.endswith(".safetensors") else read_torch(shard_path)
                state.update(unwrap_state_dict(obj, source=str(shard_path), log=rep))
            rep.info(f"read {len(shards)} shards listed in {path}")
            return state, str(path)
        obj = read_safetensors(path) if name.endswith(".safetensors") else read_torch(path)
        return unwrap_state_dict(obj, source=str(path), log=rep), str(path)
    raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but none of {', '.join(WEIGHT_FILES)}")


def from_hf_state_dict(
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    preprocessor: dict[str, Any] | None = None,
    img_size: int | tuple[int, int] | None = None,
    source: str = "state dict",
    log: LogFn | Reporter | None = None,
) -> VisionTransformer:
    """A ready VisionTransformer from a transformers ViT config dict and its state dict.

    Args:
        config: contents of config.json.
        state: the transformers state dict (with or without the `vit.` prefix).
        preprocessor: contents of preprocessor_config.json, if any.
        img_size: input size for the model; positions are resampled when it differs from config image_size.
        source: name used in messages.
        log: receives a line per assumption or dropped tensor.
    """
    rep = as_reporter(log)
    check_hf_config(config, source=source)
    timm_state = hf_to_timm_state_dict(state, source=source, log=rep)
    num_classes = int(timm_state["head.weight"].shape[0]) if "head.weight" in timm_state else 0
    arch = arch_from_hf_config(config, num_classes=num_classes, source=source)
    image_size = _pair(config.get("image_size", 224), "image_size")
    patch = arch["patch_size"]
    if image_size[0] % patch or image_size[1] % patch:
        raise ValueError(f"{source}: image_size {list(image_size)} is not a multiple of patch_size {patch}")
    grid = (image_size[0] // patch, image_size[1] // patch)
    if "pos_embed" in timm_state and timm_state["pos_embed"].shape[1] != 1 + grid[0] * grid[1]:
        raise ValueError(
            f"{source}: position_embeddings has {timm_state['pos_embed'].shape[1]} rows, but image_size "
            f"{list(image_size)} and patch_size {patch} imply 1 + {grid[0]}x{grid[1]}"
        )
    pre = preprocess_from_hf(preprocessor, config, num_classes, rep, model_size=image_size)
    return build_vit(arch, timm_state, grid=grid, img_size=img_size, preprocess=pre, source=source, log=rep)


def load_hf_vit(
    directory: str | os.PathLike,
    *,
    img_size: int | tuple[int, int] | None = None,
    log: LogFn | Reporter | None = None,
) -> VisionTransformer:
    """Load a transformers `ViTForImageClassification` or `ViTModel` directory as a VisionTransformer.

    Args:
        directory: holds config.json, model.safetensors or pytorch_model.bin (or their sharded forms) and,
            optionally, preprocessor_config.json.
        img_size: input size for the model; positions are resampled when it differs from the config's.
        log: receives one line per assumption, dropped tensor or resampling.
    """
    rep = as_reporter(log)
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    check_hf_config(config, source=str(directory / CONFIG_NAME))
    pre_path = directory / PREPROCESSOR_NAME
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    state, source = read_hf_weights(directory, rep)
    return from_hf_state_dict(config, state, preprocessor=preprocessor, img_size=img_size, source=source, log=rep)
