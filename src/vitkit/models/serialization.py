"""vitkit's own format: a directory with `config.json` (architecture + preprocessing) and `model.safetensors`.

It lives with the models (a model saves itself with `save_pretrained`); `vitkit.weights` re-exports it next to
the importers of foreign formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitkit._io import atomic_path, atomic_write_dir, atomic_write_text, resolve_dir
from vitkit._version import __version__
from vitkit.models.base import Preprocess, config_from_dict, config_to_dict
from vitkit.models.registry import get_family
from vitkit.runs import model_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "vitkit"


def model_config_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The JSON config that describes `model` (architecture, preprocessing and any extra fields)."""
    return {
        "format": FORMAT,
        "format_version": 1,
        "vitkit_version": __version__,
        "family": model.family,
        "model_name": getattr(model, "model_name", None),
        # describe(): the config of the model as it is now, e.g. after `model.head = nn.Linear(D, 5)`.
        "architecture": config_to_dict(model.describe() if hasattr(model, "describe") else model.cfg),
        "preprocess": config_to_dict(model.preprocess),
        **extra,
    }


def save_pretrained(model: nn.Module, directory: str | os.PathLike, **extra: Any) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` so a crash never leaves a torn pair.

    A new directory (or one holding only these two files) is built aside and swapped in whole. A directory
    holding other files too is updated file by file, each atomically (weights first, then the config).

    Args:
        model: a vitkit model (it has `family`, `cfg` and `preprocess`).
        directory: created if missing; existing files of the same names are replaced.
        **extra: additional JSON-serialisable fields stored in config.json (e.g. training info).
    """
    directory = Path(directory)
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    config = json.dumps(model_config_dict(model, **extra), indent=2) + "\n"

    def write(into: Path) -> None:
        with atomic_path(into / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "producer": f"vitkit {__version__}"})
        atomic_write_text(into / CONFIG_NAME, config)

    ours = {CONFIG_NAME, WEIGHTS_NAME}
    if not directory.exists() or {p.name for p in directory.iterdir()} <= ours:
        atomic_write_dir(directory, write)
    else:
        write(directory)
    return directory


def is_native_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a vitkit config.json (an unreadable one is not)."""
    return model_config(path).get("format") == FORMAT


def model_from_config(config: dict[str, Any], **overrides: Any) -> nn.Module:
    """Instantiate an (untrained) model from a native config dict, applying architecture overrides."""
    config_cls, model_cls = get_family(config["family"])
    arch = {**config["architecture"], **overrides}
    model = model_cls(config_from_dict(config_cls, arch))
    pre = dict(config.get("preprocess") or {})
    model.preprocess = config_from_dict(Preprocess, pre) if pre else Preprocess(input_size=model.cfg.img_size)
    if config.get("model_name"):
        model.model_name = config["model_name"]
    return model


def load_native(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by `save_pretrained`; every key must match exactly."""
    directory = resolve_dir(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a vitkit model directory?")
    config = read_config(cfg_path)
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a vitkit config (format={config.get('format')!r})")
    model = model_from_config(config)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state = read_safetensors(weights)
    model = match_state_dtype(model, state)  # a model saved in bf16 comes back in bf16
    load_state_dict_strict(model, state, source=str(weights))
    return model.to(map_location)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config.json as a dict; a ValueError naming the file when it is truncated or not JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is incomplete or corrupt: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a model config (a JSON object), got {type(data).__name__}")
    return data


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, on the CPU.

    Raises:
        ValueError: naming the file, when it is truncated, damaged or not a safetensors file.
    """
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = Path(path).stat().st_size if Path(path).exists() else 0
        raise ValueError(
            f"{path} is incomplete or corrupt ({size:,} bytes): it cannot be read as a safetensors file ({e}). "
            "Copy or download it again, or re-save the model"
        ) from None


def match_state_dtype(
    model: nn.Module, state: dict[str, torch.Tensor], source: str | None = None, log: Any = None
) -> nn.Module:
    """Cast `model` to the floating dtype of `state` when all its floating tensors share one (bf16, fp16 ...).

    Every load path uses this, so a checkpoint comes back in the precision it was saved in; mixed-precision
    state dicts load into the model's own dtype (float32).
    """
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != next(model.parameters()).dtype:
        model = model.to(dtype)
        if log is not None:
            log(f"{source or 'checkpoint'}: {str(dtype).replace('torch.', '')} weights, kept in that precision")
    return model


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load with every key accounted for: raise an error listing missing and unexpected keys, and bad shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError(f"cannot load {source}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
