"""Segmentation runs: `train(config)` with task="segment" lands here; `evaluate_segmentation` and `predict_masks` are
what `vitkit eval` / `vitkit predict` call for a segmentation checkpoint.

The run directory is a classification run's (config.yaml, best/, last/, metrics files, curves.png, summary.json);
summary.json holds best_val_miou, test_miou, test_dice, test_fg_iou and test_per_class ({class: {iou, dice,
pixels}}). The loop, checkpoints, exact resume, EMA, AMP and DDP are the Trainer's, as for every task.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit._io import atomic_write_text
from vitkit.runs import resolve_checkpoint, training_record
from vitkit.threads import ThreadSetting, set_threads
from vitkit.train.config import DEFAULT_MODEL, TrainConfig
from vitkit.train.distributed import DistInfo
from vitkit.train.evaluate import refuse_empty_split
from vitkit.train.loader import BatchLoader
from vitkit.train.metrics import finite_or_none
from vitkit.train.seg_metrics import IGNORE_INDEX, seg_metrics
from vitkit.train.tasks.segmentation import SegmentationTask
from vitkit.train.trainer import Trainer

SEG_FAMILIES = ("segmentation", "segmentation_unet")  # vitkit.models.segmentation's registered families


def checkpoint_family(path: str | os.PathLike) -> str | None:
    """The model family a vitkit run or model directory holds, or None (not such a directory: a timm/HF file ...)."""
    from vitkit.runs import model_config

    try:
        directory = resolve_checkpoint(path)
    except (FileNotFoundError, ValueError):
        return None
    return model_config(directory).get("family") if directory.is_dir() else None


def is_segmentation_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` (a run or model directory) holds a segmentation model (so eval/predict take this path)."""
    return checkpoint_family(path) in SEG_FAMILIES


def check_dense_source_size(source: nn.Module, cfg: TrainConfig) -> None:
    """Refuse an img_size other than the one a pretrained segmentation model or detector was trained at: their
    heads are built for it, and the size would otherwise be dropped without a word."""
    h, w = source.preprocess.input_size
    if cfg.img_size is not None and (cfg.img_size, cfg.img_size) != (h, w):
        raise ValueError(
            f"{cfg.pretrained} ({type(source).__name__}) was trained at {h}x{w}; img_size={cfg.img_size} cannot "
            f"resize it: drop img_size= or set img_size={h}"
        )


def build_segmentation_model(cfg: TrainConfig, num_classes: int, log: Callable[[str], None]) -> nn.Module:
    """The model a segmentation recipe asks for: `cfg.seg_head` on the backbone `cfg.model` (+ `model_args`), or on
    the backbone of `cfg.pretrained` (a classifier or detector run: its head is dropped; an MAE run: its encoder),
    or `cfg.pretrained` itself when it is a segmentation checkpoint with the same classes."""
    from vitkit.models.registry import create_model, get_family, model_family
    from vitkit.models.segmentation import segmentation_model

    if cfg.pretrained:
        if cfg.model_args:
            raise ValueError(f"model_args {cfg.model_args} cannot change the architecture of a pretrained model")
        from vitkit.weights import load_model

        family = checkpoint_family(cfg.pretrained)
        if family in (*SEG_FAMILIES, "detr"):  # a dense model: loaded at the size it was trained at
            source = load_model(cfg.pretrained, log=log)
            check_dense_source_size(source, cfg)
        else:
            source = load_model(cfg.pretrained, model_name=cfg.model, img_size=cfg.img_size, log=log)
        if family == "detr":  # a detector's backbone already reads where objects are: its box decoder is dropped
            log(f"backbone: the backbone of {cfg.pretrained} ({type(source).__name__}); its detection head is dropped")
            return segmentation_model(source.backbone, num_classes, cfg.seg_head, **cfg.seg_args)
        if getattr(source, "family", None) in SEG_FAMILIES:
            if source.num_classes != num_classes:
                raise ValueError(
                    f"{cfg.pretrained} segments {source.num_classes} classes but the data has {num_classes}; start "
                    "from its backbone by training a classifier, or use data with the same classes"
                )
            return source
        if hasattr(source, "encoder_model"):  # an MAE run: its encoder is the backbone (a ViT of the zoo)
            log(f"backbone: the encoder of {cfg.pretrained} ({type(source).__name__}); its decoder is dropped")
            source = source.encoder_model()
        else:
            log(f"backbone from {cfg.pretrained} ({type(source).__name__}); its classifier head is dropped")
        return segmentation_model(source, num_classes, cfg.seg_head, **cfg.seg_args)
    name = cfg.model or DEFAULT_MODEL
    overrides = dict(cfg.model_args)
    sized = "img_size" in get_family(model_family(name))[0].__dataclass_fields__
    if cfg.img_size is not None and sized:
        overrides["img_size"] = cfg.img_size
    backbone = create_model(name, num_classes=0, **overrides)
    if cfg.img_size is not None and not sized:
        backbone.preprocess.input_size = (cfg.img_size, cfg.img_size)
    return segmentation_model(backbone, num_classes, cfg.seg_head, **cfg.seg_args)


