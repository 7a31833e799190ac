"""Run directories and checkpoint resolution, read in one place.

A training run directory looks like:

    RUN/config.yaml     the resolved training config
    RUN/best/           the checkpoint with the best monitored metric (a vitkit model directory)
    RUN/last/           the latest checkpoint (a vitkit model directory + training_state.pt)

Every command that takes a checkpoint (`vitkit eval`, `predict`, `explain`, `visualize`, `vitkit.load_model`)
turns the path it was given into a model directory with `resolve_checkpoint`, and reads the training record
with `training_record` / `training_settings`. This module sits at the bottom of the package (it imports only the
standard library, PyYAML and `vitkit._io`) so that weights, train and explain can all use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vitkit._io import resolve_dir

CONFIG_NAME = "config.json"  # a vitkit model directory's config (see vitkit.weights.native)
RUN_CONFIG_NAME = "config.yaml"  # a run directory's resolved training config
CHECKPOINT_NAMES = ("best", "last")  # in the order `resolve_checkpoint` prefers them


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` (or its crash-recovery `.old` twin) holds a model config.json."""
    return (resolve_dir(path) / CONFIG_NAME).is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a training run: a config.yaml, or a best/ or last/ checkpoint."""
    p = Path(path)
    return p.is_dir() and ((p / RUN_CONFIG_NAME).is_file() or any(is_model_dir(p / name) for name in CHECKPOINT_NAMES))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The model directory behind `path`: itself if it is one, else RUN/best, else RUN/last.

    A file (a foreign checkpoint such as a timm `.pth`) is returned unchanged; `vitkit.load_model` decides.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is a directory that is neither a model directory nor a run with a checkpoint.
    """
    p = Path(path)
    if not p.exists() and not resolve_dir(p).exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    if p.is_file():
        return p
    if is_model_dir(p):
        return resolve_dir(p)
    for name in CHECKPOINT_NAMES:
        if is_model_dir(p / name):
            return resolve_dir(p / name)
    if (p / RUN_CONFIG_NAME).is_file():
        raise ValueError(
            f"run directory {str(p)!r} has no checkpoint yet (no best/ or last/); finish or resume it with "
            f"`vitkit train --resume {p}`"
        )
    raise ValueError(f"{str(p)!r} is neither a vitkit model directory (config.json) nor a run directory (best/, last/)")


def describe_checkpoint(path: str | os.PathLike) -> str | None:
    """A short line saying which checkpoint of a run `path` resolves to, or None when `path` is not a run."""
    p = Path(path)
    if not p.is_dir() or is_model_dir(p):
        return None
    chosen = resolve_checkpoint(p)
    record = training_record(chosen)
    epoch = record.get("epoch")
    which = chosen.name.removesuffix(".old")
    why = "best validation checkpoint" if which == "best" else "latest checkpoint (the run has no best/)"
    return f"loading {chosen} ({why}" + (f", epoch {epoch})" if epoch is not None else ")")


def model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a model directory ({} when it has none or it is not JSON)."""
    cfg = resolve_dir(directory) / CONFIG_NAME
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def training_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The `training` record a trainer stored in a checkpoint's config.json (data spec, seed, splits, epoch), or {}."""
    record = model_config(directory).get("training")
    return record if isinstance(record, dict) else {}


def training_settings(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The training recipe behind a checkpoint: RUN/config.yaml (next to or above it), else its training record."""
    import yaml

    path = Path(checkpoint)
    for candidate in (path / RUN_CONFIG_NAME, path.parent / RUN_CONFIG_NAME):
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text()) or {}
            return data if isinstance(data, dict) else {}
    record = training_record(path) if path.is_dir() else {}
    inner = record.get("config")
    return inner if isinstance(inner, dict) else record
