"""Weights out: vitkit models as Hugging Face transformers directories that `from_pretrained` loads.

    save_hf(model, "out/")   # config.json + model.safetensors + preprocessor_config.json
    transformers.AutoModelForImageClassification.from_pretrained("out/")   # the same logits

Each family registers one exporter `fn(model) -> (config.json dict, on-disk state dict)` with
`register_hf_exporter`. The key names come from the same tables the importers read (`KEYS` in weights/hf.py,
hf_swin.py, hf_convnext.py, hf_resnet.py), written as transformers' `save_pretrained` writes them (its 4.x names,
which transformers 5 keeps on disk).

A model transformers cannot represent (register tokens, average pooling with fc_norm, sin-cos positions, SwiGLU,
RMSNorm, qk-norm, layer scale on a ViT, a replaced head, a non-default epsilon or kernel ...) is refused with a
ValueError naming the field and its value; every config field an exporter does not know must hold its default,
and every tensor of the model must be written, so a new option cannot be dropped silently. Fields that only act
in training (dropout and stochastic-depth rates transformers lacks, initialisation) are written where transformers
has them and otherwise reported as dropped.

Before the directory is swapped in, the export is read back with vitkit's importer for its model type (tensors bit
for bit, config fields) and, when transformers is installed, loaded by it and its logits compared with the model's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vitkit._io import atomic_write_dir
from vitkit._version import __version__
from vitkit.models.base import config_to_dict
from vitkit.weights._log import LogFn, Reporter, as_reporter
from vitkit.weights.hf import (
    CONFIG_NAME,
    PREPROCESSOR_NAME,
    QKV_KEY,
    QKV_PARTS,
    hf_model_type,
    hf_to_timm_state_dict,
)
from vitkit.weights.hf import KEYS as VIT_KEYS
from vitkit.weights.hf_convnext import KEYS as CONVNEXT_KEYS
from vitkit.weights.hf_families import hf_converter
from vitkit.weights.hf_resnet import KEYS as RESNET_KEYS
from vitkit.weights.hf_swin import KEYS as SWIN_KEYS
from vitkit.weights.hf_swin import QKV_PARTS as SWIN_QKV_PARTS

WEIGHTS_NAME = "model.safetensors"
HF_FILES = (CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME)

HFExport = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (config.json fields, on-disk state dict)
Exporter = Callable[[nn.Module, Reporter], HFExport]

# vitkit family -> exporter. Families add themselves with `register_hf_exporter`.
_EXPORTERS: dict[str, Exporter] = {}

# vitkit activation name -> transformers' `hidden_act` (ACT2FN); gelu_pytorch_tanh is the tanh approximation.
_HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# vitkit interpolation -> PIL resampling filter number in preprocessor_config.json.
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def register_hf_exporter(family: str, fn: Exporter) -> None:
    """Let `save_hf` write models of vitkit `family` with `fn(model, reporter) -> (config dict, state dict)`."""
    if family in _EXPORTERS:
        raise ValueError(f"a transformers exporter for family {family!r} is registered twice")
    _EXPORTERS[family] = fn


def hf_exporters() -> list[str]:
    """The vitkit families that can be written as transformers directories."""
    return sorted(_EXPORTERS)


# --- shared checks -----------------------------------------------------------------------------------------------
def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{field}={value!r} has no transformers equivalent: {why}")


def _check_defaults(cfg: Any, handled: set[str], family: str) -> None:
    """Every config field the exporter does not write must hold its default; otherwise it would be lost."""
    for f in dataclasses.fields(cfg):
        if f.name in handled:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = getattr(cfg, f.name)
        if value != default:
            raise _refuse(
                f.name,
                value,
                f"the {family} exporter writes no such option (only its default {default!r} can be exported)",
            )


def _dropped_training_fields(cfg: Any, names: tuple[str, ...], rep: Reporter) -> None:
    set_ = [f"{n}={getattr(cfg, n)}" for n in names if getattr(cfg, n)]
    if set_:
        rep.info(f"not exported (training only, no transformers field; logits are unaffected): {', '.join(set_)}")


def _labels(model: nn.Module, num_classes: int) -> dict[str, Any]:
    """num_labels, and id2label / label2id from the model's class names (transformers names them LABEL_i without)."""
    names = model.preprocess.class_names
    if not names or len(names) != num_classes:
        return {"num_labels": num_classes}
    return {
        "num_labels": num_classes,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def _hf_act(name: str) -> str:
    if name not in _HF_ACTS:
        raise _refuse("act_layer", name, f"transformers' activations cover {', '.join(_HF_ACTS)}")
    return _HF_ACTS[name]


def _size(img_size: tuple[int, int]) -> int | list[int]:
    return img_size[0] if img_size[0] == img_size[1] else list(img_size)


# Classifiers sit beside the backbone in every *ForImageClassification model; everything else under its prefix.
_TOP_LEVEL = ("classifier.", "cls_classifier.", "distillation_classifier.")


def _rename_all(
    state: dict[str, torch.Tensor], rename: Callable[[str], str | None], prefix: str, family: str
) -> dict[str, torch.Tensor]:
    """Rename every tensor with `rename`; a tensor without a transformers name is refused by name (never dropped)."""
    out, missing = {}, []
    for key, value in state.items():
        new = rename(key)
        if new is None:
            missing.append(key)
        else:
            out[new if new.startswith(_TOP_LEVEL) else prefix + new] = value
    if missing:
        raise ValueError(f"{family} tensors with no transformers counterpart ({len(missing)}): {sorted(missing)}")
    return out


# --- ViT and distilled ViT (DeiT) --------------------------------------------------------------------------------
_VIT_HANDLED = {
    "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "qk_norm", "class_token", "reg_tokens", "distilled", "pool", "pos_embed", "fc_norm", "drop_rate",
    "attn_drop_rate", "drop_path_rate", "head_drop_rate", "init_values", "norm_eps", "attn_layer", "attn_args",
    "mlp_layer", "act_layer", "norm_layer", "embed_layer", "dist_head",
}  # fmt: skip


def _check_vit(cfg: Any) -> None:
    must = [
        ("qk_norm", False, "transformers' ViT attention has no query/key norm"),
        ("class_token", True, "transformers' ViT always prepends a class token"),
        ("reg_tokens", 0, "transformers' ViT has no register tokens"),
        ("pool", "token", "transformers' ViT classifies the class token"),
        ("pos_embed", "learn", "transformers' ViT has a learned position table only"),
        ("init_values", None, "transformers' ViT has no layer scale"),
        ("attn_layer", "mha", "transformers' ViT uses global multi-head attention"),
        ("attn_args", {}, "transformers' ViT attention takes no options"),
        ("mlp_layer", "mlp", "transformers' ViT MLP is fc1 -> act -> fc2 (no gated MLP)"),
        ("norm_layer", "layernorm", "transformers' ViT uses LayerNorm"),
        ("embed_layer", "patch", "transformers' ViT embeds patches with a strided convolution"),
    ]
    for name, want, why in must:
        if getattr(cfg, name) != want:
            raise _refuse(name, getattr(cfg, name), why)
    if cfg.fc_norm:  # None and False both mean "norm before pooling" for pool='token'
        raise _refuse("fc_norm", cfg.fc_norm, "transformers' ViT norms the tokens before the classifier, not after")
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    if not math.isclose(hidden, cfg.embed_dim * cfg.mlp_ratio):
        raise _refuse("mlp_ratio", cfg.mlp_ratio, f"embed_dim {cfg.embed_dim} * mlp_ratio is not a whole width")


def vit_to_hf(model: nn.Module, rep: Reporter) -> HFExport:
    """A VisionTransformer as `ViTForImageClassification` or, with `cfg.distilled`, as transformers' DeiT
    `DeiTForImageClassificationWithTeacher` (class and distillation heads, logits averaged as in vitkit), or
    `DeiTForImageClassification` for a DeiT with `dist_head=False` (one classifier, on the class token).

    Raises:
        ValueError: a config field with no transformers counterpart (named with its value), or a head that
            config.json cannot describe.
    """
    cfg = model.describe()  # raises for heads replaced by something other than a Linear / Identity
    _check_defaults(cfg, _VIT_HANDLED, "vit")
    _check_vit(cfg)
    _dropped_training_fields(cfg, ("drop_path_rate", "head_drop_rate"), rep)
    distilled = bool(cfg.distilled)
    dist_head = distilled and bool(getattr(cfg, "has_dist_head", distilled))  # DeiTConfig may drop that head
    model_type, prefix = ("deit", "deit.") if distilled else ("vit", "vit.")
    if not distilled:
        architecture = "ViTForImageClassification"
    elif dist_head:
        architecture = "DeiTForImageClassificationWithTeacher"
    else:  # a distillation token but one classifier on the class token
        architecture = "DeiTForImageClassification"
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio),
        "hidden_act": _hf_act(cfg.act_layer),
        "hidden_dropout_prob": cfg.drop_rate,
        "attention_probs_dropout_prob": cfg.attn_drop_rate,
        "layer_norm_eps": cfg.norm_eps,
        "image_size": _size(cfg.img_size),
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "encoder_stride": cfg.patch_size,
        **_labels(model, cfg.num_classes),
    }

    def rename(key: str) -> str | None:
        if distilled:  # the distillation token and the two heads have DeiT's names
            head = "cls_classifier." if dist_head else "classifier."
            for ours, theirs in (("dist_token", "embeddings.distillation_token"), ("head.", head),
                                 ("head_dist.", "distillation_classifier.")):  # fmt: skip
                if key.startswith(ours):
                    return theirs + key[len(ours) :]
        return VIT_KEYS.to_hf(key)

    state = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key in [k for k in state if k.endswith((".attn.qkv.weight", ".attn.qkv.bias"))]:
        block, kind = int(key.split(".")[1]), key.rsplit(".", 1)[1]
        for part, tensor in zip(QKV_PARTS, state.pop(key).chunk(3, dim=0), strict=True):  # (3D, ...) -> 3 x (D, ...)
            out[prefix + QKV_KEY.format(i=block, part=part, w=kind)] = tensor
    out.update(_rename_all(state, rename, prefix, model_type))
    return config, out


