"""Read checkpoint files without ever running code from them.

A `.pth`/`.pt`/`.bin` file is a pickle, and unpickling can call any Python function (`os.system` included).
These files are opened only with `torch.load(weights_only=True)`, whose restricted unpickler accepts tensors and
plain containers and refuses everything else before it runs. `.safetensors` and `.npz` (with
`allow_pickle=False`) cannot hold code at all.

Training checkpoints wrap the weights in containers (`{"model": ..., "optimizer": ...}`, DDP's `module.` prefix,
EMA copies); `unwrap_state_dict` finds the weights and reports which container it used.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vitkit.weights._log import LogFn, Reporter, as_reporter

FileKind = Literal["torch", "safetensors", "npz"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Containers that hold the weights, in order of preference, and the ones that hold an EMA copy of them.
WEIGHT_CONTAINERS = ("state_dict", "model", "model_state_dict", "module", "net")
EMA_CONTAINERS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict")
# Prefixes added by wrappers around the model: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def file_kind(path: str | os.PathLike) -> FileKind:
    """Which reader a checkpoint file needs, from its suffix or, for unknown suffixes, its first bytes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".npz":
        return "npz"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
    return "torch"


def read_torch(path: str | os.PathLike) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; a file that needs more is refused, never run.

    Raises:
        ValueError: the pickle contains code or objects beyond tensors and plain containers, or the file is not
            a PyTorch checkpoint at all.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Plain pickles (not torch.save files) make torch warn about the protocol before refusing them.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" not in msg:
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {msg}") from None
        raise ValueError(
            f"refusing to unpickle {path}: it contains code/objects beyond tensors; {_weights_only_reason(msg)}. "
            "vitkit opens .pth/.pt/.bin files only with torch.load(weights_only=True) and never executes them. "
            "If you trust the file and it only holds harmless extra objects (e.g. argparse.Namespace training "
            "args), allow exactly those with torch.serialization.add_safe_globals([...]) and try again, or "
            "re-save just its state dict (or a .safetensors file) from an environment you trust"
        ) from None
    except Exception as e:  # the restricted unpickler fails in many ways on damaged files; none ran any code
        raise ValueError(
            f"cannot read {path} as a PyTorch checkpoint: the file is incomplete or corrupt, or not a checkpoint "
            f"({type(e).__name__}: {e})"
        ) from None


def _weights_only_reason(msg: str) -> str:
    """The specific line of torch's weights_only error (e.g. 'unsupported GLOBAL posix.system'), not its advice."""
    boilerplate = (
        "Weights only load failed",
        "Re-running",
        "Check the documentation",
        "Please file an issue",
        "In PyTorch",
    )
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    specific = [ln for ln in lines if not any(b in ln for b in boilerplate)]
    return " ".join(specific).rstrip(".") if specific else "torch's restricted unpickler rejected it"


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, on the CPU."""
    from vitkit.models.serialization import read_safetensors as _read

    return _read(path)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` archive, read with `allow_pickle=False` (object arrays are refused)."""
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"cannot read {path} as an .npz archive: {e}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(
            f"{path} is incomplete or corrupt: not a readable .npz archive ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive of named arrays")
    with data:
        try:
            return {k: data[k] for k in data.files}
        except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
            if "pickle" not in str(e).lower():
                raise ValueError(f"{path} is incomplete or corrupt ({e})") from None
            raise ValueError(f"refusing to load {path}: it contains pickled object arrays ({e})") from None
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"{path} is incomplete or corrupt ({type(e).__name__}: {e})") from None


def unwrap_state_dict(
    obj: Any, *, source: str = "checkpoint", log: LogFn | Reporter | None = None, prefer_ema: bool = False
) -> dict[str, torch.Tensor]:
    """Find the weights inside a loaded checkpoint and strip wrapper prefixes, reporting each step.

    Args:
        obj: what `read_torch`/`read_safetensors` returned.
        source: name used in messages (usually the file path).
        log: receives one line per container unwrapped or prefix stripped.
        prefer_ema: take the EMA copy (`model_ema`, `state_dict_ema`, ...) when the checkpoint has both.

    Raises:
        ValueError: no container of tensors is found, or the weights mix tensors with other values.
    """
    rep = as_reporter(log)
    path = []
    for _ in range(4):  # containers nest at most a few levels ({"model": {"state_dict": ...}})
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        regular = [k for k in WEIGHT_CONTAINERS if isinstance(obj.get(k), dict)]
        ema = [k for k in EMA_CONTAINERS if isinstance(obj.get(k), dict)]
        if prefer_ema and ema:
            key = ema[0]
        elif regular:
            key = regular[0]
            if ema:
                rep.info(
                    f"{source}: also holds EMA weights under {ema[0]!r}, not used "
                    "(vitkit.weights.read_state_dict(path, prefer_ema=True) reads them)"
                )
        elif ema:
            key = ema[0]
        else:
            non_tensor = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise ValueError(
                f"{source}: cannot find the weights; entries that are not tensors: {non_tensor[:12]} "
                f"(known containers: {', '.join(WEIGHT_CONTAINERS + EMA_CONTAINERS)})"
            )
        path.append(key)
        obj = obj[key]
    else:
        raise ValueError(f"{source}: containers nested too deeply ({' -> '.join(path)})")
    if path:
        rep.info(f"{source}: using the weights under {' -> '.join(repr(p) for p in path)}")
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            rep.info(f"{source}: stripped the {prefix!r} prefix from every key")
    return state


def read_state_dict(
    path: str | os.PathLike, *, log: LogFn | Reporter | None = None, prefer_ema: bool = False
) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt`/`.bin`/`.safetensors` file safely and return its (unwrapped) state dict.

    Args:
        path: checkpoint file.
        log: receives a line for each container used and prefix stripped.
        prefer_ema: take the EMA weights when the checkpoint holds both.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    kind = file_kind(path)
    if kind == "npz":
        raise ValueError(f"{path} is an .npz archive (JAX weights); read it with read_npz")
    obj = read_safetensors(path) if kind == "safetensors" else read_torch(path)
    return unwrap_state_dict(obj, source=str(path), log=log, prefer_ema=prefer_ema)
