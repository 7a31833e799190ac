"""Original JAX ViT and big_vision `.npz` checkpoints.

Flax stores kernels input-first: the patch embedding is HWIO `(p, p, C, D)`, dense kernels are `(in, out)`, and
attention keeps the heads apart: q/k/v kernels `(D, heads, head_dim)` with biases `(heads, head_dim)`, the output
kernel `(heads, head_dim, D)`. So the head count comes straight from the weights here. The arrays are turned
into a timm-layout state dict and finished by the timm importer.

Two namings exist. The original ViT repository uses `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3` and `Transformer/posembed_input/pos_embedding`; big_vision uses `MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0` and a top-level `pos_embedding`, and may stack all blocks into one
`Transformer/encoderblock/...` array with a leading depth axis (from `nn.scan`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from vitkit.models.base import INCEPTION_MEAN, INCEPTION_STD, Preprocess
from vitkit.models.vit import VisionTransformer
from vitkit.weights._log import LogFn, Reporter, as_reporter
from vitkit.weights.safe_load import read_npz
from vitkit.weights.timm import from_timm_state_dict

# Wrappers around the parameter tree in some releases (training state, multimodal models).
_PREFIXES = ("opt/target/", "params/img/", "params/")
_STACKED = "Transformer/encoderblock/"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
# Parts of other models that vitkit's VisionTransformer does not have, with what they are.
_UNSUPPORTED = {
    "pre_logits/": "a pre-logits (representation) layer between the class token and the head; vitkit has no "
    "pre-logits layer (the later ImageNet-21k releases dropped it too)",
    "MAPHead_0/": "a multihead attention-pooling (MAP) head; vitkit pools with the class token or the mean",
    "conv_root/": "a ResNet stem (a hybrid ViT); vitkit's VisionTransformer embeds patches linearly",
}


class _Arrays:
    """The checkpoint's arrays with bookkeeping: every array must be used, and leftovers are reported."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str):
        self.arrays = arrays
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def take(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise ValueError(f"{self.source}: expected an array named {key!r}, which is missing")
        self.used.add(key)
        arr = self.arrays[key]
        if arr.dtype.kind != "f":
            raise ValueError(
                f"{self.source}: {key} has dtype {arr.dtype}, expected floating point (bfloat16 archives store raw "
                "bytes; convert them to float32 first)"
            )
        return arr.astype(np.float32)

    def leftovers(self) -> list[str]:
        return sorted(set(self.arrays) - self.used)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _unstack(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split big_vision's scanned `Transformer/encoderblock/...` arrays into per-block `encoderblock_{i}` ones."""
    stacked = {k: v for k, v in arrays.items() if k.startswith(_STACKED)}
    if not stacked:
        return arrays
    out = {k: v for k, v in arrays.items() if k not in stacked}
    depth = {v.shape[0] for v in stacked.values()}
    if len(depth) != 1:
        raise ValueError(f"stacked encoder blocks disagree on depth: {sorted(depth)}")
    for key, value in stacked.items():
        rest = key[len(_STACKED) :]
        for i in range(value.shape[0]):
            out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    return out


def jax_to_timm_state_dict(
    arrays: dict[str, np.ndarray], *, source: str = "npz", log: LogFn | Reporter | None = None
) -> tuple[dict[str, torch.Tensor], int | None]:
    """Map JAX ViT / big_vision arrays to a timm-layout state dict.

    Returns:
        The state dict and the number of attention heads (None when the kernels are stored flattened).

    Raises:
        ValueError: a part vitkit lacks (pre-logits, MAP head, hybrid stem), or arrays left over after mapping.
    """
    rep = as_reporter(log)
    for prefix in _PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            rep.info(f"{source}: using the parameters under {prefix!r}")
            break
    for part, what in _UNSUPPORTED.items():
        found = sorted(k for k in arrays if k.startswith(part))
        if found:
            raise ValueError(f"{source} has {what}: cannot import {found}")
    if _STACKED.rstrip("/") + "/LayerNorm_0/scale" in arrays:
        rep.info(f"{source}: unstacking scanned encoder blocks ({_STACKED}...)")
    w = _Arrays(_unstack(arrays), source)

    sd: dict[str, torch.Tensor] = {}
    kernel = w.take("embedding/kernel")
    if kernel.ndim != 4:
        raise ValueError(f"{source}: embedding/kernel should be (p, p, C, D), got {kernel.shape}")
    sd["patch_embed.proj.weight"] = _t(kernel.transpose(3, 2, 0, 1))  # HWIO -> (D, C, p, p)
    sd["patch_embed.proj.bias"] = _t(w.take("embedding/bias"))
    if "cls" in w:
        sd["cls_token"] = _t(w.take("cls").reshape(1, 1, -1))  # (1, 1, D)
    for key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
        if key in w:
            pos = w.take(key)
            sd["pos_embed"] = _t(pos.reshape(1, -1, pos.shape[-1]))  # (1, N, D)
            break

    depth = len({int(m.group(1)) for k in w.arrays if (m := _BLOCK.match(k))})
    heads = set()
    for i in range(depth):
        bp = f"Transformer/encoderblock_{i}/"
        # Original ViT and big_vision number the sub-modules differently; take whichever this block has.
        mha = next((f"{bp}{n}/" for n in ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
                    if f"{bp}{n}/query/kernel" in w), None)  # fmt: skip
        ln2 = next((f"{bp}{n}/" for n in ("LayerNorm_2", "LayerNorm_1") if f"{bp}{n}/scale" in w), None)
        mlp = next((f"{bp}{n}/" for n in ("MlpBlock_3", "MlpBlock_0") if f"{bp}{n}/Dense_0/kernel" in w), None)
        if mha is None or ln2 is None or mlp is None:
            raise ValueError(
                f"{source}: block {i} lacks attention, second LayerNorm or MLP weights "
                f"(found: {sorted(k for k in w.arrays if k.startswith(bp))})"
            )
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = _t(w.take(f"{bp}LayerNorm_0/scale"))
        sd[b + "norm1.bias"] = _t(w.take(f"{bp}LayerNorm_0/bias"))
        qkv_w, qkv_b = [], []
        for name in ("query", "key", "value"):
            k = w.take(f"{mha}{name}/kernel")  # (D, heads, head_dim) or (D, D)
            if k.ndim == 3:
                heads.add(k.shape[1])
            qkv_w.append(k.reshape(k.shape[0], -1).T)  # (heads * head_dim, D)
            if f"{mha}{name}/bias" in w:
                qkv_b.append(w.take(f"{mha}{name}/bias").reshape(-1))  # (heads * head_dim,)
        sd[b + "attn.qkv.weight"] = _t(np.concatenate(qkv_w, axis=0))  # (3D, D)
        if qkv_b:
            sd[b + "attn.qkv.bias"] = _t(np.concatenate(qkv_b, axis=0))  # (3D,)
        out = w.take(f"{mha}out/kernel")  # (heads, head_dim, D) or (D, D)
        sd[b + "attn.proj.weight"] = _t(out.reshape(-1, out.shape[-1]).T)  # (D, heads * head_dim)
        sd[b + "attn.proj.bias"] = _t(w.take(f"{mha}out/bias"))
        sd[b + "norm2.weight"] = _t(w.take(f"{ln2}scale"))
        sd[b + "norm2.bias"] = _t(w.take(f"{ln2}bias"))
        for r in range(2):
            sd[b + f"mlp.fc{r + 1}.weight"] = _t(w.take(f"{mlp}Dense_{r}/kernel").T)  # (out, in)
            sd[b + f"mlp.fc{r + 1}.bias"] = _t(w.take(f"{mlp}Dense_{r}/bias"))

    sd["norm.weight"] = _t(w.take("Transformer/encoder_norm/scale"))
    sd["norm.bias"] = _t(w.take("Transformer/encoder_norm/bias"))
    if "head/kernel" in w:
        sd["head.weight"] = _t(w.take("head/kernel").T)  # (classes, D)
        sd["head.bias"] = _t(w.take("head/bias"))
    left = w.leftovers()
    if left:
        raise ValueError(f"{source}: arrays with no counterpart in vitkit's VisionTransformer ({len(left)}): {left}")
    if len(heads) > 1:
        raise ValueError(f"{source}: blocks disagree on the number of attention heads: {sorted(heads)}")
    return sd, (heads.pop() if heads else None)


def load_jax_npz(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    log: LogFn | Reporter | None = None,
) -> VisionTransformer:
    """Load an original JAX ViT or big_vision `.npz` checkpoint as a VisionTransformer.

    Args:
        path: the `.npz` archive.
        model_name: a registered ViT name; only needed when the attention kernels are stored flattened (no
            head axis) or the position grid is not square. Checked against the shapes when given.
        img_size: input size for the model; positions are resampled when it differs from the checkpoint's grid.
        log: receives one line per inference or assumption.
    """
    rep = as_reporter(log)
    path = Path(path)
    state, heads = jax_to_timm_state_dict(read_npz(path), source=str(path), log=rep)
    if heads is not None:
        rep.info(f"num_heads={heads} from the attention kernels")
    # The JAX ViT releases normalise to [-1, 1] and evaluate on a plain resize.
    rep.info("preprocessing: mean=std=0.5, bilinear resize, no crop (as in the JAX ViT releases)")
    pre = Preprocess(INCEPTION_MEAN, INCEPTION_STD, crop_fraction=1.0, interpolation="bilinear")
    return from_timm_state_dict(
        state, model_name=model_name, num_heads=heads, img_size=img_size, preprocess=pre, source=str(path), log=rep
    )
