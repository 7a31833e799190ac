"""What every vitkit classifier shares: preprocessing metadata and config (de)serialisation helpers."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

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


def check_literal(name: str, value: Any, literal: Any) -> None:
    """Raise a ValueError naming `value` and the allowed set when it is not one of a Literal's options."""
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(repr(a) for a in allowed)}")


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
