"""transformers ViTMAE checkpoints (`ViTMAEForPreTraining`) -> `vitkit.models.MaskedAutoencoderViT`, and an MAE's
encoder for fine-tuning.

`vitkit.load_model(dir)` on a transformers ViTMAE directory (config.json + model.safetensors / pytorch_model.bin)
gives the whole masked autoencoder (reconstruction, further pretraining); `vitkit.load_model(dir, num_classes=N)`
on it, or on a vitkit MAE directory or pretraining run, gives the encoder as a plain ViT with a new N-class head
(`num_classes=0`: features only), the decoder dropped and said so (`encoder_for_finetuning`).

Encoder keys are transformers ViT's (renamed by `vitkit.weights.hf.hf_to_timm_state_dict`, q/k/v fused); decoder
blocks are stored under three spellings, all read: `decoder.decoder_layers.{i}.attention.attention.query` (4.x,
and the published facebook/vit-mae-* files), `decoder.decoder_encoder.layer.{i}...` (what transformers 5 writes)
and the live module names of transformers 5 (`decoder.decoder_layers.{i}.attention.q_proj`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vitkit.weights._log import Reporter
from vitkit.weights.hf import arch_from_hf_config, hf_to_timm_state_dict

SUPPORTED_ARCHITECTURES = ("ViTMAEForPreTraining",)
# Decoder keys that are not in blocks (without the "decoder." prefix) -> vitkit names.
_DECODER_KEYS = {
    "mask_token": "mask_token",
    "decoder_pos_embed": "decoder_pos_embed",
    "decoder_embed.weight": "decoder_embed.weight",
    "decoder_embed.bias": "decoder_embed.bias",
    "decoder_norm.weight": "decoder_norm.weight",
    "decoder_norm.bias": "decoder_norm.bias",
    "decoder_pred.weight": "decoder_pred.weight",
    "decoder_pred.bias": "decoder_pred.bias",
}
_DECODER_BLOCK = re.compile(r"decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)")
_LIVE_NAMES = re.compile(r"attention\.[qkvo]_proj\..+|mlp\..+")  # transformers 5 module names


def _decoder_block_key(index: str, rest: str) -> str:
    """A decoder block key rewritten as the encoder block key of the same layout, for the ViT renamer."""
    return f"layers.{index}.{rest}" if _LIVE_NAMES.fullmatch(rest) else f"encoder.layer.{index}.{rest}"


def hf_vitmae_to_timm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers ViTMAEForPreTraining state dict and config.json -> (MAEConfig fields, vitkit state dict).

    Raises:
        ValueError: another architecture (e.g. ViTMAEModel, which has no decoder), an unknown key, or options
            vitkit's MAE lacks (each named).
    """
    source = "ViTMAE checkpoint"
    archs = list(config.get("architectures") or [])
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ValueError(
            f"{source}: architecture {bad} is not supported; vitkit reads {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(the encoder with its decoder)"
        )
    encoder: dict[str, torch.Tensor] = {}
    decoder_blocks: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("vit."):
            encoder[key.removeprefix("vit.")] = value
        elif (m := _DECODER_BLOCK.fullmatch(key)) is not None:
            decoder_blocks[_decoder_block_key(m.group(1), m.group(2))] = value
        elif key.removeprefix("decoder.") in _DECODER_KEYS and key.startswith("decoder."):
            out[_DECODER_KEYS[key.removeprefix("decoder.")]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: keys with no counterpart in vitkit's MaskedAutoencoderViT: {sorted(unknown)}")
    if "mask_token" not in out:
        raise ValueError(
            f"{source}: no decoder weights (decoder.mask_token): a ViTMAEModel checkpoint holds the encoder alone; "
            "vitkit imports ViTMAEForPreTraining"
        )
    # The encoder is a transformers ViT in all but the model type: its renamer and config reader apply as they are.
    out.update({f"encoder.{k}": v for k, v in hf_to_timm_state_dict(encoder, source=source).items()})
    out.update({f"decoder_{k}": v for k, v in hf_to_timm_state_dict(decoder_blocks, source=source).items()})
    vit_config = {**config, "model_type": "vit", "architectures": []}
    arch = arch_from_hf_config(vit_config, num_classes=0, source=source)
    size = config.get("image_size", 224)
    D = int(config.get("decoder_hidden_size", 512))
    hidden = int(config.get("decoder_intermediate_size", 2048))
    arch.update(
        img_size=size if isinstance(size, int) else list(size),
        decoder_embed_dim=D,
        decoder_depth=int(config.get("decoder_num_hidden_layers", 8)),
        decoder_num_heads=int(config.get("decoder_num_attention_heads", 16)),
        decoder_mlp_ratio=hidden / D,
        mask_ratio=float(config.get("mask_ratio", 0.75)),
        norm_pix_loss=bool(config.get("norm_pix_loss", False)),
    )
    if int(D * arch["decoder_mlp_ratio"]) != hidden:
        raise ValueError(f"{source}: decoder_intermediate_size {hidden} is not reproducible as int({D} * mlp_ratio)")
    return arch, out


def encoder_for_finetuning(model: nn.Module, num_classes: int, rep: Reporter) -> nn.Module:
    """The encoder of a `MaskedAutoencoderViT` as a plain ViT with a new `num_classes` head (0 = features only),
    saying in the log that the decoder is dropped."""
    decoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder."))
    vit = model.encoder_model(num_classes)
    head = f"a new, randomly initialised {num_classes}-class head" if num_classes else "no head (features only)"
    rep.info(
        f"MAE checkpoint: fine-tuning its encoder ({sum(p.numel() for p in vit.parameters()):,} parameters, {head}); "
        f"the decoder ({decoder:,} parameters) is dropped"
    )
    return vit