# --- Swin ----------------------------------------------------------------------------------------------------------
def swin_to_hf(model: nn.Module, rep: Reporter) -> HFExport:
    """A SwinTransformer as transformers' `SwinForImageClassification`.

    Raises:
        ValueError: a norm other than LayerNorm, an epsilon other than 1e-5 (transformers fixes it for the patch
            embedding and merging norms), an unknown activation, or any non-default field it does not write.
    """
    cfg = model.describe()
    handled = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads", "window_size",
               "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "norm_layer", "norm_eps",
               "act_layer"}  # fmt: skip
    _check_defaults(cfg, handled, "swin")
    if cfg.norm_layer != "layernorm":
        raise _refuse("norm_layer", cfg.norm_layer, "transformers' Swin uses LayerNorm")
    if cfg.norm_eps != 1e-5:
        raise _refuse(
            "norm_eps", cfg.norm_eps, "transformers' Swin fixes 1e-5 for its patch embedding and merging norms"
        )
    config = {
        "model_type": "swin",
        "architectures": ["SwinForImageClassification"],
        "image_size": _size(cfg.img_size),
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depths": list(cfg.depths),
        "num_heads": list(cfg.num_heads),
        "window_size": cfg.window_size,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "hidden_dropout_prob": cfg.drop_rate,
        "attention_probs_dropout_prob": cfg.attn_drop_rate,
        "drop_path_rate": cfg.drop_path_rate,
        "hidden_act": _hf_act(cfg.act_layer),
        "use_absolute_embeddings": False,
        "layer_norm_eps": cfg.norm_eps,
        "encoder_stride": cfg.patch_size * 2 ** (len(cfg.depths) - 1),
        **_labels(model, cfg.num_classes),
    }
    state = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key in [k for k in state if k.endswith((".attn.qkv.weight", ".attn.qkv.bias"))]:
        block, kind = key.rsplit(".attn.qkv.", 1)  # layers.{s}.blocks.{b}, weight/bias
        for names, tensor in zip(SWIN_QKV_PARTS, state.pop(key).chunk(3, dim=0), strict=True):  # (3C, ...) -> q, k, v
            out[f"swin.encoder.{block}.{names[0]}{kind}"] = tensor
    out.update(_rename_all(state, SWIN_KEYS.to_hf, "swin.", "swin"))
    return config, out


