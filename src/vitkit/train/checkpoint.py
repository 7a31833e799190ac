"""Checkpoints you can resume from exactly.

`RUN_DIR/last/` and `RUN_DIR/best/` are ordinary vitkit model directories (`vitkit.load_model` opens them) that
also hold `training_state.pt`: optimiser, grad scaler, EMA weights, every RNG state, the step, and where in the
epoch's data order training stood. Each is written into a temporary directory, fsynced and renamed into place
(`vitkit._io.atomic_write_dir`), so a kill at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit._io import atomic_write_dir, resolve_dir
from vitkit.weights.native import CONFIG_NAME, WEIGHTS_NAME

STATE_NAME = "training_state.pt"
STATE_FORMAT = "vitkit-training-state"
STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# RNG state: everything a step can draw from
# ----------------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) every CUDA device's generator state."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # Stored as plain types and tensors so the file loads with torch.load(weights_only=True).
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].copy()),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------------------------
def write_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    training_state: dict[str, Any] | None,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
    **config_extra: Any,
) -> Path:
    """Atomically replace `directory` with a model dir (+ `training_state.pt` when given).

    Args:
        directory: e.g. RUN_DIR/last.
        model: saved with its `save_pretrained` (config.json + model.safetensors).
        training_state: the dict `Trainer.state_dict()` returns, or None for weights only.
        extra_files: file name -> writer(path) for anything else to put in the directory.
        **config_extra: extra JSON fields for config.json (e.g. a `training` record).
    """
    directory = Path(directory)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, **config_extra)
        if training_state is not None:
            torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **training_state}, tmp / STATE_NAME)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    atomic_write_dir(directory, fill)
    return directory


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` (or its crash-recovery `.old` twin) holds a complete resumable checkpoint."""
    d = resolve_dir(directory)
    return all((d / n).is_file() for n in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME))


def read_training_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load `training_state.pt` from a checkpoint directory, checking its format."""
    d = resolve_dir(directory)
    path = d / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{d} has no {STATE_NAME}; it is not a resumable checkpoint")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a vitkit training state (format={state.get('format')!r})")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} has training-state version {state.get('version')}; this vitkit reads {STATE_VERSION}")
    return state


def load_weights_into(model: nn.Module, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
    """Copy a checkpoint's weights into an existing model (strict: every key must match)."""
    from safetensors.torch import load_file

    from vitkit.weights.native import load_state_dict_strict

    d = resolve_dir(directory)
    state = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
    load_state_dict_strict(model, state, source=str(d / WEIGHTS_NAME))