def _load_data(cfg_or_record: dict[str, Any], spec: str | None = None, load_size: int | None = None):
    from vitkit.data.segmentation import load_segmentation_data

    r = cfg_or_record
    return load_segmentation_data(
        spec or r["data"],
        seed=r.get("seed", 0),
        val_fraction=r.get("val_fraction", 0.1),
        test_fraction=r.get("test_fraction", 0.1),
        strict=bool(r.get("strict", False)),
        load_size=load_size if load_size is not None else r.get("load_size"),
        shapes_size=r.get("shapes_size", 64),
    )


def train_segmentation(cfg: TrainConfig, dist: DistInfo, resume: Any, say: Callable[[str], None], t0: float) -> dict:
    """The body of `vitkit.train.run.train` for task="segment" (see there for arguments, returns and errors)."""
    from vitkit.models.base import Preprocess
    from vitkit.train import setup as R

    run_dir, state, threads = R.start_run(cfg, dist, resume, say)

    # --- data -----------------------------------------------------------------------------------------------
    splits = _load_data(cfg.to_dict())
    say(
        f"data {cfg.data}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
        f"{splits.num_classes} classes ({', '.join(splits.class_names)})"
        + (f", {len(splits.skipped)} bad files skipped" if splits.skipped else "")
    )
    if len(splits.val) and bool((splits.val.masks == IGNORE_INDEX).all()):
        # val_miou would be NaN every epoch: the best checkpoint would stay at epoch 1 whatever the run learns
        raise ValueError(
            f"the validation split of {cfg.data} ({len(splits.val)} images) has no labelled pixel (every mask pixel "
            "is 255), so no checkpoint can be chosen by it: change seed or val_fraction, or label those images"
        )
    requested_batch_size = cfg.batch_size
    cfg, batch_note = R.fit_batch_size(cfg, len(splits.train), dist, say)

    # --- model ----------------------------------------------------------------------------------------------
    model = build_segmentation_model(cfg, splits.num_classes, say)
    img_size = tuple(model.preprocess.input_size)
    mean, std = (model.preprocess.mean, model.preprocess.std) if cfg.pretrained else (splits.mean, splits.std)
    model.preprocess = Preprocess(
        mean=mean,
        std=std,
        input_size=img_size,
        crop_fraction=1.0,  # segmentation evaluates whole images (resized to input_size), never a centre crop
        interpolation="bilinear",
        class_names=list(splits.class_names),
        load_size=None if cfg.data.startswith("scenes") else (cfg.load_size or _default_load_size()),
    )
    if state is not None:
        from vitkit.train.checkpoint import load_weights_into

        load_weights_into(model, run_dir / "last")
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"model {type(model).__name__}({model.cfg.backbone}, head={cfg.seg_head}): {n_params / 1e6:.2f}M parameters "
        f"at {img_size[0]}x{img_size[1]} on {dist.device}" + (f" x {dist.world_size} processes" if dist.enabled else "")
    )

    # --- loaders --------------------------------------------------------------------------------------------
    common = dict(rank=dist.rank, world_size=dist.world_size, workers=0, seed=cfg.seed,
                  pin_memory=dist.device.type == "cuda")  # fmt: skip
    train_loader = BatchLoader(splits.train, cfg.batch_size, shuffle=True, drop_last=True, **common)
    eval_bs = max(cfg.batch_size, 64)
    val_loader = BatchLoader(splits.val, eval_bs, **common) if len(splits.val) else None
    test_loader = BatchLoader(splits.test, eval_bs, **common) if len(splits.test) else None

    # --- train ----------------------------------------------------------------------------------------------
    record = R.make_training_record(cfg, run_dir, threads.count)
    record.update(task="segment", seg_head=cfg.seg_head, strict=cfg.strict)
    task = SegmentationTask()
    trainer = Trainer(
        model, config=cfg, run_dir=run_dir, dist=dist, log=say, checkpoint_extra={"training": record}, task=task
    )
    if resume is None:
        say(f"run directory: {run_dir}")
        R.create_run_dir(run_dir, cfg, dist, [batch_note] if batch_note else [])
    summary: dict[str, Any] = {
        "status": "running",
        "task": "segment",
        "run_dir": str(run_dir),
        "data": cfg.data,
        "model": cfg.model or (None if cfg.pretrained else DEFAULT_MODEL),
        "seg_head": cfg.seg_head,
        "pretrained": cfg.pretrained,
        "skipped_files": [{"path": str(p), "reason": str(r)} for p, r in splits.skipped],
        "batch_size": cfg.batch_size,
        "batch_size_requested": requested_batch_size,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "threads": threads.to_dict(),
    }

    # --- train, then test the best checkpoint ----------------------------------------------------------------
    test = R.fit_and_test(trainer, train_loader, val_loader, test_loader, state, run_dir, summary)
    counted = test and task.last_confusion is not None  # a test split of ignored pixels only has no per-class IoU
    per_class = seg_metrics(task.last_confusion, list(splits.class_names))["per_class"] if counted else {}
    hist = trainer.history
    best_epoch = trainer.best.get("epoch")
    best_row = hist.epochs[best_epoch - 1] if best_epoch else (hist.epochs[-1] if len(hist) else {})
    prefix = "ema_" if cfg.monitor.startswith("ema_") else "val_"
    train_time = trainer.elapsed()
    summary.update(
        status="finished",
        best_val_miou=best_row.get(prefix + "miou"),
        best_val_fg_iou=best_row.get(prefix + "fg_iou"),
        best_epoch=best_epoch,
        best_is_ema=cfg.monitor.startswith("ema_"),
        monitor=cfg.monitor,
        # NaN (a test split of ignored pixels only) is not JSON: None
        test_miou=finite_or_none(test.get("miou")),
        test_dice=finite_or_none(test.get("dice")),
        test_fg_iou=finite_or_none(test.get("fg_iou")),
        test_pixel_acc=finite_or_none(test.get("pixel_acc")),
        test_loss=finite_or_none(test.get("loss")),
        test_per_class=per_class,
        test_images=test.get("n", 0),
        epochs_run=len(hist),
        stopped_early=bool(trainer.best.get("stopped_early")),
        steps=trainer.step,
        wall_time_s=time.perf_counter() - t0 + (state or {}).get("elapsed_s", 0.0),
        train_time_s=train_time,
        images_per_s=trainer.train_images_per_s(),
        num_params=n_params,
        img_size=list(img_size),
        class_names=list(splits.class_names),
        device=str(dist.device),
        world_size=dist.world_size,
        amp=cfg.amp,
        checkpoints={"best": str(run_dir / "best"), "last": str(run_dir / "last")},
    )
    R.keep_finished_timing(summary, state, run_dir)
    if dist.is_main:
        R.write_summary(run_dir, summary)
    return summary