# --- ConvNeXt ------------------------------------------------------------------------------------------------------
def convnext_to_hf(model: nn.Module, rep: Reporter) -> HFExport:
    """A ConvNeXt as transformers' `ConvNextForImageClassification`.

    Raises:
        ValueError: a kernel other than 7, an MLP ratio other than 4, a block epsilon other than 1e-6 (all fixed in
            transformers), an unknown activation, or any non-default field it does not write.
    """
    cfg = model.describe()
    handled = {"img_size", "in_chans", "num_classes", "depths", "dims", "patch_size", "kernel_size", "mlp_ratio",
               "ls_init_value", "drop_path_rate", "drop_rate", "norm_eps", "head_norm_eps", "act_layer"}  # fmt: skip
    _check_defaults(cfg, handled, "convnext")
    for name, want, why in (
        ("kernel_size", 7, "transformers' ConvNeXt fixes a 7x7 depthwise kernel"),
        ("mlp_ratio", 4.0, "transformers' ConvNeXt fixes a 4x wide MLP"),
        ("norm_eps", 1e-6, "transformers' ConvNeXt fixes 1e-6 for its stem, downsampling and block norms"),
    ):
        if getattr(cfg, name) != want:
            raise _refuse(name, getattr(cfg, name), why)
    _dropped_training_fields(cfg, ("drop_rate",), rep)
    config = {
        "model_type": "convnext",
        "architectures": ["ConvNextForImageClassification"],
        "image_size": _size(cfg.img_size),
        "num_channels": cfg.in_chans,
        "patch_size": cfg.patch_size,
        "num_stages": len(cfg.depths),
        "hidden_sizes": list(cfg.dims),
        "depths": list(cfg.depths),
        "hidden_act": _hf_act(cfg.act_layer),
        # Without layer scale transformers builds no parameter, as vitkit does for ls_init_value=None.
        "layer_scale_init_value": cfg.ls_init_value if cfg.ls_init_value is not None else 0.0,
        "drop_path_rate": cfg.drop_path_rate,
        "layer_norm_eps": cfg.head_norm_eps,
        **_labels(model, cfg.num_classes),
    }
    return config, _rename_all(model.state_dict(), CONVNEXT_KEYS.to_hf, "convnext.", "convnext")


