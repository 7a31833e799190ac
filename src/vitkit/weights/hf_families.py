"""Hugging Face transformers directories of the families beyond ViT (DeiT, ResNet, ConvNeXt, Swin ...).

Each family contributes one pure converter `to_timm(state, config) -> (architecture fields, timm-layout state)`
from the on-disk transformers keys (transformers 5 keeps the 4.x names on disk) and the config.json; this module
reads the directory, builds the family's model from the fields, loads the weights strictly (dtype kept) and sets
the preprocessing from preprocessor_config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.models.base import Preprocess, config_from_dict
from vitkit.models.registry import get_family
from vitkit.models.serialization import load_state_dict_strict, match_state_dtype, read_config
from vitkit.weights._log import LogFn, Reporter, as_reporter
from vitkit.weights.hf import CONFIG_NAME, PREPROCESSOR_NAME, preprocess_from_hf, read_hf_weights

Converter = Callable[[dict[str, torch.Tensor], dict[str, Any]], tuple[dict[str, Any], dict[str, torch.Tensor]]]

# transformers model_type -> (vitkit family, converter). Families add themselves with `register_hf_family`.
_HF_FAMILIES: dict[str, tuple[str, Converter]] = {}


def register_hf_family(model_type: str, family: str, to_timm: Converter) -> None:
    """Let `vitkit.load_model` read transformers directories of `model_type` as vitkit `family` models."""
    if model_type in _HF_FAMILIES:
        raise ValueError(f"transformers model_type {model_type!r} is registered twice")
    _HF_FAMILIES[model_type] = (family, to_timm)


def hf_families() -> list[str]:
    """The transformers model types besides 'vit' that can be imported."""
    return sorted(_HF_FAMILIES)


def hf_converter(model_type: str) -> Converter | None:
    """The converter registered for a transformers `model_type` (None when there is none), e.g. for the
    exporters' check that an export reads back unchanged."""
    entry = _HF_FAMILIES.get(model_type)
    return None if entry is None else entry[1]


def load_hf_family(
    directory: str | os.PathLike, *, img_size: int | tuple[int, int] | None = None, log: LogFn | Reporter | None = None
) -> nn.Module:
    """Load a transformers directory of a registered non-ViT family.

    Args:
        directory: holds config.json, the weights (model.safetensors / pytorch_model.bin, or shards) and,
            optionally, preprocessor_config.json.
        img_size: the input size recorded in the model's preprocessing (these families take any size).
        log: receives one line per assumption.

    Raises:
        ValueError: a model_type no family reads (listing the ones that are read), or weights that do not fit.
    """
    rep = as_reporter(log)
    directory = Path(directory)
    config = read_config(directory / CONFIG_NAME)
    model_type = config.get("model_type")
    if model_type not in _HF_FAMILIES:
        raise ValueError(
            f"{directory / CONFIG_NAME}: model_type={model_type!r} is not supported; vitkit reads transformers "
            f"directories of model_type {', '.join(repr(t) for t in ['vit', *hf_families()])}"
        )
    family, to_timm = _HF_FAMILIES[model_type]
    state, source = read_hf_weights(directory, rep)
    arch, timm_state = to_timm(state, config)
    config_cls, model_cls = get_family(family)
    model = model_cls(config_from_dict(config_cls, arch))
    model = match_state_dtype(model, timm_state, source=source, log=rep.info)
    load_state_dict_strict(model, timm_state, source=source)
    pre_path = directory / PREPROCESSOR_NAME
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    size = config.get("image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    pre = preprocess_from_hf(preprocessor, config, model.num_classes, rep, model_size=size)
    model.preprocess = Preprocess(**{**pre.__dict__, "input_size": size})
    return model


# --- the families whose transformers directories vitkit reads ------------------------------------------------------
def _register_builtin() -> None:
    from vitkit.weights.hf_convnext import hf_convnext_to_timm
    from vitkit.weights.hf_deit import hf_deit_to_timm
    from vitkit.weights.hf_resnet import hf_resnet_to_timm
    from vitkit.weights.hf_swin import hf_swin_to_timm
    from vitkit.weights.mae import hf_vitmae_to_timm

    register_hf_family("convnext", "convnext", hf_convnext_to_timm)
    register_hf_family("deit", "deit", hf_deit_to_timm)
    register_hf_family("resnet", "resnet", hf_resnet_to_timm)
    register_hf_family("swin", "swin", hf_swin_to_timm)
    register_hf_family("vit_mae", "mae", hf_vitmae_to_timm)


_register_builtin()