def _default_load_size() -> int:
    from vitkit.data.segmentation import DEFAULT_SEG_LOAD_SIZE

    return DEFAULT_SEG_LOAD_SIZE


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What `vitkit train` prints at the end of a segmentation run."""
    run = summary["run_dir"]
    lines = []
    if summary.get("test_miou") is not None:
        lines.append(
            f"test mIoU {summary['test_miou']:.4f}  Dice {summary['test_dice']:.4f}  foreground IoU "
            f"{summary['test_fg_iou']:.4f}"
        )
    elif summary.get("test_images"):
        lines.append("test split: no labelled pixel (every mask pixel is 255), no metric")
    else:
        lines.append("no test split")
    if summary.get("best_val_miou") is not None:
        lines.append(f"best val mIoU {summary['best_val_miou']:.4f} (epoch {summary['best_epoch']})")
    lines.append(
        f"{summary['epochs_run']} epochs in {summary['wall_time_s']:.0f} s ({summary['images_per_s']:.0f} img/s)"
    )
    lines.append(f"outputs in {run}/: best/ last/ (checkpoints), metrics.jsonl, metrics.csv, curves.png, summary.json")
    lines.append(f"next: vitkit eval --checkpoint {run}    vitkit predict --checkpoint {run} IMAGE")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and prediction of a checkpoint
# ----------------------------------------------------------------------------------------------------------------
def _load(checkpoint: str | os.PathLike, device: torch.device) -> tuple[nn.Module, dict[str, Any], Path]:
    from vitkit.weights import load_model

    directory = resolve_checkpoint(checkpoint)
    model = load_model(directory).to(device).eval()
    if getattr(model, "family", None) not in SEG_FAMILIES:
        raise ValueError(f"{checkpoint} is not a segmentation model (family {getattr(model, 'family', None)!r})")
    return model, training_record(directory), directory


@torch.no_grad()
def evaluate_segmentation(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    *,
    split: str = "test",
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    out: str | os.PathLike | None = None,
    threads: ThreadSetting | None = "auto",
) -> dict[str, Any]:
    """mIoU, Dice, foreground IoU, pixel accuracy and per-class IoU/Dice of a segmentation checkpoint on a split.

    Args:
        checkpoint: a run directory (its best/) or a segmentation model directory.
        data: a segmentation data spec; None = the run's own data (and so its own held-out split).
        split: train, val or test.
        batch_size: images per forward pass.
        device: where to run ('auto' = cuda when available).
        out: a directory for eval.json; None writes nothing.
        threads: CPU threads (N or "auto"), or None to keep torch's count.

    Returns:
        {"miou", "dice", "fg_iou", "pixel_acc", "loss", "n", "per_class": {name: {"iou", "dice", "pixels"}},
        "confusion", "class_names", "data", "split", "checkpoint"}.

    Raises:
        ValueError: not a segmentation checkpoint, an unknown or empty split, data whose classes differ from the
            model's.
    """
    from vitkit.train.distributed import resolve_device

    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not allowed; choose one of 'train', 'val', 'test'")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if threads is not None:
        set_threads(threads)
    dev = resolve_device(device)
    model, record, directory = _load(checkpoint, dev)
    spec = data or record.get("data")
    if spec is None:
        raise ValueError(f"{checkpoint} does not record its training data: pass data=...")
    if spec == "scenes" or spec.startswith("scenes:"):  # a folder run's decode size means nothing for scenes
        splits = _load_data({**record, "load_size": None}, spec)
    else:
        splits = _load_data(record, spec, load_size=model.preprocess.load_size)
    names = model.preprocess.class_names or [str(k) for k in range(model.num_classes)]
    if list(splits.class_names) != list(names):
        raise ValueError(f"the data's classes {splits.class_names} differ from the model's {names}")
    ds = getattr(splits, split)
    refuse_empty_split(len(ds), split, spec, record, ("train", "val", "test"))
    task = SegmentationTask()
    task.check_model(model)
    task.setup(model, TrainConfig(task="segment", monitor="val_miou"), dev)
    keys = (*task.eval_sum_keys, "n")
    sums = dict.fromkeys(keys, 0.0)
    for raw in BatchLoader(ds, batch_size):
        batch = task.eval_batch(raw)
        for k, v in task.eval_sums(task.forward(model, batch), batch).items():
            sums[k] += v
        sums["n"] += task.batch_size(batch)
    metrics = task.eval_metrics(sums)
    full = seg_metrics(task.confusion(sums), list(names))
    result = {
        "checkpoint": str(directory),
        "data": spec,
        "split": split,
        "n": metrics["n"],
        "loss": finite_or_none(metrics["loss"]),
        **{k: full[k] for k in ("miou", "dice", "fg_iou", "pixel_acc", "per_class")},
        "class_names": list(names),
        "confusion": task.confusion(sums).long().tolist(),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
        result["files"] = {"json": str(out / "eval.json")}
    return result


@torch.no_grad()
def predict_masks(
    checkpoint: str | os.PathLike | nn.Module,
    images: Sequence[str | os.PathLike],
    *,
    device: str | torch.device | None = "auto",
    threads: ThreadSetting | None = "auto",
) -> list[dict[str, Any]]:
    """Per-pixel classes of image files, decoded and preprocessed as the run's evaluation data was.

    Args:
        checkpoint: a run or segmentation model directory, or a loaded segmentation model.
        images: image files or folders (every image under a folder, sorted).
        device: where to run.
        threads: CPU threads (N or "auto"), or None to keep torch's count.

    Returns:
        One dict per image: "path", "image" (uint8 (H, W, 3), as decoded for the model), "mask" (uint8 (H, W) class
        indices at that size), "shares" ({class: share of the pixels}), "class_names".
    """
    from vitkit.data.images import decode_image, list_image_files, naming_the_file, resize_center_crop
    from vitkit.data.segmentation import SegEvalTransform
    from vitkit.train.distributed import resolve_device

    if threads is not None:
        set_threads(threads)
    dev = resolve_device(device)
    if isinstance(checkpoint, nn.Module):
        model = checkpoint.to(dev).eval()
    else:
        model = _load(checkpoint, dev)[0]
    pre = model.preprocess
    names = pre.class_names or [str(k) for k in range(model.num_classes)]
    transform = SegEvalTransform(pre.input_size, pre.mean, pre.std).to(dev)
    results = []
    for path in list_image_files(images):
        with naming_the_file(path):
            image = decode_image(path)
        if pre.load_size:  # the run decoded its files to load_size squares: predict on what it was trained on
            image = resize_center_crop(image, pre.load_size)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(dev)  # (1, 3, H, W)
        logits = model(transform(x)).float()  # (1, K, h, w)
        logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
        mask = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()  # (H, W)
        counts = np.bincount(mask.reshape(-1), minlength=len(names))
        shares = {n: float(c) / mask.size for n, c in zip(names, counts)}
        results.append({"path": str(path), "image": image, "mask": mask, "shares": shares, "class_names": names})
    return results


def mask_segments(mask: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """A predicted mask as COCO results, one per class present: [{"category_id": class index, "class": name,
    "segmentation": COCO RLE {"size": [H, W], "counts": str}, "area": pixels, "bbox": [x, y, w, h] pixels}], in
    class order. `pycocotools.mask.decode` gives the class's pixels back exactly.

    Args:
        mask: uint8 (H, W) class indices (`predict_masks`' "mask").
        class_names: name of each class index.
    """
    from pycocotools import mask as mask_utils

    segments = []
    for k in np.unique(mask).tolist():
        if k >= len(class_names):  # 255 (ignored) in a given mask: not a class
            continue
        rle = mask_utils.encode(np.asfortranarray(mask == k, dtype=np.uint8))
        segments.append(
            {
                "category_id": int(k),
                "class": class_names[k],
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            }
        )
    return segments
