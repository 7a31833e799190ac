"""The one eval preprocessing: how `evaluate`, `predict`, `explain`, `visualize` and the explorer turn an image into
the model's input, exactly as the run's own evaluation data was turned into it.

Two steps, both shared with training:

1. `decode_image` (the one decoder), then, for a run trained on image files (folders, CSVs) or with an explicit
   `load_size`, the run's decode-size step `resize_center_crop(image, load_size)`: what `load_data` did to every
   train/val/test image of that run. The size is saved with the weights as `model.preprocess.load_size` (older
   checkpoints: `load_eval_model` derives it from the training record with `eval_load_size`); None means no
   decode-size step, as for a model built in a notebook.
2. `EvalTransform` built from `model.preprocess` (`eval_transform`): resize to input size / crop fraction, centre
   crop, normalise. `evaluate` applies the same module to whole batches of the decoded split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.data.images import ImageLike, decode_image, resize_center_crop
from vitkit.data.load import DEFAULT_FILE_LOAD_SIZE, _parse_spec
from vitkit.data.transforms import EvalTransform
from vitkit.runs import resolve_checkpoint, training_record


def eval_load_size(record: dict[str, Any]) -> int | None:
    """The decode size a run's images went through, from its training record.

    Args:
        record: A checkpoint's `training` record (`vitkit.runs.training_record`); {} for a model without one.

    Returns:
        The recorded `load_size`; else the file-data default (224) when the run trained on a folder or CSV; else
        None (in-memory sources such as digits or CIFAR keep their native size).
    """
    if record.get("load_size"):
        return int(record["load_size"])
    data = str(record.get("data") or "")
    if not data:
        return None
    try:
        kind, _ = _parse_spec(data)
    except ValueError:  # the data moved or is gone: fall back on the spec's form alone
        kind = "csv" if data.lower().endswith(".csv") or data.startswith("csv:") else data.partition(":")[0]
    return DEFAULT_FILE_LOAD_SIZE if kind in ("folder", "csv") else None


def load_eval_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load the model behind a run or model directory for inference, with its decode size attached.

    Args:
        checkpoint: A run directory (its best/, else last/), a model directory or a foreign checkpoint file.
        device: Where to put the model.

    Returns:
        (model in eval mode on `device` with `model.preprocess.load_size` set, its training record or {}).
    """
    from vitkit.weights import load_model

    directory = resolve_checkpoint(checkpoint)
    model = load_model(str(directory))
    record = training_record(directory) if directory.is_dir() else {}
    if model.preprocess.load_size is None:  # checkpoints written before load_size was saved in preprocess
        model.preprocess.load_size = eval_load_size(record)
    return model.to(device).eval(), record


def eval_transform(model: nn.Module) -> EvalTransform:
    """The `EvalTransform` of `model.preprocess` (resize, centre crop, normalise), on the model's device."""
    pre = model.preprocess
    tf = EvalTransform(pre.input_size, pre.mean, pre.std, pre.crop_fraction, pre.interpolation)
    return tf.to(_device(model))


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def decode_for_model(image: ImageLike, model: nn.Module) -> Tensor:
    """Step 1 for one image: decode, then the run's decode-size step; uint8 (3, H, W) on the CPU."""
    array = decode_image(image)
    size = model.preprocess.load_size
    if size is not None:
        array = resize_center_crop(array, int(size))
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def prepare_image(image: ImageLike, model: nn.Module) -> tuple[np.ndarray, Tensor]:
    """One image as the model sees it in evaluation.

    Args:
        image: Anything `decode_image` takes (path, PIL image, array, tensor).
        model: A vitkit model; its `preprocess` (including `load_size`) decides the steps.

    Returns:
        (the uint8 (h, w, 3) crop the model sees, for display; the normalised float (1, 3, h, w) input on the
        model's device), where (h, w) is `model.preprocess.input_size`.
    """
    tf = eval_transform(model)
    unit = tf.resize_crop(decode_for_model(image, model)[None].to(_device(model)))  # (1, 3, h, w) on 0..1
    crop = (unit[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return crop, tf.normalize(unit)


def prepare_images(images: Sequence[ImageLike], model: nn.Module) -> tuple[list[np.ndarray], Tensor]:
    """`prepare_image` for several images: (the crops, the inputs stacked as (B, 3, h, w))."""
    if not images:
        raise ValueError("no images given")
    crops, xs = zip(*(prepare_image(im, model) for im in images), strict=True)
    return list(crops), torch.cat(xs)
