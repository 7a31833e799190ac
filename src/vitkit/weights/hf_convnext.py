"""transformers ConvNeXt checkpoints (`ConvNextForImageClassification`, `ConvNextModel`) -> timm keys.

What transformers writes to disk (`convnext.embeddings.patch_embeddings`, `convnext.encoder.stages.N.layers.M.
dwconv` ...) is renamed into timm's layout (`stem.0`, `stages.N.blocks.M.conv_dw` ...), which
`vitkit.models.ConvNeXt` uses, and the config is read into `ConvNeXtConfig` fields. Only the key names change;
every tensor keeps its shape (transformers' 1x1 convolutions are `nn.Linear` layers, as in timm).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vitkit.weights.keymap import KeyTable

SUPPORTED_ARCHITECTURES = ("ConvNextForImageClassification", "ConvNextModel")
# transformers' `hidden_act` -> vitkit activation name (vitkit.layers.create); gelu_new is the tanh approximation.
_ACTS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_W = "{w:weight|bias}"
# transformers key (without the "convnext." prefix) <-> timm key; read by the importer and the exporter.
KEYS = KeyTable(
    [
        (f"embeddings.patch_embeddings.{_W}", "stem.0.{w}"),
        (f"embeddings.layernorm.{_W}", "stem.1.{w}"),
        (f"encoder.stages.{{s}}.downsampling_layer.{{d:0|1}}.{_W}", "stages.{s}.downsample.{d}.{w}"),
        (f"encoder.stages.{{s}}.layers.{{b}}.dwconv.{_W}", "stages.{s}.blocks.{b}.conv_dw.{w}"),
        (f"encoder.stages.{{s}}.layers.{{b}}.layernorm.{_W}", "stages.{s}.blocks.{b}.norm.{w}"),
        (f"encoder.stages.{{s}}.layers.{{b}}.pwconv1.{_W}", "stages.{s}.blocks.{b}.mlp.fc1.{w}"),
        (f"encoder.stages.{{s}}.layers.{{b}}.pwconv2.{_W}", "stages.{s}.blocks.{b}.mlp.fc2.{w}"),
        ("encoder.stages.{s}.layers.{b}.layer_scale_parameter", "stages.{s}.blocks.{b}.gamma"),
        (f"layernorm.{_W}", "head.norm.{w}"),
        (f"classifier.{_W}", "head.fc.{w}"),
    ]
)
# Norm parameters in old checkpoints may be named gamma/beta (TF-era names transformers still renames on load).
_LEGACY = [(re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias")]


def hf_convnext_to_timm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a transformers ConvNeXt state dict (as on disk) and its config to vitkit/timm form.

    Args:
        state: the tensors of `model.safetensors` / `pytorch_model.bin` of a `ConvNextForImageClassification`
            (keys `convnext.*` and `classifier.*`) or a `ConvNextModel` (the same keys without `convnext.`).
        config: the directory's `config.json` as a dict (or a transformers `ConvNextConfig`).

    Returns:
        `(arch, state)`: `ConvNeXtConfig` keyword arguments (`ConvNeXt(**arch)` builds the matching model; the
        class count comes from the classifier's weight, 0 for a `ConvNextModel`) and the state dict in timm keys,
        loadable with `load_state_dict(strict=True)`.

    Raises:
        ValueError: another model type or architecture (e.g. `convnextv2`, `ConvNextBackbone`), an activation vitkit
            lacks, a config that disagrees with the weights, or keys with no counterpart (listed by name).
    """
    if not isinstance(config, Mapping):
        if not hasattr(config, "to_dict"):
            raise TypeError(f"config must be a config.json dict or a transformers config, got {type(config).__name__}")
        config = config.to_dict()
    arch = arch_from_hf_convnext_config(config)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        k = key.removeprefix("convnext.")
        for old, new in _LEGACY:
            k = old.sub(new, k)
        new = KEYS.to_timm(k)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"two keys map to {new!r} (one of them is {key!r}): a legacy gamma/beta duplicate?")
        out[new] = value
    if unknown:
        raise ValueError(f"keys with no counterpart in vitkit's ConvNeXt ({len(unknown)}): {sorted(unknown)}")

    fc = out.get("head.fc.weight")
    arch["num_classes"] = 0 if fc is None else int(fc.shape[0])
    labels = config.get("id2label")
    if fc is not None and isinstance(labels, Mapping) and labels and len(labels) != arch["num_classes"]:
        raise ValueError(
            f"config id2label has {len(labels)} labels but the classifier has {arch['num_classes']} outputs"
        )
    has_gamma = any(k.endswith(".gamma") for k in out)
    if not has_gamma:
        arch["ls_init_value"] = None  # transformers builds no layer scale when layer_scale_init_value <= 0
    stem = out.get("stem.0.weight")
    if stem is not None and tuple(stem.shape[:2]) != (arch["dims"][0], arch["in_chans"]):
        raise ValueError(
            f"config hidden_sizes[0]={arch['dims'][0]}, num_channels={arch['in_chans']} disagree with the stem "
            f"weight of shape {tuple(stem.shape)}"
        )
    return arch, out


def arch_from_hf_convnext_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`ConvNeXtConfig` fields (all but `num_classes`) from a transformers ConvNeXt `config.json` dict.

    Raises:
        ValueError: not a ConvNeXt (v1) config, an unsupported architecture or activation, or stage lists that
            disagree.
    """
    model_type = config.get("model_type")
    if model_type != "convnext":
        raise ValueError(
            f"model_type={model_type!r} is not supported by this converter; it reads transformers ConvNeXt (v1) "
            "directories, model_type 'convnext'"
        )
    bad = [a for a in config.get("architectures") or [] if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ValueError(f"architecture {bad} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = config.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise ValueError(f"hidden_act={act!r} is not supported; supported: {', '.join(_ACTS)}")
    depths = tuple(int(d) for d in config.get("depths", (3, 3, 9, 3)))
    dims = tuple(int(d) for d in config.get("hidden_sizes", (96, 192, 384, 768)))
    stages = config.get("num_stages", len(depths))
    if not len(depths) == len(dims) == stages:
        raise ValueError(f"config depths {depths}, hidden_sizes {dims} and num_stages={stages} disagree")
    size = config.get("image_size", 224)
    img_size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    ls = float(config.get("layer_scale_init_value", 1e-6))
    return {
        "img_size": img_size,
        "in_chans": int(config.get("num_channels", 3)),
        "depths": depths,
        "dims": dims,
        "patch_size": int(config.get("patch_size", 4)),
        "ls_init_value": ls if ls > 0 else None,
        "drop_path_rate": float(config.get("drop_path_rate", 0.0)),
        "norm_eps": 1e-6,  # transformers hard-codes 1e-6 for the stem, downsampling and block norms
        "head_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "act_layer": _ACTS[act],
    }
