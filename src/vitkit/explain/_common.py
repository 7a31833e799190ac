"""Helpers every explanation method shares: targets, input checks, eval mode, upsampling."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Target = int | Sequence[int] | Tensor | None


class UnsupportedModelError(TypeError, ValueError):
    """A method that the model's family cannot support (e.g. attention maps of a CNN), naming both.

    Both a ValueError (the model is a bad value for this method) and a TypeError (what attention methods raised
    before the family checks), so callers catching either keep working.
    """


def family_reason(model: nn.Module) -> str:
    """ " (family f: <why it has no global attention>)" for a registered model, else "" (a hand-built module)."""
    family = getattr(model, "family", None)
    if family is None:
        return ""
    why = {
        "swin": "windowed attention inside each stage, and patch merging between stages",
        "convnext": "a CNN: convolutions, no attention",
        "resnet": "a CNN: convolutions, no attention",
    }.get(family, "no layer computes an N x N attention map over all tokens")
    return f" (family {family}: {why})"


def attn_layer_reason(model: nn.Module) -> str:
    """ " (attn_layer='x' has no N x N map ...)" when the model's attention variant declines capture, else "".

    A variant of the attention zoo (local, axial, linear ...) sets `global_attention = False` when it never forms
    a map over all tokens; the methods that read such maps then name the variant rather than the family.
    """
    declined = [m for m in model.modules() if hasattr(m, "capture") and not getattr(m, "global_attention", False)]
    name = getattr(getattr(model, "cfg", None), "attn_layer", None)
    if not declined or name is None:
        return ""
    return f" (attn_layer={name!r} has no N x N map over all tokens; use method='gradcam')"


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a normalised float batch (B, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a normalised float tensor, got dtype {images.dtype} (normalise uint8 first)")


def resolve_targets(target: Target, logits: Tensor) -> Tensor:
    """Class index per image: argmax of `logits` when `target` is None, else `target` broadcast to the batch."""
    B, C = logits.shape
    if target is None:
        return logits.argmax(dim=-1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"got {t.numel()} targets for a batch of {B} images (give one, or one per image)")
    bad = t[(t < 0) | (t >= C)]
    if bad.numel():
        raise ValueError(f"target class {int(bad[0])} is out of range for a model with {C} classes (use 0..{C - 1})")
    return t


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode (no dropout, no drop path) and restore its previous mode afterwards.

    Explanations of a model in training mode would change from call to call with the dropout masks.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _upsample(maps: Tensor, upsample_to: tuple[int, int] | None) -> Tensor:
    if upsample_to is None:
        return maps
    size = (int(upsample_to[0]), int(upsample_to[1]))
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