# --- ResNet --------------------------------------------------------------------------------------------------------
def resnet_to_hf(model: nn.Module, rep: Reporter) -> HFExport:
    """A ResNet as transformers' `ResNetForImageClassification` (torchvision's v1.5 blocks, stride on the 3x3).

    Raises:
        ValueError: any non-default field it does not write.
    """
    cfg = model.describe()
    handled = {"block", "depths", "widths", "stem_width", "img_size", "in_chans", "num_classes", "drop_rate",
               "drop_path_rate", "zero_init_last"}  # fmt: skip
    _check_defaults(cfg, handled, "resnet")
    _dropped_training_fields(cfg, ("drop_rate", "drop_path_rate"), rep)
    expansion = 4 if cfg.block == "bottleneck" else 1
    config = {
        "model_type": "resnet",
        "architectures": ["ResNetForImageClassification"],
        "num_channels": cfg.in_chans,
        "embedding_size": cfg.stem_width,
        "hidden_sizes": [w * expansion for w in cfg.widths],
        "depths": list(cfg.depths),
        "layer_type": cfg.block,
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,
        **_labels(model, cfg.num_classes),
    }
    return config, _rename_all(model.state_dict(), RESNET_KEYS.to_hf, "resnet.", "resnet")


register_hf_exporter("vit", vit_to_hf)
register_hf_exporter("deit", vit_to_hf)  # the DeiT family keeps ViT's `distilled` field and tensor names
register_hf_exporter("swin", swin_to_hf)
register_hf_exporter("convnext", convnext_to_hf)
register_hf_exporter("resnet", resnet_to_hf)


