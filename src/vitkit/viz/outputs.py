"""The files behind `vitkit explain` and `vitkit visualize`: overlays per image, and one figure per kind."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit._validate import check_choice
from vitkit.data.images import ImageLike
from vitkit.data.inference import prepare_image, prepare_images
from vitkit.explain.maps import METHODS, explain, mean_attention_distance
from vitkit.models.base import token_patch_size
from vitkit.runs import training_settings
from vitkit.viz.attention import (
    plot_attention_distance,
    plot_attention_grid,
    plot_attention_overlay,
    uniform_attention_distance,
)
from vitkit.viz.patches import plot_patch_embedding_filters, plot_patch_grid, plot_position_embedding_similarity
from vitkit.viz.predictions import plot_augmentations
from vitkit.viz.receptive_field import compare_receptive_fields

VISUALIZATIONS = (
    "patches",
    "filters",
    "pos-embed",
    "augment",
    "attention-distance",
    "attention-grid",
    "receptive-fields",
)
NEEDS_IMAGE = ("patches", "augment", "attention-grid")
TARGET_METHODS = ("grad-rollout", "relevance", "gradcam")  # the methods whose map depends on the class explained


def parse_target(target: str | int | None, class_names: Sequence[str] | None, num_classes: int) -> int | None:
    """A class given by index or by name -> its index (None stays None)."""
    if target is None or isinstance(target, int):
        return target
    if class_names is not None and target in class_names:
        return list(class_names).index(target)
    if target.lstrip("-").isdigit():
        return int(target)
    known = (
        f"; classes are {', '.join(class_names[:20])}" + (" ..." if len(class_names) > 20 else "")
        if class_names
        else ""
    )
    raise ValueError(f"target {target!r} is neither a class index (0..{num_classes - 1}) nor a class name{known}")


def _stem(image: ImageLike, i: int) -> str:
    return Path(image).stem if isinstance(image, (str, os.PathLike)) else f"image{i}"


def save_explanations(
    model: nn.Module,
    images: Sequence[ImageLike],
    out_dir: str | os.PathLike,
    method: str = "rollout",
    layer: int | None = None,
    head: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target: int | None = None,
) -> list[tuple[Path, str]]:
    """Write `<image stem>_<method>.png` overlays into `out_dir`; returns (path, one-line description) per image.

    Images are preprocessed with the model's settings and explained in one batch.

    Raises:
        ValueError: An unknown method, no images, or a `target` for a method that does not depend on a class
            (attention, rollout): only grad-rollout, relevance and gradcam explain a chosen class.
    """
    check_choice("method", method, METHODS)
    if target is not None and method not in TARGET_METHODS:
        raise ValueError(
            f"target={target} has no effect on method={method!r}, which shows the same map whatever the class; "
            f"the methods that explain a chosen class are {', '.join(TARGET_METHODS)}"
        )
    if not images:
        raise ValueError("no images to explain")
    crops, x = prepare_images(images, model)
    maps = explain(
        model, x, method=method, layer=layer, head=head, head_fusion=head_fusion, discard_ratio=discard_ratio,
        target=target, upsample=False,
    )  # fmt: skip
    with torch.no_grad():
        probs = model(x).softmax(dim=-1)
    names = model.preprocess.class_names
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (image, crop) in enumerate(zip(images, crops, strict=True)):
        pred = int(probs[i].argmax())
        label = names[pred] if names else f"class {pred}"
        explained = pred if target is None else int(target)
        what = (
            method
            if method != "attention"
            else f"attention layer {-1 if layer is None else layer} head {'mean' if head is None else head}"
        )
        title = f"{what}; predicted {label} ({float(probs[i, pred]):.1%})"
        if method in TARGET_METHODS:
            title += f"; explaining {names[explained] if names else f'class {explained}'}"
        path = out_dir / f"{_stem(image, i)}_{method}.png"
        plot_attention_overlay(crop, maps[i], title=title, save_path=path)
        written.append((path, f"{path}: {title}"))
    return written


def train_transform_for(model: nn.Module, settings: dict[str, Any] | None = None) -> nn.Module:
    """The `TrainTransform` a run used: the model's preprocessing plus the recipe's augmentation settings."""
    from vitkit.data.transforms import TrainTransform

    pre = model.preprocess
    keys = ("scale", "ratio", "hflip", "color_jitter", "auto_augment", "randaug_n", "randaug_m", "random_erasing")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (settings or {}).items() if k in keys}
    return TrainTransform(pre.input_size, pre.mean, pre.std, interpolation=pre.interpolation, **kwargs)


def save_visualization(
    kind: str,
    model: nn.Module | None,
    out_dir: str | os.PathLike,
    image: ImageLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    images_for_distance: Sequence[ImageLike] | None = None,
) -> Path:
    """Write one figure of `kind` (see VISUALIZATIONS) to `out_dir/<kind>.png` and return its path.

    Args:
        kind: "patches", "filters", "pos-embed", "augment", "attention-distance", "attention-grid" or
            "receptive-fields".
        model: the model to draw (None only for "receptive-fields", which then measures a random ViT).
        out_dir: output folder.
        image: the image for "patches", "augment" and "attention-grid" (and for "attention-distance" when
            `images_for_distance` is not given).
        checkpoint: the model's directory, to read the training recipe for "augment".
        images_for_distance: images to average the attention distance over; random noise when none are given.
    """
    check_choice("kind", kind, VISUALIZATIONS)
    if model is None and kind != "receptive-fields":
        raise ValueError(f"visualize {kind} needs a model")
    if kind in NEEDS_IMAGE and image is None:
        raise ValueError(f"visualize {kind} needs an IMAGE")
    path = Path(out_dir) / f"{kind}.png"
    if kind == "patches":
        crop, _ = prepare_image(image, model)
        plot_patch_grid(crop, token_patch_size(model), save_path=path)
    elif kind == "filters":
        plot_patch_embedding_filters(model, save_path=path)
    elif kind == "pos-embed":
        plot_position_embedding_similarity(model, save_path=path)
    elif kind == "augment":
        settings = training_settings(checkpoint) if checkpoint is not None else {}
        crop, _ = prepare_image(image, model)
        plot_augmentations(crop, train_transform_for(model, settings), save_path=path)
    elif kind == "attention-grid":
        plot_attention_grid(model, image, save_path=path)
    elif kind == "attention-distance":
        sources = list(images_for_distance or ([image] if image is not None else []))
        if sources:
            x = prepare_images(sources, model)[1]
            what = f"{len(sources)} image(s)"
        else:
            H, W = model.preprocess.input_size
            x = torch.randn(8, 3, H, W, generator=torch.Generator().manual_seed(0))
            x = x.to(next(model.parameters()).device)
            what = "8 noise images"
        d = mean_attention_distance(model, x)
        grid = tuple(model.patch_grid(*x.shape[-2:]))
        ref = uniform_attention_distance(grid, token_patch_size(model))
        plot_attention_distance(d, reference=ref, title=f"mean attention distance over {what}", save_path=path)
    else:
        # With a model, measure it at the depths it has (1, 2, 4, 8 ... up to its depth).
        depths = [1, 2, 4, 8] if model is None else sorted({d for d in (1, 2, 4, 8) if d <= len(model.feature_info)})
        compare_receptive_fields(depths=depths, model=model, save_path=path)
    return path
