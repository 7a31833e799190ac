"""Checkpoints you can resume from exactly.

`RUN_DIR/last/` and `RUN_DIR/best/` are ordinary vitkit model directories (`vitkit.load_model` opens them) that
also hold `training_state.pt`: optimiser, grad scaler, EMA weights, every RNG state, the step, and where in the
epoch's data order training stood. Each is written into a temporary directory, fsynced and renamed into place
(`vitkit._io.atomic_write_dir`), so a kill at any moment leaves either the previous checkpoint or the new one.

A run with `parallel: fsdp` writes the same directory: `model.safetensors` holds the whole model (gathered on
rank 0, so `vitkit.load_model` opens it in any plain process), and the sharded state, model + optimiser (+ EMA),
sits next to it in torch.distributed.checkpoint's files (`.metadata`, `__<rank>_0.distcp`): each process wrote
its own shards, and resuming reads them back, even into another number of processes.
"""

from __future__ import annotations

import json
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
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shard files


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
    *,
    weights_state: dict[str, torch.Tensor] | None = None,
    sharded_dir: str | os.PathLike | None = None,
    **config_extra: Any,
) -> Path:
    """Atomically replace `directory` with a model dir (+ `training_state.pt` when given).

    Args:
        directory: e.g. RUN_DIR/last.
        model: saved with its `save_pretrained` (config.json + model.safetensors).
        training_state: the dict `Trainer.state_dict()` returns, or None for weights only.
        extra_files: file name -> writer(path) for anything else to put in the directory.
        weights_state: the weights to write instead of `model.state_dict()` (the whole state of a sharded model,
            see `distributed.full_state_dict`); `model` then only describes the architecture in config.json.
        sharded_dir: a torch.distributed.checkpoint directory (flat: `.metadata` + shard files) whose files are
            moved into the checkpoint.
        **config_extra: extra JSON fields for config.json (e.g. a `training` record).
    """
    directory = Path(directory)

    def fill(tmp: Path) -> None:
        if weights_state is None:
            model.save_pretrained(tmp, **config_extra)
        else:
            _save_weights(tmp, model, weights_state, config_extra)
        if sharded_dir is not None:
            for f in Path(sharded_dir).iterdir():
                os.replace(f, tmp / f.name)
        if training_state is not None:
            torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **training_state}, tmp / STATE_NAME)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    atomic_write_dir(directory, fill)
    return directory


def _save_weights(into: Path, model: nn.Module, state: dict[str, torch.Tensor], config_extra: dict[str, Any]) -> None:
    """config.json + model.safetensors as `save_pretrained` writes them, from a given state dict (into a fresh
    directory that `atomic_write_dir` swaps in whole, so plain writes suffice)."""
    from safetensors.torch import save_file

    from vitkit._version import __version__
    from vitkit.models.serialization import model_config_dict

    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(into / WEIGHTS_NAME), metadata={"format": "pt", "producer": f"vitkit {__version__}"})
    (into / CONFIG_NAME).write_text(json.dumps(model_config_dict(model, **config_extra), indent=2) + "\n")


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` (or its crash-recovery `.old` twin) holds a complete resumable checkpoint."""
    d = resolve_dir(directory)
    return all((d / n).is_file() for n in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME))


def read_training_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load `training_state.pt` from a checkpoint directory, checking its format.

    The returned dict also has "directory": the directory it was read from (after crash recovery, the `.old`
    twin), where a sharded (FSDP) run finds its model and optimiser shards.
    """
    d = resolve_dir(directory)
    path = d / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{d} has no {STATE_NAME}; it is not a resumable checkpoint")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a vitkit training state (format={state.get('format')!r})")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} has training-state version {state.get('version')}; this vitkit reads {STATE_VERSION}")
    state["directory"] = str(d)
    return state


def load_weights_into(model: nn.Module, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
    """Copy a checkpoint's weights into an existing model (strict: every key must match).

    A model sharded by FSDP2 takes them too: every process must then call this, and each keeps its shards.
    """
    from safetensors.torch import load_file

    from vitkit.train.distributed import is_sharded, load_full_state_dict
    from vitkit.weights.native import load_state_dict_strict

    d = resolve_dir(directory)
    source = str(d / WEIGHTS_NAME)
    if not is_sharded(model):
        load_state_dict_strict(model, load_file(source, device=str(map_location)), source=source)
        return
    state = load_file(source, device="cpu")  # sharding copies each process's slices to its device
    own = model.state_dict()  # DTensors report the whole (global) shape
    problems = {
        "missing keys": sorted(set(own) - set(state)),
        "unexpected keys": sorted(set(state) - set(own)),
        "shape mismatches": [k for k in sorted(own) if k in state and own[k].shape != state[k].shape],
    }
    if any(problems.values()):
        listed = "; ".join(f"{what}: {keys}" for what, keys in problems.items() if keys)
        raise ValueError(f"cannot load {source} into the sharded {type(model).__name__}: {listed}")
    load_full_state_dict(model, state)