# --- preprocessing and writing -------------------------------------------------------------------------------------
def hf_preprocessor_config(model: nn.Module) -> dict[str, Any]:
    """preprocessor_config.json for `model.preprocess`: the resize, centre crop and normalisation vitkit's eval uses.

    vitkit resizes the short side of a square input to floor(size / crop_fraction) (aspect kept) and centre-crops
    `size`; a non-square (H, W) is resized to exactly floor(H / crop_fraction) x floor(W / crop_fraction) and
    centre-cropped to (H, W). `BitImageProcessor` does both (`size` as shortest_edge or as height/width, then
    `crop_size`), with the same resampling filter, rescale to 0..1, mean and std.
    """
    pre = model.preprocess
    h, w = pre.input_size
    if h == w:
        size: dict[str, int] = {"shortest_edge": math.floor(h / pre.crop_fraction)}
    else:
        size = {"height": math.floor(h / pre.crop_fraction), "width": math.floor(w / pre.crop_fraction)}
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": size,
        "resample": _PIL_RESAMPLE[pre.interpolation],
        "do_center_crop": True,
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
    }


def to_hf(model: nn.Module, log: LogFn | Reporter | None = None) -> HFExport:
    """(config.json dict, on-disk transformers state dict) for a vitkit model; nothing is written.

    Raises:
        ValueError: a family without an exporter (the ones that have one are listed), or a model transformers
            cannot represent (the field and value are named).
    """
    rep = as_reporter(log)
    family = getattr(model, "family", None)
    if family not in _EXPORTERS:
        raise ValueError(
            f"family {family!r} ({type(model).__name__}) cannot be written as a transformers directory; "
            f"families with an exporter: {', '.join(hf_exporters())}"
        )
    config, state = _EXPORTERS[family](model, rep)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    config = {**config, "dtype": dtype}
    config["vitkit"] = {"version": __version__, "family": family, "architecture": config_to_dict(model.describe())}
    return config, state


