"""What every vitkit model family shares: preprocessing metadata, config (de)serialisation and keyword spellings.

The model contract (every family honours it; consumers such as the model table, optimiser groups, freezing,
resize-on-load, train/eval/predict, explain and viz rely on nothing else):

    family: str                      registry family name ("vit", ...); `cfg` its typed config dataclass
    preprocess: Preprocess           how inputs must be prepared; saved with the weights
    num_classes: int                 classifier outputs as the head is now (0 = features only)
    num_features: int                width of the pooled features
    forward_features(x)              image (B, C, H, W) -> features (tokens (B, N, D) or maps (B, C, H', W'))
    forward_head(f, pre_logits=)     features -> logits (B, classes), or pooled features (B, num_features)
    forward(x) = forward_head(forward_features(x))
    forward_intermediates(x, indices, as_maps=True) -> [(B, C_i, H_i, W_i)]   any family, any stage/block
    feature_info: [{num_chs, reduction, module}]                             per stage/block, as timm
    layer_id(param_name) -> int, num_layer_ids                               layer-wise LR decay, freezing
    is_classifier(param_name) -> bool                                        head LR multiplier, head reset
    reset_classifier(num_classes), set_grad_checkpointing(enable), no_weight_decay()
    describe() -> cfg                the config of the model as it is now (e.g. after `model.head = ...`)
    adapt_state_dict(state, source_cfg, log)   fit weights saved at another input size (optional)
    save_pretrained(dir)
Attention capture is not part of `forward`: see `vitkit.layers.capture_attention`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from torch import nn

from vitkit._validate import check_choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The original JAX ViT checkpoints (and their transformers ports) normalise to [-1, 1].
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

Interpolation = Literal["bicubic", "bilinear", "nearest"]


@dataclass
class Preprocess:
    """How images must be prepared for a model; saved with its weights so eval/predict match training."""

    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean of the training data (0..1 scale)
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel std of the training data
    input_size: tuple[int, int] = (224, 224)  # (H, W) the model was trained at
    crop_fraction: float = 0.875  # eval: resize the short side to size / crop_fraction, then centre-crop
    interpolation: Interpolation = "bicubic"  # resize filter used in training and eval
    class_names: list[str] | None = None  # label i's name, in training order
    # Decode step before eval: image files were decoded with the short side resized to this and a square centre crop
    # (file datasets, `load_size`); None = images are used at their own size (digits, CIFAR, a notebook model).
    load_size: int | None = None

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.input_size = tuple(int(v) for v in self.input_size)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        check_literal("interpolation", self.interpolation, Interpolation)
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
        if self.load_size is not None:
            if isinstance(self.load_size, bool) or not isinstance(self.load_size, int) or self.load_size <= 0:
                raise ValueError(f"load_size must be a positive integer or None, got {self.load_size!r}")


check_literal = check_choice  # the one validator (vitkit._validate); this name is kept for the config modules

# Spellings from tutorials and other libraries -> vitkit config field (timm's names). One table for all families.
KWARG_ALIASES: dict[str, str] = {
    "n_classes": "num_classes",
    "n_heads": "num_heads",
    "heads": "num_heads",
    "in_channels": "in_chans",
    "channels": "in_chans",
    "dropout": "drop_rate",
    "attention_dropout": "attn_drop_rate",
    "num_layers": "depth",
    "n_layers": "depth",
    "image_size": "img_size",
    "dim": "embed_dim",
}
# Given as an absolute width, stored as a ratio of the embedding width.
_MLP_DIM_KEYS = ("mlp_dim",)


def config_kwargs(config_cls: type, kwargs: dict[str, Any], base: Any = None) -> dict[str, Any]:
    """Keyword arguments for `config_cls` with the accepted alternative spellings translated.

    Args:
        config_cls: a family's config dataclass.
        kwargs: what the user passed, e.g. `{"n_heads": 6, "n_classes": 10, "in_channels": 3}`.
        base: a config the arguments override (for `mlp_dim`, which needs the embedding width).

    Raises:
        TypeError: an unknown name, listing the config's fields and the accepted spellings; or the same field
            given twice under two spellings.
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    unknown = []
    mlp_dim = None
    for key, value in kwargs.items():
        if key in _MLP_DIM_KEYS and "mlp_ratio" in fields and "embed_dim" in fields:
            mlp_dim = (key, value)
            continue
        field_name = key if key in fields else KWARG_ALIASES.get(key)
        if field_name is None or field_name not in fields:
            unknown.append(key)
            continue
        if field_name in out:
            raise TypeError(
                f"{config_cls.__name__}: {source[field_name]!r} and {key!r} both set {field_name!r}; give one"
            )
        out[field_name] = value
        source[field_name] = key
    if unknown:
        aliases = sorted(k for k, v in KWARG_ALIASES.items() if v in fields)
        aliases += list(_MLP_DIM_KEYS) if {"mlp_ratio", "embed_dim"} <= fields else []
        raise TypeError(
            f"unknown argument(s) {unknown} for {config_cls.__name__}; accepted: {', '.join(sorted(fields))} "
            f"(also the spellings {', '.join(aliases)})"
        )
    if mlp_dim is not None:
        if "mlp_ratio" in out:
            raise TypeError(f"{config_cls.__name__}: give {mlp_dim[0]} or mlp_ratio, not both")
        width = out.get("embed_dim", getattr(base, "embed_dim", None) if base is not None else None)
        if width is None:
            width = {f.name: f.default for f in dataclasses.fields(config_cls)}["embed_dim"]
        out["mlp_ratio"] = float(mlp_dim[1]) / float(width)
    return out


