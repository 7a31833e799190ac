"""Hugging Face transformers ResNet (`ResNetForImageClassification`, `ResNetModel`) -> timm/torchvision layout.

What transformers writes to disk (4.x and 5.x alike) is renamed key by key; every key must be understood, none is
dropped:

    resnet.embedder.embedder.convolution / .normalization        -> conv1 / bn1
    resnet.encoder.stages.{s}.layers.{b}.layer.{j}.convolution   -> layer{s+1}.{b}.conv{j+1}
    resnet.encoder.stages.{s}.layers.{b}.layer.{j}.normalization -> layer{s+1}.{b}.bn{j+1}
    resnet.encoder.stages.{s}.layers.{b}.shortcut.convolution    -> layer{s+1}.{b}.downsample.0
    resnet.encoder.stages.{s}.layers.{b}.shortcut.normalization  -> layer{s+1}.{b}.downsample.1
    classifier.1                                                 -> fc

torchvision and timm ResNets share one key layout, which `vitkit.models.ResNet` uses, so their state dicts need no
converter. Wiring into `vitkit.load_model` lives in `weights/convert.py` / `weights/hf.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vitkit.weights.keymap import KeyTable

_BN = "{f:weight|bias|running_mean|running_var|num_batches_tracked}"
# transformers key (without "resnet.") <-> timm/torchvision key; the convolutions have no bias. Read by the importer
# and the exporter (weights/export_hf.py).
KEYS = KeyTable(
    [
        ("embedder.embedder.convolution.weight", "conv1.weight"),
        (f"embedder.embedder.normalization.{_BN}", "bn1.{f}"),
        ("encoder.stages.{s}.layers.{b}.layer.{j}.convolution.weight", "layer{s+1}.{b}.conv{j+1}.weight"),
        (f"encoder.stages.{{s}}.layers.{{b}}.layer.{{j}}.normalization.{_BN}", "layer{s+1}.{b}.bn{j+1}.{f}"),
        ("encoder.stages.{s}.layers.{b}.shortcut.convolution.weight", "layer{s+1}.{b}.downsample.0.weight"),
        (f"encoder.stages.{{s}}.layers.{{b}}.shortcut.normalization.{_BN}", "layer{s+1}.{b}.downsample.1.{f}"),
        ("classifier.1.{w:weight|bias}", "fc.{w}"),
    ]
)


def hf_resnet_to_timm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a transformers ResNet checkpoint (as saved on disk) to `ResNet` config fields and timm keys.

    Args:
        state: the on-disk state dict of a `ResNetForImageClassification` (keys `resnet.*`, `classifier.1.*`) or
            of a `ResNetModel` (keys `embedder.*`, `encoder.*`; no classifier, so `num_classes=0`).
        config: the directory's `config.json` as a dict (`layer_type`, `depths`, `hidden_sizes`,
            `embedding_size`, `num_channels`, `hidden_act`, `downsample_in_first_stage`,
            `downsample_in_bottleneck`, `id2label`), or a transformers `ResNetConfig` object.

    Returns:
        `(arch, state)`: keyword arguments for `ResNetConfig` (block, depths, widths, stem_width, in_chans,
        num_classes) and the state dict in timm/torchvision layout, ready for `ResNet.load_state_dict`. BatchNorm
        `num_batches_tracked` counters absent from the checkpoint are set to 0 (they do not affect the output).

    Raises:
        ValueError: a variant vitkit's ResNet does not build (stride in the 1x1 convolution, a strided first
            stage, an activation other than ReLU, bottleneck widths not divisible by 4), keys this converter does
            not understand (listed), or a classifier whose size disagrees with the config's labels.
        TypeError: a config that is neither a dict nor a transformers config.
    """
    if not isinstance(config, Mapping) and hasattr(config, "to_dict"):  # a transformers ResNetConfig object
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be config.json as a dict (or a transformers ResNetConfig), got {config!r}")
    layer_type = config.get("layer_type", "bottleneck")
    if layer_type not in ("basic", "bottleneck"):
        raise ValueError(f"layer_type={layer_type!r} is not a ResNet block; choose one of 'basic', 'bottleneck'")
    act = config.get("hidden_act", "relu")
    if act != "relu":
        raise ValueError(f"hidden_act={act!r}: vitkit's ResNet uses ReLU only, as torchvision and timm do")
    if config.get("downsample_in_first_stage", False):
        raise ValueError(
            "downsample_in_first_stage=True (a stride-2 first stage) is not the torchvision/timm ResNet; "
            "vitkit's first stage keeps the stem's resolution"
        )
    if layer_type == "bottleneck" and config.get("downsample_in_bottleneck", False):
        raise ValueError(
            "downsample_in_bottleneck=True puts the stride on the 1x1 convolution (ResNet v1); vitkit's ResNet is "
            "torchvision's v1.5 with the stride on the 3x3 convolution"
        )
    depths = [int(d) for d in config.get("depths", (3, 4, 6, 3))]
    hidden = [int(h) for h in config.get("hidden_sizes", (256, 512, 1024, 2048))]
    if len(depths) != len(hidden):
        raise ValueError(f"depths {depths} and hidden_sizes {hidden} need one entry per stage")
    expansion = 4 if layer_type == "bottleneck" else 1
    if any(h % expansion for h in hidden):
        raise ValueError(f"bottleneck hidden_sizes {hidden} must be multiples of 4 (the block's expansion)")

    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = KEYS.to_timm(key.removeprefix("resnet."))
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) of the transformers ResNet checkpoint are not understood: {unknown}")
    # Every BatchNorm has its counter, as a freshly built torch module does (older exports may omit them).
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0, dtype=torch.long))

    num_classes = int(out["fc.weight"].shape[0]) if "fc.weight" in out else 0
    labels = config.get("id2label")
    if num_classes and labels is not None and len(labels) != num_classes:
        raise ValueError(
            f"the classifier has {num_classes} outputs but config.json's id2label names {len(labels)} labels"
        )
    arch = {
        "block": layer_type,
        "depths": tuple(depths),
        "widths": tuple(h // expansion for h in hidden),
        "stem_width": int(config.get("embedding_size", 64)),
        "in_chans": int(config.get("num_channels", 3)),
        "num_classes": num_classes,
    }
    return arch, out