def check_reimport(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> bool:
    """Read the export back with vitkit's own importer for its model_type: it must give the model's tensors exactly
    and the config fields the importer reads. A check that needs no transformers. False when vitkit has no
    importer for the model_type.

    Raises:
        ValueError: a tensor or field that does not come back as it was (an exporter bug; nothing is written).
    """
    model_type = config["model_type"]
    if model_type == "vit":
        arch, back = {}, hf_to_timm_state_dict(state)
    elif (converter := hf_converter(model_type)) is not None:
        arch, back = converter(state, config)
    else:
        return False
    ours = model.state_dict()
    wrong = sorted(set(ours) ^ set(back)) or [k for k in ours if not torch.equal(ours[k].cpu(), back[k].cpu())]
    if wrong:
        raise ValueError(f"the {model_type} export does not import back into vitkit unchanged: {wrong[:8]}")
    cfg = config_to_dict(model.describe())
    if cfg.get("dist_head", False) is None:  # DeiT's None means "a head exactly when distilled"
        cfg["dist_head"] = bool(cfg.get("distilled"))
    arch = json.loads(json.dumps(arch))  # tuples as lists, as in cfg
    fields = [k for k, v in arch.items() if k in cfg and cfg[k] != v]
    if fields:
        raise ValueError(
            f"the {model_type} export does not import back into vitkit unchanged: "
            + ", ".join(f"{k}={cfg[k]!r} comes back as {arch[k]!r}" for k in fields)
        )
    return True


def _check_target(dst: Path) -> None:
    """Refuse a destination whose other files the swap-in of a new directory would delete."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} is a file; --to hf writes a directory ({', '.join(HF_FILES)})")
    if (dst / CONFIG_NAME).is_file() and hf_model_type(dst) is None:
        raise ValueError(
            f"refusing to replace {dst}: its {CONFIG_NAME} is not a transformers config (a vitkit model directory?) "
            "and would be lost; give a new or empty directory"
        )
    if dst.is_dir():
        others = sorted(p.name for p in dst.iterdir() if p.name not in HF_FILES)
        if others:
            raise ValueError(
                f"refusing to replace {dst}: it holds files besides {', '.join(HF_FILES)} ({', '.join(others[:5])}); "
                "give a new or empty directory"
            )


def verify_hf(model: nn.Module, directory: str | os.PathLike, rep: Reporter, tol: float = 1e-4) -> float | None:
    """Load `directory` with transformers' AutoModelForImageClassification and compare logits with `model` on one
    seeded random image at the model's native size (in fp32, eval mode; bf16/fp16 weights on both sides upcast).
    Returns max |delta|, or None (and says so) when transformers is not installed.

    Raises:
        ValueError: the logits differ by more than `tol` (relative to the logits' scale when that exceeds 1).
    """
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        rep.info("transformers is not installed: the directory was not loaded back to compare logits")
        return None
    param = next(model.parameters())
    # bf16/fp16 weights are compared in fp32 on both sides: the same upcast values, so the same tolerance holds.
    ref = model if param.dtype == torch.float32 else copy.deepcopy(model).float()
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" progress bar on stderr; a check inside `vitkit convert` should not.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf = AutoModelForImageClassification.from_pretrained(str(directory), dtype=torch.float32).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    h, w = model.cfg.img_size  # a ViT takes only its native size in transformers
    x = torch.randn(1, int(model.cfg.in_chans), h, w, generator=torch.Generator().manual_seed(0))
    was_training = ref.training
    ref.eval()
    try:
        with torch.no_grad():
            ours = ref(x.to(param.device)).float().cpu()
            theirs = hf(pixel_values=x).logits.float()
    finally:
        ref.train(was_training)
    if ours.shape != theirs.shape:
        raise ValueError(f"transformers returns logits of shape {tuple(theirs.shape)}, vitkit {tuple(ours.shape)}")
    delta = (ours - theirs).abs().max().item()
    if not delta <= tol * max(1.0, ours.abs().max().item()):
        raise ValueError(f"transformers' logits differ from vitkit's by {delta:.3g} (> {tol:g}); nothing was written")
    rep.info(f"checked: transformers loads it with the same logits (max |delta| {delta:.2g} at {h}x{w})")
    return delta


def save_hf(
    model: nn.Module, directory: str | os.PathLike, *, verify: bool = True, log: LogFn | Reporter | None = None
) -> Path:
    """Write `model` as a transformers directory: config.json, model.safetensors, preprocessor_config.json.

    The directory is built aside and swapped in whole (`vitkit._io.atomic_write_dir`): a refused or failed export
    leaves no partial directory, and an existing one is replaced only when it holds nothing but these files.

    Args:
        model: a vitkit model of a family with an exporter (`hf_exporters()`).
        directory: the output directory.
        verify: load the written directory with transformers (when installed) and compare logits before swapping
            it in (see `verify_hf`).
        log: receives one line per dropped training-only field and the check's result.

    Raises:
        ValueError: a model transformers cannot represent (field and value named), a destination holding other
            files, or logits that differ after loading.
    """
    rep = as_reporter(log)
    dst = Path(directory)
    _check_target(dst)
    config, state = to_hf(model, rep)
    check_reimport(model, config, state)
    # safetensors refuses shared or non-contiguous storage (q, k and v are views of one qkv matrix).
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    preprocessor = hf_preprocessor_config(model)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": f"vitkit {__version__}"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor, indent=2) + "\n")
        if verify:
            verify_hf(model, tmp, rep)

    atomic_write_dir(dst, fill)
    return dst
