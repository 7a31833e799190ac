"""Evaluate and predict with a trained checkpoint, preprocessing exactly as training did.

A checkpoint's config.json carries `preprocess` (mean, std, input size, crop fraction, interpolation, class names)
and a `training` record (data spec, seed, split fractions, decode size), so `evaluate(RUN_DIR)` re-creates the
run's own held-out test split, and `predict` decodes and normalises images the way the evaluation data was.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit._io import atomic_write_text
from vitkit.layers.tome import apply_tome
from vitkit.runs import resolve_checkpoint
from vitkit.threads import ThreadSetting, set_threads
from vitkit.train.metrics import confusion_matrix, topk_correct

Split = Literal["train", "val", "test", "all"]


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`, its config.json's `training` record or {}); see `load_eval_model`."""
    from vitkit.data.inference import load_eval_model

    return load_eval_model(path, device)


def refuse_empty_split(n: int, split: str, spec: str, record: dict[str, Any], splits: Sequence[str]) -> None:
    """Raise a ValueError naming an evaluated split of `n` = 0 images (and the run's fraction for val or test) and
    the splits there are to choose from: a metric of nothing is NaN. Used by every task's eval."""
    if n > 0:
        return
    fraction = f" ({split}_fraction={record.get(f'{split}_fraction', 0.1)})" if split in ("val", "test") else ""
    raise ValueError(
        f"the {split} split of {spec!r} is empty{fraction}; choose another split=... ({', '.join(splits)})"
    )


