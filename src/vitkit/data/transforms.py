"""Batch transforms that turn uint8 image batches into normalised model inputs, on whatever device the batch is on.

Both transforms take uint8 (B, 3, H, W) (or float already on the 0..1 scale) and return float (B, 3, h, w)
normalised with the given mean/std. Randomness comes from the global torch RNG, so `torch.manual_seed` makes a
run repeatable.

Training follows the DeiT/timm recipe: random resized crop, horizontal flip, optional colour jitter,
RandAugment or TrivialAugment, normalisation, random erasing. The crop is implemented here rather than with
kornia's RandomResizedCrop because kornia resizes without antialiasing, which aliases badly whenever a crop is
shrunk (e.g. 224-pixel images trained at 32); flips, jitter, the augment policies and erasing are kornia's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.augmentation.auto import RandAugment, TrivialAugment
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.models.base import Interpolation

AutoAugmentPolicy = Literal["none", "randaugment", "trivialaugment"]
# kornia's RandAugment/TrivialAugment draw one sequence of operations per call; applying them to groups of this
# many images gives each group its own draw, close to the per-image choice of the original papers.
_POLICY_GROUP = 8
_RANDAUG_OPS = 15  # operations in kornia's default RandAugment policy


def _size_pair(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        pair = (img_size, img_size)
    elif isinstance(img_size, Sequence) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        pair = (int(img_size[0]), int(img_size[1]))
    else:
        raise TypeError(f"img_size must be an int or an (H, W) pair of ints, got {img_size!r}")
    if min(pair) <= 0:
        raise ValueError(f"img_size must be positive, got {img_size!r}")
    return pair


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_range(name: str, value: Any, upper: float | None = None) -> tuple[float, float]:
    """`value` as a (low, high) float pair with 0 < low <= high (<= `upper`), else a ValueError naming `name` and
    the value (also for a value that is not a list or tuple of numbers, e.g. a scalar from a recipe)."""
    limit = f" <= {upper}" if upper is not None else ""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high{limit}, got {value!r}")
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (upper is not None and pair[1] > upper):
        raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high{limit}, got {pair}")
    return pair


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics as buffers so they follow the module's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got mean={tuple(mean)} std={tuple(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 on 0..1; a floating batch is taken to be on 0..1 already."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected an image batch (B, 3, H, W), got {shape}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.is_floating_point():
        return x.float()
    raise TypeError(f"image batch must be uint8 or floating point, got {x.dtype}")


def _resize(x: Tensor, size: tuple[int, int], interpolation: str) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    out = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out  # bicubic overshoots at edges


def sample_crop_boxes(
    batch: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], attempts: int = 10
) -> Tensor:
    """Random-resized-crop boxes (batch, 4) as (top, left, h, w), torchvision's algorithm vectorised.

    Each box covers a uniform share in `scale` of the image area with a log-uniform aspect ratio in `ratio`; after
    `attempts` misses (the box did not fit) it falls back to the largest central crop within `ratio`.
    """
    area = height * width
    target = torch.empty(batch, attempts).uniform_(scale[0], scale[1]) * area
    aspect = torch.exp(torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first attempt that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    if width / height < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w)).long()
    h = torch.where(found, h, torch.full_like(h, fallback_h)).long()
    top = (torch.rand(batch) * (height - h + 1)).floor().long().clamp_max(height - h)
    left = (torch.rand(batch) * (width - w + 1)).floor().long().clamp_max(width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


class TrainTransform(nn.Module):
    """Training augmentation for uint8 batches: crop, flip, colour, policy, normalise, erase.

    Args:
        img_size: Output side, or (H, W).
        mean: Per-channel mean used to normalise (0..1 scale).
        std: Per-channel std used to normalise.
        scale: Range of the crop's share of the image area.
        ratio: Range of the crop's aspect ratio (width / height).
        hflip: Probability of a horizontal flip.
        color_jitter: Strength of brightness, contrast and saturation jitter (0 = off).
        auto_augment: "randaugment", "trivialaugment" or "none".
        randaug_n: Number of RandAugment operations per image.
        randaug_m: RandAugment magnitude on timm's 0-10 scale (so 9 is timm's "rand-m9"); kornia's scale is 0-30.
        random_erasing: Probability of erasing a random rectangle (filled with the mean, i.e. 0 after normalising).
        interpolation: Resize filter for the crop: "bicubic", "bilinear" or "nearest".
    """

    def __init__(
        self,
        img_size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        auto_augment: AutoAugmentPolicy = "none",
        randaug_n: int = 2,
        randaug_m: int = 9,
        random_erasing: float = 0.0,
        interpolation: Interpolation = "bicubic",
    ) -> None:
        super().__init__()
        self.img_size = _size_pair(img_size)
        self.scale = check_range("scale", scale, upper=1.0)
        self.ratio = check_range("ratio", ratio)
        _check_unit("hflip", hflip)
        _check_unit("random_erasing", random_erasing)
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        check_choice("auto_augment", auto_augment, AutoAugmentPolicy)
        check_choice("interpolation", interpolation, Interpolation)
        self.interpolation = interpolation
        self.flip = K.RandomHorizontalFlip(p=hflip) if hflip > 0 else nn.Identity()
        self.jitter = (
            K.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, p=1.0)
            if color_jitter > 0
            else nn.Identity()
        )
        if auto_augment == "randaugment":
            if not 1 <= randaug_n <= _RANDAUG_OPS:
                raise ValueError(f"randaug_n must be in 1..{_RANDAUG_OPS}, got {randaug_n}")
            if not 0 < randaug_m <= 10:
                raise ValueError(f"randaug_m must be in (0, 10] (timm's magnitude scale), got {randaug_m}")
            self.policy = RandAugment(n=randaug_n, m=min(3 * randaug_m, 29.99))  # kornia wants m < 30
        elif auto_augment == "trivialaugment":
            self.policy = TrivialAugment()
        else:
            self.policy = None
        self.normalize = Normalize(mean, std)
        self.erase = K.RandomErasing(p=random_erasing, value=0.0) if random_erasing > 0 else nn.Identity()

    def random_resized_crop(self, x: Tensor) -> Tensor:
        """Crop a random box per image and resize it (antialiased) to img_size."""
        boxes = sample_crop_boxes(len(x), x.shape[2], x.shape[3], self.scale, self.ratio).tolist()
        out = x.new_empty((len(x), 3, *self.img_size))
        for i, (top, left, h, w) in enumerate(boxes):
            out[i] = _resize(x[i : i + 1, :, top : top + h, left : left + w], self.img_size, self.interpolation)[0]
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = to_unit_float(x)
        x = self.random_resized_crop(x)
        x = self.flip(x)
        x = self.jitter(x)
        if self.policy is not None:
            x = torch.cat([self.policy(group) for group in x.split(_POLICY_GROUP)]).clamp_(0.0, 1.0)
        return self.erase(self.normalize(x))


class EvalTransform(nn.Module):
    """Deterministic evaluation preprocessing: resize to img_size / crop_fraction, centre crop, normalise.

    A square `img_size` resizes the shorter side (aspect kept), as torchvision's Resize(int) does; an (H, W)
    pair resizes to exactly (H, W) / crop_fraction. Inputs smaller than that are upsampled (digits: 8 -> 36 -> 32).

    Args:
        img_size: Output side, or (H, W).
        mean: Per-channel mean used to normalise (0..1 scale).
        std: Per-channel std used to normalise.
        crop_fraction: Share of the resized image the centre crop keeps, in (0, 1].
        interpolation: Resize filter: "bicubic", "bilinear" or "nearest" (antialiased except nearest).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        crop_fraction: float = 0.875,
        interpolation: Interpolation = "bicubic",
    ) -> None:
        super().__init__()
        self.img_size = _size_pair(img_size)
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        check_choice("interpolation", interpolation, Interpolation)
        self.crop_fraction = crop_fraction
        self.interpolation = interpolation
        # The same rounding as timm: floor(224 / 0.875) == 256.
        self.scale_size = tuple(math.floor(s / crop_fraction) for s in self.img_size)
        self.normalize = Normalize(mean, std)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) an input of the given size is resized to before the centre crop."""
        if self.img_size[0] != self.img_size[1]:
            return self.scale_size
        short = self.scale_size[0]
        if height <= width:
            return short, max(short, int(short * width / height))
        return max(short, int(short * height / width)), short

    def resize_crop(self, x: Tensor) -> Tensor:
        """The resize and centre crop alone: uint8 or 0..1 float (B, 3, H, W) -> float (B, 3, h, w) on 0..1."""
        x = to_unit_float(x)
        new_h, new_w = self.resized_shape(x.shape[2], x.shape[3])
        x = _resize(x, (new_h, new_w), self.interpolation)
        crop_h, crop_w = self.img_size
        top, left = int(round((new_h - crop_h) / 2)), int(round((new_w - crop_w) / 2))
        return x[:, :, top : top + crop_h, left : left + crop_w]

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(self.resize_crop(x))
