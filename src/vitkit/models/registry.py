"""The model registry: every variant is a named builder; `create_model` and `list_models` look them up."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_MODEL_FAMILY: dict[str, str] = {}
_MODEL_PREPROCESS: dict[str, dict[str, Any]] = {}  # name -> default Preprocess fields (mean, std, crop_fraction)
_FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {}


def register_family(name: str, config_cls: type, model_cls: type[nn.Module]) -> None:
    """Declare a model family so that saved configs can be turned back into models."""
    _FAMILIES[name] = (config_cls, model_cls)


def get_family(name: str) -> tuple[type, type[nn.Module]]:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def register_model(
    name: str, family: str, preprocess: dict[str, Any] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering `fn(**overrides) -> model` under `name`.

    Args:
        name: the variant's name (timm's, where timm has it).
        family: a family declared with `register_family`.
        preprocess: default `Preprocess` fields for this variant (mean, std, crop_fraction, interpolation), as
            the weights this name denotes were trained with; the input size always comes from the model's config.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        _MODELS[name] = fn
        _MODEL_FAMILY[name] = family
        _MODEL_PREPROCESS[name] = dict(preprocess or {})
        return fn

    return wrap


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"see vitkit.list_models(); e.g. {', '.join(list(_MODELS)[:4])}"
    return ValueError(f"unknown model {name!r}; {hint}")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. `create_model("vit_small_patch16_224", num_classes=10, img_size=256)`.

    Args:
        name: a name from `list_models()`.
        **overrides: config fields to change (unknown fields raise TypeError naming them).
    """
    from vitkit.models.base import Preprocess, config_kwargs

    if name not in _MODELS:
        raise _unknown(name)
    config_cls, _ = _FAMILIES[_MODEL_FAMILY[name]]
    try:
        config_kwargs(config_cls, overrides)  # unknown names fail here, naming the model; the family translates
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    model = _MODELS[name](**overrides)
    model.model_name = name
    model.preprocess = Preprocess(**{**_MODEL_PREPROCESS[name], "input_size": tuple(model.preprocess.input_size)})
    return model


def default_preprocess(name: str) -> dict[str, Any]:
    """The registered default preprocessing fields of a model name (mean, std, crop_fraction ...)."""
    if name not in _MODELS:
        raise _unknown(name)
    return dict(_MODEL_PREPROCESS[name])


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern such as `"vit_*_patch16_*"`, in registration order."""
    return [n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)]


def model_family(name: str) -> str:
    if name not in _MODELS:
        raise _unknown(name)
    return _MODEL_FAMILY[name]
