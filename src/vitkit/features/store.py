"""Feature files: FEATS.safetensors (the tensors) + FEATS.json (where each row came from, and which model made it).

FEATS.safetensors holds `features` float32 (N, D) and, when the images have labels, `labels` int64 (N,).
FEATS.json holds:

    format: "vitkit-features", format_version: 1
    count, dim, normalised          N, D, and whether rows have unit L2 norm (true for `vitkit embed`)
    model                          {checkpoint, name, family, num_features}: `vitkit search` reuses the checkpoint
    preprocessing                  the model's preprocess (mean, std, input size, crop, interpolation, load size)
    source                         {kind: folder|csv|list|files|dataset, ...}; a dataset: spec, split, seed
    paths                          the absolute image file of each row, or null (dataset images have no file)
    indices                        the row's index in its dataset split when paths is null, else null
    labels, class_names            the class index of each row and the class names, or null
    safetensors_sha256             ties the JSON to its tensor file (a stale pair is refused on load)

Each file is written atomically; the tensors first, then the JSON, which names the tensor file's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vitkit._io import atomic_path, atomic_write_text
from vitkit.features.extract import FeatureSet

FORMAT = "vitkit-features"
SUFFIXES = (".safetensors", ".json")


def feature_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(FEATS.safetensors, FEATS.json) for FEATS given with or without one of those suffixes."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.suffix in SUFFIXES:
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_features(features: FeatureSet, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write FEATS.safetensors and FEATS.json (see the module docstring), each atomically.

    Args:
        features: what `extract_features` returned.
        path: FEATS, with or without the .safetensors/.json suffix; folders are created.

    Returns:
        (the .safetensors path, the .json path).
    """
    st_path, json_path = feature_paths(path)
    tensors = {"features": features.features.detach().float().cpu().contiguous()}
    if features.labels is not None:
        tensors["labels"] = features.labels.detach().long().cpu().contiguous()
    with atomic_path(st_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "count": len(features),
        "dim": features.dim,
        "normalised": features.normalised,
        "model": features.model,
        "preprocessing": features.preprocess,
        "source": features.source,
        # Absolute: a path relative to the directory `vitkit embed` ran in would name another file, or none, when
        # `vitkit search` runs from elsewhere.
        "paths": None if features.paths is None else [os.path.abspath(p) for p in features.paths],
        "indices": features.indices,
        "labels": None if features.labels is None else [int(v) for v in features.labels],
        "class_names": features.class_names,
        "safetensors": st_path.name,
        "safetensors_sha256": _sha256(st_path),
    }
    atomic_write_text(json_path, json.dumps(record, indent=1) + "\n")
    return st_path, json_path


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read a feature index written by `save_features` / `vitkit embed`.

    Args:
        path: FEATS, FEATS.safetensors or FEATS.json.

    Raises:
        FileNotFoundError: either file is missing (both are named).
        ValueError: the JSON is not a vitkit feature record, or it does not match its tensor file.
    """
    st_path, json_path = feature_paths(path)
    missing = [str(p) for p in (st_path, json_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"feature index {str(path)!r}: missing {' and '.join(missing)} (write one with `vitkit embed DATA "
            "--checkpoint RUN --out FEATS`)"
        )
    try:
        record = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{json_path} is not a vitkit feature record (format={got!r}, expected {FORMAT!r})")
    digest = record.get("safetensors_sha256")
    if digest is not None and digest != _sha256(st_path):
        raise ValueError(
            f"{st_path} does not match {json_path} (its hash differs): the pair was not written together; embed again"
        )
    tensors = load_file(str(st_path))
    feats = tensors["features"]
    if tuple(feats.shape) != (record["count"], record["dim"]):
        raise ValueError(f"{st_path} holds features {tuple(feats.shape)}, but {json_path} says {record['count']} x "
                         f"{record['dim']}")  # fmt: skip
    labels = tensors.get("labels")
    return FeatureSet(
        features=feats,
        labels=labels,
        class_names=record.get("class_names"),
        paths=record.get("paths"),
        indices=record.get("indices"),
        normalised=bool(record.get("normalised")),
        source=record.get("source") or {},
        model=record.get("model") or {},
        preprocess=record.get("preprocessing") or {},
    )


def embed(
    data: str | os.PathLike | list[str | os.PathLike],
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    split: str | None = None,
    seed: int | None = None,
    device: str | torch.device | None = "auto",
) -> tuple[FeatureSet, Path, Path]:
    """Embed images with a checkpoint and write OUT.safetensors + OUT.json (what `vitkit embed` runs).

    Args:
        data: what `extract_features` takes as a string or list: a folder, a file list, a CSV, image files, or a
            dataset spec such as "digits" (then `split` and `seed` choose the images).
        checkpoint: a run directory (best/, else last/), a model directory or a checkpoint file.
        out: FEATS, with or without a suffix.
        batch_size: images per forward pass.
        split: for a dataset spec: "train" (None), "val", "test" or "all"; refused with other data.
        seed: for a dataset spec: the split seed (None = the run's seed when the checkpoint's run trained on this
            spec, with its val/test fractions; else 0); refused with other data.
        device: where the model runs ("auto" = cuda when available).

    Returns:
        (the features, the .safetensors path, the .json path).
    """
    from vitkit.data.inference import load_eval_model
    from vitkit.features.extract import extract_features, run_split_settings
    from vitkit.train.distributed import resolve_device

    model, record = load_eval_model(checkpoint, resolve_device(device))
    # A dataset spec the model was trained on is split as its run split it (seed and fractions), so that "test"
    # means the run's held-out images.
    run = run_split_settings(record, os.fspath(data)) if isinstance(data, (str, os.PathLike)) else {}
    seed = seed if seed is not None else run.pop("seed", None)
    run.pop("seed", None)
    feats = extract_features(
        model, data, batch_size, split=split, seed=seed, checkpoint=checkpoint, split_settings=run or None
    )
    st_path, json_path = save_features(feats, out)
    return feats, st_path, json_path
