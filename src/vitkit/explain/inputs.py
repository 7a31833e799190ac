"""Getting a model and images ready to explain: checkpoint paths, image loading and the model's preprocessing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from vitkit.runs import resolve_checkpoint

ImageLike = Any  # a path, a PIL image, a uint8 (H, W, 3) array, or a (3, H, W) tensor (uint8, or float in [0, 1])

_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load the model behind a run or model directory (see `resolve_checkpoint`) in eval mode on `device`."""
    from vitkit.weights import load_model

    model = load_model(str(resolve_checkpoint(path)))
    return model.to(device).eval()


def load_image(image: ImageLike) -> Image.Image:
    """Any supported image input -> an RGB PIL image (files are turned upright by their EXIF orientation)."""
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {str(image)!r} does not exist")
        with Image.open(image) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, H, W), got shape {tuple(t.shape)}")
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise TypeError(f"an image tensor must be uint8 or float in [0, 1], got {t.dtype}")
        image = t.expand(3, -1, -1).permute(1, 2, 0).numpy()  # (H, W, 3)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating):
                raise TypeError(f"an image array must be uint8 or float in [0, 1], got {image.dtype}")
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    raise TypeError(
        f"cannot read an image from {type(image).__name__}; give a path, a PIL image, a uint8 (H, W, 3) array "
        "or a (3, H, W) tensor"
    )


def resize_center_crop(
    img: Image.Image, size: tuple[int, int], crop_fraction: float, interpolation: str
) -> Image.Image:
    """Eval-time resize: scale so the crop covers `crop_fraction` of the short side, then centre-crop to `size`."""
    th, tw = size
    scale = max(th / img.height, tw / img.width) / crop_fraction
    w, h = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    img = img.resize((w, h), _PIL_FILTERS[interpolation])
    left, top = (w - tw) // 2, (h - th) // 2
    return img.crop((left, top, left + tw, top + th))


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 batch (B, 3, H, W) -> float batch normalised with per-channel mean and std (given on a 0..1 scale)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def prepare_image(image: ImageLike, model: nn.Module) -> tuple[np.ndarray, Tensor]:
    """An image as the model expects it: (the uint8 (H, W, 3) crop it sees, the normalised (1, 3, H, W) tensor).

    Uses `model.preprocess` (input size, crop fraction, interpolation, mean, std), as saved with the weights.
    """
    pre = model.preprocess
    img = resize_center_crop(load_image(image), tuple(pre.input_size), pre.crop_fraction, pre.interpolation)
    crop = np.array(img, dtype=np.uint8)  # a writable copy
    device = next(model.parameters()).device
    x = normalize(torch.from_numpy(crop).permute(2, 0, 1)[None].to(device), pre.mean, pre.std)
    return crop, x