def model_label(model: nn.Module) -> str:
    """The registered name of a model, else its class name: how errors and figures name it."""
    return getattr(model, "model_name", None) or type(model).__name__


def token_patch_size(model: nn.Module) -> int:
    """Pixels per token side of a token model (the stride of its token grid, from `feature_info`)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise TypeError(f"{model_label(model)} has no feature_info (the model contract), so no token grid")
    return int(info[-1]["reduction"])


def has_class_token(model: nn.Module) -> bool:
    """Whether the model's first token is a class token (explanations read its attention row)."""
    return getattr(model, "cls_token", None) is not None


def follow_assigned_head(model: nn.Module, head: nn.Module) -> None:
    """After `model.head = module` (the tutorials' way to change the class count): the config's num_classes and
    the class names follow the new head's size, as `reset_classifier` does."""
    n = head_outputs(head)
    if n is not None:
        model.cfg.num_classes = n
        names = model.preprocess.class_names
        if names is not None and len(names) != n:
            model.preprocess.class_names = None


def check_savable_head(name: str, head: nn.Module | None, width: int) -> None:
    """Raise naming `model.<name>` when a config cannot describe it: not `nn.Linear(width, k)` with a bias, nor
    `nn.Identity()` (None, no head, passes)."""
    if head is None or isinstance(head, nn.Identity):
        return
    if not isinstance(head, nn.Linear) or head.in_features != width or head.bias is None:
        what = type(head).__name__
        if isinstance(head, nn.Linear):
            what += f"({head.in_features}, {head.out_features}, bias={head.bias is not None})"
        raise ValueError(
            f"model.{name} is {what}: a vitkit config can describe a head that is nn.Linear({width}, classes) with "
            "a bias, or nn.Identity(); save this model's state_dict with torch.save instead, or use "
            "reset_classifier(classes)"
        )


def head_outputs(head: nn.Module | None) -> int | None:
    """Outputs of a classifier head: a Linear's out_features, 0 for Identity, the last Linear of anything else."""
    if head is None:
        return None
    if isinstance(head, nn.Identity):
        return 0
    if isinstance(head, nn.Linear):
        return int(head.weight.shape[0])  # the weight, not out_features: `head.weight = Parameter(...)` resizes it
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].weight.shape[0]) if linears else None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict, refusing unknown keys by name and restoring tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        origin = get_origin(hints.get(key))
        is_tuple = origin is tuple or any(get_origin(a) is tuple for a in get_args(hints.get(key)))
        kwargs[key] = tuple(value) if is_tuple and isinstance(value, list) else value
    return cls(**kwargs)