def _require_classifier(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Refuse a model without class outputs (an MAE pretraining run, a backbone saved with num_classes=0)."""
    if getattr(model, "num_classes", 0) > 0:
        return
    family = getattr(model, "family", None)
    raise ValueError(
        f"{checkpoint} has no classifier (family {family!r}, num_classes 0), so it has no classes to score or predict; "
        f"measure its features with `vitkit eval --knn --checkpoint {checkpoint}` or `vitkit probe --checkpoint "
        f"{checkpoint}`, or fine-tune it with `vitkit train --pretrained {checkpoint} --data DATA`"
    )


def _device(device: str | torch.device | None) -> torch.device:
    from vitkit.train.distributed import resolve_device

    return resolve_device(device)


def _label_map(model_classes: Sequence[str] | None, data_classes: Sequence[str], num_outputs: int) -> Tensor:
    """Data label index -> model output index, matching class names (or indices when the model has none)."""
    if model_classes is None:
        if len(data_classes) > num_outputs:
            raise ValueError(f"the data has {len(data_classes)} classes but the model only {num_outputs} outputs")
        return torch.arange(len(data_classes))
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise ValueError(f"classes {missing} of the data are unknown to the model, which knows {list(model_classes)}")
    return torch.tensor([list(model_classes).index(c) for c in data_classes])


@torch.no_grad()
def evaluate(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    *,
    split: Split = "test",
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    amp: str = "none",
    seed: int | None = None,
    out: str | os.PathLike | None = None,
    threads: ThreadSetting | None = "auto",
    tome: int = 0,
    variant: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 (over 5 classes only) and per-class accuracy, loss and confusion matrix of a checkpoint on a split.

    Args:
        checkpoint: a run directory (uses best/) or a model directory.
        data: a vitkit.data spec; None = the data the checkpoint was trained on.
        split: which split of `data`: train, val, test (the run's held-out split when data and seed match) or all.
        batch_size: images per forward pass.
        device: where to run ('auto' = cuda when available).
        amp: 'none' or 'bf16' autocast.
        seed: the split seed; None = the training seed from the checkpoint (else 0).
        out: a directory for eval.json and confusion.png; None writes nothing.
        threads: CPU intra-op threads: N, "auto" (vitkit.threads decides from the idle CPUs) or None to keep
            torch's current count (the CLI has set it already).
        tome: token merging, tokens merged per block (`model.set_tome`); 0 = off. ViTs with plain attention only.
        variant: evaluate `variant(model)` (e.g. an int8 copy, `vitkit.deploy.evaluate_int8`) instead of the loaded
            model, and compare the two: the result then also holds "agreement" (share of images whose top-1 class
            is the loaded model's) and "top1_reference" (the loaded model's top-1).

    Returns:
        {"top1", "top5", "loss", "n", "per_class": {name: {"acc", "n"}}, "confusion": [[...]], "class_names", ...};
        "top5" is None when the model has 5 classes or fewer (every label is then in the top 5).
    """
    from vitkit.data import load_data
    from vitkit.data.inference import eval_transform
    from vitkit.train.trainer import amp_dtype

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split={split!r} is not allowed; choose one of 'train', 'val', 'test', 'all'")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if threads is not None:
        set_threads(threads)
    dev = _device(device)
    dtype = amp_dtype(amp, dev, warn=False)  # the trainer warns about bf16 on a CPU without it, once per run
    model, record = load_checkpoint(checkpoint, dev)
    _require_classifier(model, checkpoint)
    apply_tome(model, tome)
    spec = data or record.get("data")
    if spec is None:
        raise ValueError(f"{checkpoint} does not record its training data: pass data=...")
    same_data = spec == record.get("data")
    splits = load_data(
        spec,
        seed=seed if seed is not None else record.get("seed", 0),
        val_fraction=record.get("val_fraction", 0.1) if same_data else 0.1,
        test_fraction=record.get("test_fraction", 0.1) if same_data else 0.1,
        # The decode size saved with the model (predict and explain use it too), whatever folder is evaluated.
        load_size=model.preprocess.load_size or (record.get("load_size") if same_data else None),
        shapes_size=record.get("shapes_size", 64),
    )
    if split == "all":
        from vitkit.data.dataset import ImageDataset

        parts = [splits.train, splits.val, splits.test]
        if all(p.images is not None for p in parts):
            ds = ImageDataset(
                labels=torch.cat([p.labels for p in parts]),
                class_names=splits.class_names,
                images=torch.cat([p.images for p in parts]),
            )
        else:
            ds = ImageDataset(
                labels=torch.cat([p.labels for p in parts]),
                class_names=splits.class_names,
                paths=sum((p.paths for p in parts), []),
                load_size=splits.train.load_size,
            )
    else:
        ds = getattr(splits, split)
    refuse_empty_split(len(ds), split, spec, record if same_data else {}, ("train", "val", "test", "all"))

    class_names = model.preprocess.class_names
    label_map = _label_map(class_names, splits.class_names, model.num_classes).to(dev)
    names = list(class_names) if class_names is not None else [str(i) for i in range(model.num_classes)]
    tf = eval_transform(model)
    from vitkit.train.loader import BatchLoader

    k = len(names)
    # Top-5 says something only when there are more than 5 classes: with 5 or fewer every label is in the top 5.
    ks = (1, 5) if k > 5 else (1,)
    conf = torch.zeros(k, k, dtype=torch.long)
    loss_sum, hits = 0.0, [0] * len(ks)
    run = model if variant is None else variant(model)
    same = ref_hits = 0
    for x, y in BatchLoader(ds, batch_size):
        x, y = tf(x.to(dev)), label_map[y.to(dev)]
        with torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            logits = run(x)
            ref = model(x).float().argmax(-1) if variant is not None else None
        logits = logits.float()
        if ref is not None:
            same += int((logits.argmax(-1) == ref).sum())
            ref_hits += int((ref == y).sum())
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        hits = [a + b for a, b in zip(hits, topk_correct(logits, y, ks), strict=True)]
        conf += confusion_matrix(logits.argmax(-1).cpu(), y.cpu(), k)
    n = len(ds)
    per_class = {
        names[i]: {"acc": (int(conf[i, i]) / int(conf[i].sum())) if conf[i].sum() else None, "n": int(conf[i].sum())}
        for i in range(k)
    }
    result = {
        "checkpoint": str(resolve_checkpoint(checkpoint)),
        "data": spec,
        "split": split,
        "n": n,
        "top1": hits[0] / n,
        "top5": hits[1] / n if len(ks) > 1 else None,
        "loss": loss_sum / n,
        "per_class": per_class,
        "class_names": names,
        "confusion": conf.tolist(),
    }
    if variant is not None:
        result.update(agreement=same / n, top1_reference=ref_hits / n)
    if out is not None:
        from vitkit.train.plots import plot_confusion

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_confusion(conf, names, out / "confusion.png", title=f"{spec} ({split}): top-1 {result['top1']:.3f}")
        atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
        result["files"] = {"json": str(out / "eval.json"), "confusion_png": str(out / "confusion.png")}
    return result


@torch.no_grad()
def predict(
    checkpoint: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    topk: int = 5,
    device: str | torch.device | None = "auto",
    threads: ThreadSetting | None = "auto",
    tome: int = 0,
    variant: Callable[[nn.Module], nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image file.

    Args:
        checkpoint: A run directory (uses best/) or a model directory.
        images: Image files and/or folders; a folder stands for every image file under it (recursively, sorted by
            path, hidden files and non-image files skipped; see `vitkit.data.images.list_image_files`).
        topk: How many classes to list per image.
        device: Where to run ('auto' = cuda when available).
        threads: CPU intra-op threads as in `evaluate` (None keeps torch's current count).
        tome: token merging as in `evaluate` (0 = off).
        variant: predict with `variant(model)` (e.g. an int8 copy) instead of the loaded model.

    Returns:
        One {"path", "top": [{"class", "index", "prob"}, ...]} per image, best first.

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: No paths, a folder without image files, or a file that cannot be decoded.
    """
    from vitkit.data.images import list_image_files

    if not images:
        raise ValueError("predict needs at least one image path")
    images = list_image_files(images)
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    from vitkit.data.inference import prepare_image

    if threads is not None:
        set_threads(threads)
    dev = _device(device)
    model, _record = load_checkpoint(checkpoint, dev)
    _require_classifier(model, checkpoint)
    apply_tome(model, tome)
    run = model if variant is None else variant(model)
    names = model.preprocess.class_names or [str(i) for i in range(model.num_classes)]
    k = min(topk, len(names))
    results = []
    for path in images:
        try:
            _crop, x = prepare_image(str(path), model)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {str(path)!r} does not exist") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
        probs = run(x).float().softmax(-1)[0]
        p, idx = probs.topk(k)
        top = [{"class": names[i], "index": int(i), "prob": float(q)} for q, i in zip(p.tolist(), idx.tolist())]
        results.append({"path": str(path), "top": top})
    return results
