"""Compare saliency methods on images with known object masks: pointing game, energy share, deletion, insertion."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitkit._io import atomic_write_text
from vitkit._validate import check_choice
from vitkit.data.transforms import Normalize, to_unit_float
from vitkit.explain.inputs import load_checkpoint
from vitkit.explain.maps import METHODS, eval_mode, explain
from vitkit.explain.metrics import (
    deletion_auc,
    energy_in_mask,
    insertion_auc,
    pointing_game,
    random_maps,
)
from vitkit.models.base import token_patch_size
from vitkit.runs import resolve_checkpoint, training_settings

EVAL_METHODS: tuple[str, ...] = (*METHODS, "random")

COLUMNS = (  # key, header, format
    ("pointing", "pointing game (strict)", "{:.1%}"),
    ("pointing_half_patch", "pointing game (±½ patch)", "{:.1%}"),
    ("pointing_patch", "pointing game (±1 patch)", "{:.1%}"),
    ("energy", "energy in mask", "{:.3f}"),
    ("deletion_auc", "deletion AUC ↓", "{:.3f}"),
    ("insertion_auc", "insertion AUC ↑", "{:.3f}"),
    ("ms_per_image", "map ms/img", "{:.1f}"),
)


def evaluate_explanations(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    labels: Tensor | None = None,
    methods: Sequence[str] = EVAL_METHODS,
    batch_size: int = 32,
    max_steps: int = 64,
    seed: int = 0,
    method_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score each saliency method on a set of normalised images with object masks.

    Args:
        model: the classifier to explain.
        images: normalised float images (N, C, H, W).
        masks: bool object masks (N, H, W).
        labels: true classes (N,); they are the target of the gradient methods and of the deletion/insertion
            curves. None = the model's predictions.
        methods: any of "attention", "rollout", "grad-rollout", "relevance", "random".
        batch_size: images per explain/metric batch.
        max_steps: deletion/insertion steps (patches per step = ceil(patches / max_steps)).
        seed: seeds the random-map baseline.
        method_kwargs: extra arguments for `explain` (layer, head, head_fusion, discard_ratio).
        log: called with a progress line per method.

    Returns:
        {"methods": {method: {metric: mean}}, "accuracy": float | None, "count": N, "patch_size": p, ...}.
        Pointing-game tolerance: "pointing" is strict (the maximum pixel on the mask); "pointing_half_patch" and
        "pointing_patch" first dilate the mask by half a patch side and by one patch side (in pixels).
    """
    for m in methods:
        check_choice("method", m, EVAL_METHODS)
    if len(images) != len(masks) or (labels is not None and len(labels) != len(images)):
        n_labels = "no" if labels is None else len(labels)
        raise ValueError(f"{len(images)} images, {len(masks)} masks and {n_labels} labels must match in number")
    device = next(model.parameters()).device
    kwargs = dict(method_kwargs or {})
    patch = token_patch_size(model)
    grid = tuple(model.patch_grid(images.shape[-2], images.shape[-1]))
    gen = torch.Generator().manual_seed(seed)

    # Accuracy and the targets, once.
    preds = []
    with eval_mode(model), torch.no_grad():
        for x in images.split(batch_size):
            preds.append(model(x.to(device)).argmax(dim=-1).cpu())
    preds = torch.cat(preds)
    targets = labels.cpu().long() if labels is not None else preds
    accuracy = float((preds == labels.cpu()).float().mean()) if labels is not None else None

    results: dict[str, dict[str, float]] = {}
    for method in methods:
        sums = {key: 0.0 for key, _, _ in COLUMNS}
        map_seconds = 0.0
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            m = masks[start : start + batch_size].to(device)
            t = targets[start : start + batch_size].to(device)
            t0 = time.perf_counter()
            if method == "random":
                sal = random_maps(len(x), grid, generator=gen).to(device)
            else:
                sal = explain(model, x, method=method, target=t, upsample=False, **kwargs)
            map_seconds += time.perf_counter() - t0
            sums["pointing"] += float(pointing_game(sal, m).sum())
            sums["pointing_half_patch"] += float(pointing_game(sal, m, tolerance=patch // 2).sum())
            sums["pointing_patch"] += float(pointing_game(sal, m, tolerance=patch).sum())
            sums["energy"] += float(energy_in_mask(sal, m).sum())
            sums["deletion_auc"] += float(deletion_auc(model, x, sal, target=t, max_steps=max_steps).sum())
            sums["insertion_auc"] += float(insertion_auc(model, x, sal, target=t, max_steps=max_steps).sum())
        n = len(images)
        row = {key: value / n for key, value in sums.items()}
        row["ms_per_image"] = 1000 * map_seconds / n
        results[method] = row
        if log is not None:
            log(f"{method}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
    return {
        "methods": results,
        "accuracy": accuracy,
        "count": len(images),
        "patch_size": patch,
        "grid": list(grid),
        "max_steps": max_steps,
        "method_kwargs": kwargs,
        "targets": "labels" if labels is not None else "predictions",
    }


def format_table(results: dict[str, Any]) -> str:
    """The methods x metrics comparison as a markdown table."""
    header = "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [header, rule]
    for method, row in results["methods"].items():
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str = "shapes",
    count: int = 200,
    methods: Sequence[str] = EVAL_METHODS,
    batch_size: int = 32,
    max_steps: int = 64,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    method_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`evaluate_explanations` on the held-out test split of a run's `shapes` data (the only source with masks).

    The data spec, seed and image size come from the run's recipe when it saved one (so the test split is the
    one the model never trained on); otherwise "shapes" at the model's input size with `seed` (default 0).
    Images are used at their generated size, normalised with the model's mean and std and not cropped, so the
    masks stay aligned.

    Args:
        checkpoint: a training run (RUN/best, else RUN/last) or a model directory.
        data: "shapes" (the run's own shapes spec when it has one) or "shapes:N". Another spec or seed than the
            run's can put training images into the test split.
        count: test images to evaluate (at most the size of the test split).
        methods, batch_size, max_steps, method_kwargs, log: see `evaluate_explanations`.
        seed: data seed; None = the run's seed (or 0).
        device: where to run the model.
    """
    from vitkit.data import load_data

    if not str(data).startswith("shapes"):
        raise ValueError(f"explain-eval needs object masks, which only the shapes data has; got data {data!r}")
    model = load_checkpoint(checkpoint, device=device)
    settings = training_settings(resolve_checkpoint(checkpoint))
    from_run = str(settings.get("data", "")).startswith("shapes") and data == "shapes"
    spec = settings["data"] if from_run else data
    seed = int(settings.get("seed", 0)) if seed is None else int(seed)
    size = int(settings.get("shapes_size") or model.preprocess.input_size[0])
    # Rebuild exactly the run's split (same spec, seed, size and fractions) so the test images are held out.
    fractions = {k: settings[k] for k in ("val_fraction", "test_fraction") if k in settings}
    splits = load_data(spec, seed=seed, shapes_size=size, **fractions)
    test = splits.test
    n = min(count, len(test))
    images = Normalize(model.preprocess.mean, model.preprocess.std)(to_unit_float(test.images[:n]))
    results = evaluate_explanations(
        model, images, test.masks[:n], test.labels[:n], methods=methods, batch_size=batch_size,
        max_steps=max_steps, seed=seed, method_kwargs=method_kwargs, log=log,
    )  # fmt: skip
    results.update(checkpoint=str(resolve_checkpoint(checkpoint)), data=spec, data_seed=seed, image_size=size)
    return results


def save_results(results: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `results.json` and the markdown table `results.md` into `out_dir`; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    acc = results.get("accuracy")
    head = (
        f"{results['count']} test images, patch grid {results['grid'][0]}x{results['grid'][1]}, "
        f"targets = {results['targets']}" + (f", model accuracy {acc:.1%}" if acc is not None else "")
    )
    atomic_write_text(out / "results.md", head + "\n\n" + format_table(results) + "\n")
    return out / "results.json", out / "results.md"
