"""transformers DeiT checkpoints (`DeiTForImageClassificationWithTeacher`, `DeiTForImageClassification`,
`DeiTModel`) -> timm keys for `vitkit.models.DeiT`.

A transformers DeiT is a transformers ViT with a distillation token in its embeddings
(`deit.embeddings.distillation_token`, with its own row in the position table after the class token's). The two
classifier classes differ in their heads:

- `DeiTForImageClassificationWithTeacher`: `cls_classifier` on the class token and `distillation_classifier` on
  the distillation token, logits averaged: timm's `head` and `head_dist` (`DeiTConfig(distilled=True)`).
- `DeiTForImageClassification`: one `classifier` on the class token; the distillation token runs through the
  blocks but is not classified: `DeiTConfig(distilled=True, dist_head=False)`.
- `DeiTModel` (no head): loaded with `dist_head=False` and no classifier, so its pooled features are the class
  token's final state, as `DeiTForImageClassification` reads it. Its pooler (dense + tanh) has no counterpart and
  is dropped with a warning.

transformers 5 keeps the 4.x key names on disk (`encoder.layer.{i}.attention.attention.query`), which is what this
reads; the block keys are renamed by the ViT converter (`vitkit.weights.hf.hf_to_timm_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vitkit.weights._log import as_reporter
from vitkit.weights.hf import arch_from_hf_config, hf_to_timm_state_dict

SUPPORTED_ARCHITECTURES = ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "DeiTModel")
# Keys (without the "deit." prefix) that only DeiT has -> timm names; everything else is ViT's layout.
_DEIT_KEYS = {
    "embeddings.distillation_token": "dist_token",
    "cls_classifier.weight": "head.weight",
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
}


def _image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"config image_size={value!r} should be an int or a [height, width] pair")


def _architecture(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """The transformers class the checkpoint was saved from: config.json's `architectures`, else read from the keys.

    Raises:
        ValueError: an unsupported class, or a config whose class disagrees with the heads in the weights.
    """
    keys = {k.removeprefix("deit.") for k in state}
    from_keys = (
        "DeiTForImageClassificationWithTeacher"
        if keys & {"cls_classifier.weight", "distillation_classifier.weight"}
        else "DeiTForImageClassification"
        if "classifier.weight" in keys
        else None
    )
    archs = list(config.get("architectures") or [])
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ValueError(f"transformers DeiT architecture {bad} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    if len(archs) > 1:
        raise ValueError(f"config.json lists several architectures {archs}; expected one of {SUPPORTED_ARCHITECTURES}")
    if not archs:
        return from_keys or "DeiTModel"
    arch = archs[0]
    # A classifier saved with num_labels=0 has no head weights (an Identity head): then the keys cannot disagree.
    if from_keys is not None and from_keys != arch:
        raise ValueError(f"config.json says {arch} but the weights hold the heads of {from_keys}")
    return arch


def hf_deit_to_timm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a transformers DeiT state dict (as on disk) and its config to vitkit/timm form.

    Args:
        state: the tensors of `model.safetensors` / `pytorch_model.bin` of a DeiT classifier (keys `deit.*` and
            `cls_classifier.*` + `distillation_classifier.*`, or `classifier.*`) or a `DeiTModel` (the same body
            keys without `deit.`, plus `pooler.dense.*`).
        config: the directory's `config.json` as a dict (or a transformers `DeiTConfig`).

    Returns:
        `(arch, state)`: `DeiTConfig` keyword arguments (img_size from the config's image_size; the class count
        from the classifier's weight, 0 for a `DeiTModel`) and the state dict in timm keys, loadable into
        `DeiT(DeiTConfig(**arch))` with `load_state_dict(strict=True)`.

    Raises:
        ValueError: another model type or architecture (e.g. `DeiTForMaskedImageModeling`), an activation vitkit
            lacks, a position table that does not fit image_size, or keys with no counterpart (listed by name).
    """
    if not isinstance(config, Mapping):
        if not hasattr(config, "to_dict"):
            raise TypeError(f"config must be a config.json dict or a transformers config, got {type(config).__name__}")
        config = config.to_dict()
    if config.get("model_type") != "deit":
        raise ValueError(f"model_type={config.get('model_type')!r} is not a transformers DeiT (model_type 'deit')")
    hf_arch = _architecture(config, state)
    source = f"transformers {hf_arch} state dict"
    out: dict[str, torch.Tensor] = {}
    body: dict[str, torch.Tensor] = {}
    pooler = []
    for key, value in state.items():
        k = key.removeprefix("deit.")
        if k in _DEIT_KEYS:
            out[_DEIT_KEYS[k]] = value
        elif k in ("pooler.dense.weight", "pooler.dense.bias"):
            pooler.append(key)
        else:
            body[k] = value  # ViT's layout: embeddings, encoder.layer.*, layernorm, classifier
    out.update(hf_to_timm_state_dict(body, source=source))
    if pooler:  # through the vitkit.weights logger: this pure function has no log callback
        as_reporter(None).warn(
            f"{source}: dropped the DeiTModel pooler ({', '.join(sorted(pooler))}): vitkit has no pooler layer "
            "(a dense + tanh on the class token that image classification does not use)"
        )
    if "dist_token" not in out:
        raise ValueError(f"{source} has no embeddings.distillation_token; a transformers DeiT always has one")

    num_classes = int(out["head.weight"].shape[0]) if "head.weight" in out else 0
    # DeiT's config.json has ViT's fields, read by the ViT importer (which checks the model type, hence the copy).
    arch = arch_from_hf_config({**config, "model_type": "vit", "architectures": []}, num_classes=num_classes,
                               source=source)  # fmt: skip
    img_size = _image_size(config.get("image_size", 224))
    patch = arch["patch_size"]
    if img_size[0] % patch or img_size[1] % patch:
        raise ValueError(f"{source}: image_size {list(img_size)} is not a multiple of patch_size {patch}")
    grid = (img_size[0] // patch, img_size[1] // patch)
    rows = int(out["pos_embed"].shape[1]) if "pos_embed" in out else None
    if rows is not None and rows != 2 + grid[0] * grid[1]:
        raise ValueError(
            f"{source}: position_embeddings has {rows} rows, but image_size {list(img_size)} and patch_size "
            f"{patch} imply 2 (class, distillation) + {grid[0]}x{grid[1]}"
        )
    arch.update(img_size=img_size, distilled=True, dist_head=hf_arch == "DeiTForImageClassificationWithTeacher")
    return arch, out
