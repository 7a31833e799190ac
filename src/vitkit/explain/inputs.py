"""Getting a model and images ready to explain, through the same decoder and eval preprocessing as `predict`.

Everything here is `vitkit.data.inference`: explain adds no image handling of its own, so a file gives the model
the same input (and the same probabilities) in `vitkit explain` as in `vitkit predict` and `vitkit eval`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vitkit.data.images import ImageLike, decode_image
from vitkit.data.inference import load_eval_model, prepare_image, prepare_images
from vitkit.runs import resolve_checkpoint

__all__ = ["ImageLike", "decode_image", "load_checkpoint", "prepare_image", "prepare_images", "resolve_checkpoint"]


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load the model behind a run or model directory (see `resolve_checkpoint`) in eval mode on `device`.

    The model carries its run's decode size (`model.preprocess.load_size`), so `prepare_image` matches `predict`.
    """
    return load_eval_model(path, device)[0]
