"""One entry point for every checkpoint: `load_model` finds out what a path holds and imports it.

Dispatch order: a vitkit directory (config.json with format "vitkit"), a Hugging Face transformers directory
(config.json with a model_type), then a file by suffix or content: `.npz` is JAX, `.safetensors`/`.pth`/`.pt`/
`.bin` is a timm-layout state dict (or the weights file of one of the directory kinds above).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vitkit._io import resolve_dir
from vitkit._validate import check_choice
from vitkit.models.registry import model_family
from vitkit.models.serialization import match_state_dtype, read_config, read_safetensors
from vitkit.runs import describe_checkpoint, is_run_dir, resolve_checkpoint
from vitkit.weights._log import LogFn, Reporter, as_reporter
from vitkit.weights.export_hf import save_hf
from vitkit.weights.export_timm import SUFFIXES as TIMM_SUFFIXES
from vitkit.weights.export_timm import save_timm
from vitkit.weights.families import from_family_state_dict
from vitkit.weights.hf import CONFIG_NAME as HF_CONFIG_NAME
from vitkit.weights.hf import WEIGHT_FILES as HF_WEIGHT_FILES
from vitkit.weights.hf import from_hf_state_dict, hf_model_type, load_hf_vit, looks_like_hf_state_dict
from vitkit.weights.hf_families import load_hf_family
from vitkit.weights.jax import load_jax_npz
from vitkit.weights.native import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    is_native_dir,
    load_native,
    load_state_dict_strict,
    model_from_config,
)
from vitkit.weights.safe_load import file_kind, read_state_dict
from vitkit.weights.timm import VIT_FAMILIES, as_img_size, empty_model, from_timm_state_dict

SourceFormat = Literal["vitkit", "hf", "jax", "timm"]
TargetFormat = Literal["vitkit", "hf", "timm"]


def _load_native_resized(directory: Path, img_size: int | tuple[int, int], rep: Reporter) -> nn.Module:
    """A vitkit directory loaded for another input size; the family fits the weights (`adapt_state_dict`)."""
    config = read_config(directory / CONFIG_NAME)
    model = empty_model(lambda: model_from_config(config, img_size=as_img_size(img_size)))
    state = read_safetensors(directory / WEIGHTS_NAME)
    # A family without adapt_state_dict (the CNNs: ResNet, ConvNeXt, ResNetV2) has no weight that depends on the
    # input size, as from_family_state_dict assumes too; the strict load below still names any shape that differs.
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state, config["architecture"], log=rep.info)
    model = match_state_dtype(model, state)  # bf16/fp16 directories stay bf16/fp16 at any size
    load_state_dict_strict(model, state, source=str(directory / WEIGHTS_NAME))
    model.preprocess.input_size = tuple(model.cfg.img_size)
    return model


def _load_dir(
    directory: Path, model_name: str | None, img_size: int | tuple[int, int] | None, rep: Reporter
) -> tuple[nn.Module, SourceFormat]:
    if (directory / CONFIG_NAME).is_file():
        read_config(directory / CONFIG_NAME)  # a truncated config.json is named as such, not "not a model dir"
    if is_native_dir(directory):
        if model_name:
            rep.info(f"model_name={model_name!r} ignored: {directory} has its own config")
        if img_size is None:
            return load_native(directory), "vitkit"
        return _load_native_resized(directory, img_size, rep), "vitkit"
    if (model_type := hf_model_type(directory)) is not None:
        if model_name:
            rep.info(f"model_name={model_name!r} ignored: {directory}/{HF_CONFIG_NAME} gives the architecture")
        if model_type == "vit":
            return load_hf_vit(directory, img_size=img_size, log=rep), "hf"
        return load_hf_family(directory, img_size=img_size, log=rep), "hf"
    raise ValueError(
        f"{directory} is neither a vitkit model directory ({CONFIG_NAME} with format 'vitkit') nor a Hugging Face "
        f"model directory ({HF_CONFIG_NAME} with a model_type)"
    )


def _load_any(
    path: str | os.PathLike,
    model_name: str | None,
    img_size: int | tuple[int, int] | None,
    rep: Reporter,
) -> tuple[nn.Module, SourceFormat]:
    path = resolve_dir(Path(path))
    if path.is_dir() and not is_native_dir(path) and hf_model_type(path) is None and is_run_dir(path):
        # A training run: its best checkpoint (else its latest), and say which one was taken.
        note = describe_checkpoint(path)
        path = resolve_checkpoint(path)
        if rep.silent:
            print(f"vitkit: {note}", file=sys.stderr)
        else:
            rep.info(note)
    if path.is_dir():
        return _load_dir(path, model_name, img_size, rep)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file or model directory at {path}")
    kind = file_kind(path)
    if kind == "npz":
        return load_jax_npz(path, model_name=model_name, img_size=img_size, log=rep), "jax"
    # The weights file of a model directory is read with that directory's config, which the file alone lacks.
    parent = path.parent
    if (path.name == WEIGHTS_NAME and is_native_dir(parent)) or (
        path.name in HF_WEIGHT_FILES and hf_model_type(parent)
    ):
        rep.info(f"{path} belongs to the model directory {parent}; loading that")
        return _load_dir(parent, model_name, img_size, rep)
    state = read_state_dict(path, log=rep)
    if model_name and model_family(model_name) not in VIT_FAMILIES:  # ResNet, ConvNeXt, Swin: timm/torchvision layouts
        return from_family_state_dict(state, model_name, source=str(path), rep=rep, img_size=img_size), "timm"
    if looks_like_hf_state_dict(state):
        if hf_model_type(parent) is None:
            raise ValueError(
                f"{path} is a Hugging Face transformers state dict; load the directory that holds it together "
                f"with its {HF_CONFIG_NAME} (the config gives the head count and LayerNorm epsilon)"
            )
        rep.info(f"{path}: Hugging Face weights, read with {parent / HF_CONFIG_NAME}")
        config = json.loads((parent / HF_CONFIG_NAME).read_text())
        return from_hf_state_dict(config, state, img_size=img_size, source=str(path), log=rep), "hf"
    return from_timm_state_dict(state, model_name=model_name, img_size=img_size, source=str(path), log=rep), "timm"


def load_model(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    map_location: str | torch.device = "cpu",
    log: LogFn | None = None,
) -> nn.Module:
    """Load a model from a local path, whatever its source; weights are loaded strictly (every key accounted for).

    Args:
        path: a vitkit directory, a training run directory (its best/ checkpoint, else last/; the choice is
            printed), a Hugging Face ViT directory, a timm-layout `.pth`/`.pt`/`.bin`/`.safetensors`
            file, or a JAX/big_vision `.npz` file. Pickle-based files are read with `weights_only=True`.
        model_name: a registered ViT name (`vitkit.list_models()`) for what shapes cannot decide, chiefly the
            number of attention heads of a timm state dict; checked against the checkpoint's shapes.
        num_classes: a new classifier size: the checkpoint is loaded, then the head is replaced by a freshly
            initialised one (for fine-tuning); 0 removes it. None keeps the checkpoint's head. A masked
            autoencoder (MAE) gives its encoder, a plain ViT with that head; its decoder is dropped.
        img_size: input size (int or (H, W)) to build the model for; learned position tables are resampled
            from the checkpoint's grid. None keeps the checkpoint's size.
        patch_size: run the model at this patch size (FlexiViT, `model.set_patch_size`): the trained patch kernel
            is PI-resized and the position table resampled; the weights stay the trained ones. None keeps the
            size the model was saved with.
        map_location: device the returned model is moved to.
        log: receives one line per inference, assumption or change (e.g. `print`); None sends them to the
            `vitkit.weights` logger.

    Raises:
        ValueError: unsupported layouts or options, unsafe pickles, and key or shape mismatches, each named.
        FileNotFoundError: nothing at `path`.
    """
    model, _ = _load(path, model_name=model_name, num_classes=num_classes, img_size=img_size, log=log)
    if patch_size is not None:
        if not hasattr(model, "set_patch_size"):
            raise ValueError(
                f"patch_size={patch_size!r}: family {getattr(model, 'family', type(model).__name__)!r} cannot change "
                "its patch size at run time (FlexiViT's resize needs a ViT with embed_layer='patch')"
            )
        model.set_patch_size(patch_size)
        as_reporter(log).info(f"running at patch size {patch_size} (trained at {model.cfg.patch_size}; PI-resized)")
    return model.to(map_location)


def _load(
    path: str | os.PathLike,
    *,
    model_name: str | None,
    num_classes: int | None,
    img_size: int | tuple[int, int] | None,
    log: LogFn | Reporter | None,
) -> tuple[nn.Module, SourceFormat]:
    rep = as_reporter(log)
    model, fmt = _load_any(path, model_name, img_size, rep)
    if num_classes is not None and getattr(model, "family", None) == "mae":  # a new head: fine-tune the encoder
        from vitkit.weights.mae import encoder_for_finetuning

        return encoder_for_finetuning(model, num_classes, rep), fmt
    if num_classes is not None and num_classes != model.num_classes:
        old = model.num_classes
        model.reset_classifier(num_classes)
        rep.info(
            f"replaced the {old}-class head with a new, randomly initialised {num_classes}-class head (fine-tuning)"
            if num_classes
            else f"removed the {old}-class head (num_classes=0: the model returns pooled features)"
        )
    return model, fmt


def convert_checkpoint(
    src: str | os.PathLike,
    dst_dir: str | os.PathLike,
    model_name: str | None = None,
    log: LogFn | None = print,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    to: TargetFormat = "vitkit",
) -> nn.Module:
    """Import any supported checkpoint and write it as a vitkit directory, a transformers directory or a timm file.

    Args:
        src: anything `load_model` accepts.
        dst_dir: output directory (`to="vitkit"`, `"hf"`) or file (`to="timm"`). A vitkit directory must not hold
            another tool's config.json; a transformers directory must be new or hold only the files it writes.
        model_name: see `load_model`.
        log: receives one line per inference (default `print`).
        num_classes: see `load_model`.
        img_size: see `load_model`.
        to: "vitkit" (config.json + model.safetensors, every option kept), "hf" (a transformers directory that
            `from_pretrained` loads with the same logits, see `vitkit.weights.export_hf.save_hf`) or "timm" (a
            timm-layout state dict file, `.safetensors` or `.pth`/`.pt`/`.bin`, see
            `vitkit.weights.export_timm.save_timm`).

    Returns:
        The loaded model (on the CPU), as saved.

    Raises:
        ValueError: an unknown `to`, a destination that would destroy other files, or (hf) a model transformers
            cannot represent, with the field and value named. Nothing is written then.
    """
    check_choice("to", to, TargetFormat)
    dst = Path(dst_dir)
    cfg = dst / CONFIG_NAME
    if to == "vitkit" and cfg.is_file() and not is_native_dir(dst):
        raise ValueError(
            f"refusing to write into {dst}: its {CONFIG_NAME} is not a vitkit config and would be replaced"
        )
    if to == "timm" and dst.suffix not in TIMM_SUFFIXES:  # before the (possibly long) load
        raise ValueError(f"to='timm' writes one file: {dst} needs one of the suffixes {', '.join(TIMM_SUFFIXES)}")
    model, fmt = _load(src, model_name=model_name, num_classes=num_classes, img_size=img_size, log=log)
    if to == "hf":
        save_hf(model, dst, log=log)
    elif to == "timm":
        save_timm(model, dst, log=log)
    else:
        model.save_pretrained(str(dst), converted_from={"path": str(src), "format": fmt})
    return model
