"""Swin v1 weights from other layouts into timm's (the layout of `vitkit.models.swin.SwinTransformer`).

- `hf_swin_to_timm(state, config)`: a transformers `SwinForImageClassification` (or `SwinModel`) state dict and its
  `config.json` dict -> (SwinConfig keyword arguments, timm-layout state dict). Both the key names transformers
  writes to disk (4.x names, kept by 5.x: `attention.self.query`, `intermediate.dense` ...) and the live module
  names of transformers 5 (`attention.q_proj`, `mlp.fc1` ...) are understood.
- `official_swin_to_timm(state)`: the official Microsoft `.pth` (and timm < 0.9) layout -> current timm layout.

transformers and the official code put patch merging at the END of stage i; timm (>= 0.9) and vitkit at the START
of stage i + 1. Stored `relative_position_index` / `attn_mask` buffers are dropped: vitkit computes both.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vitkit.weights.keymap import KeyRule, KeyTable

_DROPPED = ("relative_position_index", "attn_mask")

_W = "{w:weight|bias}"
_B, _T = "encoder.layers.{s}.blocks.{b}.", "layers.{s}.blocks.{b}."  # a block, in transformers and in timm
# transformers key (without "swin.") <-> timm key; read by the importer and the exporter (weights/export_hf.py). The
# import-only rules are transformers 5's live module names. q/k/v are fused separately (QKV_PARTS).
KEYS = KeyTable(
    [
        (f"embeddings.patch_embeddings.projection.{_W}", "patch_embed.proj.{w}"),
        (f"embeddings.norm.{_W}", "patch_embed.norm.{w}"),
        (f"layernorm.{_W}", "norm.{w}"),
        (f"classifier.{_W}", "head.fc.{w}"),
        # The patch merging at the end of transformers' stage i starts timm's stage i + 1.
        ("encoder.layers.{s}.downsample.{rest*}", "layers.{s+1}.downsample.{rest}"),
        (f"{_B}layernorm_before.{_W}", _T + "norm1.{w}"),
        (f"{_B}layernorm_after.{_W}", _T + "norm2.{w}"),
        (f"{_B}attention.output.dense.{_W}", _T + "attn.proj.{w}"),
        KeyRule(f"{_B}attention.o_proj.{_W}", _T + "attn.proj.{w}", export=False),
        (_B + "attention.self.relative_position_bias_table", _T + "attn.relative_position_bias_table"),
        KeyRule(
            _B + "attention.relative_position_bias.relative_position_bias_table",
            _T + "attn.relative_position_bias_table",
            export=False,
        ),
        (f"{_B}intermediate.dense.{_W}", _T + "mlp.fc1.{w}"),
        (f"{_B}output.dense.{_W}", _T + "mlp.fc2.{w}"),
        KeyRule(f"{_B}mlp.{{fc:fc1|fc2}}.{_W}", _T + "mlp.{fc}.{w}", export=False),
    ]
)
# The projections timm fuses into `attn.qkv`, in its order: on-disk names (written by the exporter), then transformers
# 5's live names.
QKV_PARTS = (("attention.self.query.", "attention.q_proj."), ("attention.self.key.", "attention.k_proj."),
             ("attention.self.value.", "attention.v_proj."))  # fmt: skip
_QKV = {name: i for i, names in enumerate(QKV_PARTS) for name in names}
_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")


def arch_from_hf_swin_config(config: dict[str, Any]) -> dict[str, Any]:
    """SwinConfig keyword arguments from a transformers Swin `config.json` dict.

    Raises:
        ValueError: a model type other than 'swin', or a feature vitkit's Swin does not have (absolute position
            embeddings, a non-GELU activation, a non-square patch or window), named with its value.
    """
    model_type = config.get("model_type")
    if model_type not in (None, "swin"):
        raise ValueError(f"not a Swin v1 config: model_type={model_type!r} (expected 'swin')")
    if config.get("use_absolute_embeddings", False):
        raise ValueError("use_absolute_embeddings=True is not supported by vitkit's Swin (no checkpoint uses it)")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} is not supported; vitkit's Swin uses 'gelu'")

    def square(name: str, default: int) -> int:
        value = config.get(name, default)
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise ValueError(f"{name}={value!r}: vitkit's Swin needs a square {name}")
            value = value[0]
        return int(value)

    size = config.get("image_size", 224)
    img_size = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
    num_classes = len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))
    return dict(
        img_size=img_size,
        patch_size=square("patch_size", 4),
        in_chans=int(config.get("num_channels", 3)),
        num_classes=num_classes,
        embed_dim=int(config.get("embed_dim", 96)),
        depths=tuple(int(d) for d in config.get("depths", (2, 2, 6, 2))),
        num_heads=tuple(int(h) for h in config.get("num_heads", (3, 6, 12, 24))),
        window_size=square("window_size", 7),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        qkv_bias=bool(config.get("qkv_bias", True)),
        drop_rate=float(config.get("hidden_dropout_prob", 0.0)),
        attn_drop_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
        drop_path_rate=float(config.get("drop_path_rate", 0.1)),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
    )


def hf_swin_to_timm(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers Swin state dict (as on disk) -> (SwinConfig kwargs, timm-layout state dict).

    Args:
        state: `SwinForImageClassification` keys (`swin.` prefix, `classifier.*`) or `SwinModel` keys (no prefix).
        config: the checkpoint's `config.json` as a dict.

    Raises:
        ValueError: an unsupported config (see `arch_from_hf_swin_config`), a key this converter does not know
            (named), or a q/k/v projection with a part missing.
    """
    arch = arch_from_hf_swin_config(config)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        k = key.removeprefix("swin.")
        if k.endswith(_DROPPED):
            continue
        if k.startswith("embeddings.mask_token"):
            continue  # masked-image-modelling token: no part of a classifier
        m = _BLOCK.match(k)
        part = next((p for p in _QKV if m.group(3).startswith(p)), None) if m else None
        if part is not None:
            kind = m.group(3)[len(part) :]  # "weight" or "bias"
            qkv.setdefault(f"layers.{m.group(1)}.blocks.{m.group(2)}.attn.qkv.{kind}", {})[_QKV[part]] = value
            continue
        new = KEYS.to_timm(k)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"unknown transformers Swin keys (not converted): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    for key, parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"{key}: query, key and value are needed, found parts {sorted(parts)} (0=q, 1=k, 2=v)")
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return arch, out


_OFFICIAL_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


def official_swin_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official Swin `.pth` / timm < 0.9 layout -> timm >= 0.9 keys (vitkit's).

    Drops the stored `relative_position_index` / `attn_mask` buffers, moves `layers.i.downsample` (end of stage
    i) to `layers.{i+1}.downsample`, and renames `head.*` to `head.fc.*`. A state dict already in the current
    layout (no downsample in stage 0) is returned with only the buffers dropped.
    """
    # The official layout puts a downsample at the end of stage 0; the current one has none in stage 0. (Keyed on
    # the stages, not the head, so that headless checkpoints are told apart too.)
    current = not any(k.startswith("layers.0.downsample.") for k in state)
    out = {}
    for key, value in state.items():
        if key.endswith(_DROPPED):
            continue
        if not current:
            m = _OFFICIAL_DOWNSAMPLE.match(key)
            if m:
                key = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
            elif key.startswith("head."):
                key = "head.fc." + key[len("head.") :]
        out[key] = value
    return out
