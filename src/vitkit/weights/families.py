"""timm and torchvision state dicts of the families beyond ViT/DeiT (ResNet, ConvNeXt, Swin, the R50+ViT hybrids,
ResNetV2), by registered name.

The families keep timm's parameter names, so a timm state dict loads as it is; the layouts that differ are
renamed first: the official Swin `.pth` (and timm < 0.9: downsample at the end of a stage, stored index and mask
buffers) and torchvision's ConvNeXt. torchvision's ResNet keys are timm's. The architecture comes from
`model_name`; the head is resized to the checkpoint's class count (0 for a headless checkpoint).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vitkit.models.registry import create_model, get_family, model_family
from vitkit.models.serialization import load_state_dict_strict, match_state_dtype
from vitkit.weights._log import Reporter
from vitkit.weights.hf_swin import official_swin_to_timm
from vitkit.weights.timm import as_img_size
from vitkit.weights.torchvision_convnext import looks_like_torchvision_convnext, torchvision_convnext_to_timm
from vitkit.weights.torchvision_swin import looks_like_torchvision_swin, torchvision_swin_to_timm


def from_family_state_dict(
    state: dict[str, torch.Tensor],
    model_name: str,
    *,
    source: str,
    rep: Reporter,
    img_size: int | tuple[int, int] | None = None,
) -> nn.Module:
    """A registered non-ViT model loaded strictly from a timm-layout (or renamed) state dict.

    `img_size` (int or (H, W)) is the input size to fine-tune or predict at: families whose config has an input
    size are built for it; the others (CNNs take any size) record it in `model.preprocess.input_size`.

    Raises:
        ValueError: keys or shapes that do not fit `model_name`, listed.
    """
    family = model_family(model_name)
    if family == "swin" and looks_like_torchvision_swin(state):
        state = torchvision_swin_to_timm(state)
        rep.info(f"{source}: torchvision Swin layout, renamed to timm's")
    elif family == "swin":
        state = official_swin_to_timm(state)
    elif family == "convnext" and looks_like_torchvision_convnext(state):
        _, state = torchvision_convnext_to_timm(state)
        rep.info(f"{source}: torchvision ConvNeXt layout, renamed to timm's")
    size = None if img_size is None else as_img_size(img_size)
    sized = size is not None and "img_size" in get_family(family)[0].__dataclass_fields__
    model = create_model(model_name, **({"img_size": size} if sized else {}))
    if size is not None:
        model.preprocess.input_size = size
    if sized and hasattr(model, "adapt_state_dict"):  # e.g. a hybrid ViT's position table, saved at the registered size
        with torch.device("meta"):
            registered = dataclasses.asdict(create_model(model_name).describe())
        state = model.adapt_state_dict(state, registered, log=rep.info)
    # The classifier's matrix (a head may also hold a norm, as ConvNeXt's does).
    heads = [n for n, p in model.named_parameters() if model.is_classifier(n) and p.ndim == 2]
    if heads and heads[0] not in state:
        model.reset_classifier(0)
        rep.info(f"{source}: no classifier weights ({heads[0]}): loaded as a feature extractor (num_classes=0)")
    elif heads and state[heads[0]].shape[0] != model.num_classes:
        model.reset_classifier(int(state[heads[0]].shape[0]))
    model = match_state_dtype(model, state, source=source, log=rep.info)
    load_state_dict_strict(model, state, source=source)
    return model
