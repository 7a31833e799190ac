"""Detection runs end to end: `vitkit train --task detect`, `vitkit eval` and `vitkit predict` on a detector.

    train(config with task="detect", data="scenes", model="vit_nano_patch4_32")   # via vitkit.train.train
    evaluate_detection("runs/scenes-detr")        # {"map", "map50", "map75", "loss", "n", ...} on the test split
    predict_detection("runs/scenes-detr", ["a.png"])   # per image its boxes (pixels of the file), labels, scores

The run directory is the classification one (config.yaml, last/, best/, metrics, curves, summary.json); its
summary has best_val_map50, test_map, test_map50, test_map75. The model is `ViTDETR` on the backbone `model` names
(from scratch) or `pretrained` gives (a classifier checkpoint, e.g. a shapes run: its weights become the
backbone's). `model_args` keys that are `DETRConfig` fields (num_queries, hidden_dim, dec_layers, dec_heads,
dec_ffn_dim, dec_dropout, feature_index) configure the detector; the others the backbone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit._io import atomic_write_text
from vitkit.models.detr import DETRConfig
from vitkit.runs import model_config, resolve_checkpoint, training_record
from vitkit.threads import ThreadSetting, set_threads
from vitkit.train.checkpoint import load_weights_into
from vitkit.train.config import TrainConfig
from vitkit.train.distributed import DistInfo
from vitkit.train.evaluate import refuse_empty_split
from vitkit.train.metrics import finite_or_none
from vitkit.train.tasks.detection import DetectionLoader, DetectionTask, postprocess
from vitkit.train.trainer import Trainer

DETR_FIELDS = tuple(f.name for f in dataclasses.fields(DETRConfig))
_RUN_ONLY = ("backbone", "backbone_args", "num_classes", "category_ids")  # set by the run, not by model_args


def split_model_args(model_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(detector settings, backbone settings) from a recipe's `model_args`.

    Raises:
        ValueError: a key only the run may set (backbone, num_classes, category_ids ...).
    """
    detr = {k: v for k, v in model_args.items() if k in DETR_FIELDS}
    bad = sorted(k for k in detr if k in _RUN_ONLY)
    if bad:
        raise ValueError(
            f"model_args {bad} cannot be set for a detection run: the backbone is `model`/`pretrained` and the "
            "classes come from the data"
        )
    return detr, {k: v for k, v in model_args.items() if k not in DETR_FIELDS}


def build_detector(cfg: TrainConfig, num_classes: int, category_ids: Sequence[int], log) -> nn.Module:
    """`ViTDETR` on the backbone the recipe names (`model`, from scratch) or gives (`pretrained`)."""
    from vitkit.models.detr import ViTDETR
    from vitkit.train.seg_run import check_dense_source_size, is_segmentation_checkpoint
    from vitkit.train.setup import build_model

    detr_args, backbone_args = split_model_args(cfg.model_args)
    if cfg.pretrained and model_config(resolve_checkpoint(cfg.pretrained)).get("family") == "detr":
        raise ValueError(
            f"pretrained={cfg.pretrained!r} is a detector; for detection, pretrained names the backbone (e.g. a "
            "classifier run). To continue a detection run use --resume"
        )
    if cfg.pretrained and is_segmentation_checkpoint(cfg.pretrained):
        # A segmentation model's backbone already reads where objects are and what they are: often a better start
        # for the box decoder than a classifier's (docs/dense.md measures both).
        if backbone_args:
            raise ValueError(f"model_args {backbone_args} cannot change the architecture of a pretrained model")
        from vitkit.weights import load_model

        source = load_model(cfg.pretrained, log=log)  # trained at its own size, as segmentation runs are
        check_dense_source_size(source, cfg)
        log(f"backbone: the backbone of {cfg.pretrained} ({type(source).__name__}); its segmentation head is dropped")
        backbone = source.backbone
    else:
        backbone = build_model(cfg.replace(model_args=backbone_args), 0, log)
    return ViTDETR(backbone, num_classes=num_classes, category_ids=list(category_ids), **detr_args)


def train_detection(cfg: TrainConfig, dist: DistInfo, resume: Any, say, t0: float) -> dict[str, Any]:
    """The detection branch of `vitkit.train.run.train` (same run directory, resume, DDP and summary rules)."""
    from vitkit.data.detection import load_detection_data
    from vitkit.models.base import Preprocess
    from vitkit.train.setup import (
        create_run_dir,
        fit_and_test,
        fit_batch_size,
        keep_finished_timing,
        make_training_record,
        start_run,
        write_summary,
    )

    if resume is None and cfg.monitor in ("val_acc", "ema_acc"):  # classification's default: here mAP@0.5
        cfg = cfg.replace(monitor=cfg.monitor.replace("acc", "map50"))
        say(f"monitor: {cfg.monitor} (detection has no accuracy)")
    run_dir, state, threads = start_run(cfg, dist, resume, say)

    splits = load_detection_data(cfg.data, **cfg.data_settings())
    say(
        f"data {cfg.data}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
        f"{splits.train.num_boxes} train boxes, {splits.num_classes} classes"
        + (f", {len(splits.skipped)} bad entries skipped" if splits.skipped else "")
    )
    if len(splits.val) and splits.val.num_boxes == 0:
        # val_map50 would be NaN (undefined) every epoch: the best checkpoint would stay at epoch 1
        raise ValueError(
            f"the validation split of {cfg.data} ({len(splits.val)} images) has no box, so no checkpoint can be "
            "chosen by its mAP: change seed or val_fraction, or annotate those images"
        )
    requested_batch_size = cfg.batch_size
    cfg, batch_note = fit_batch_size(cfg, len(splits.train), dist, say)

    model = build_detector(cfg, splits.num_classes, splits.category_ids, say)
    check_queries(model.cfg.num_queries, cfg.data, {"train": splits.train, "val": splits.val, "test": splits.test})
    pre = model.preprocess
    mean, std = (pre.mean, pre.std) if cfg.pretrained else (splits.mean, splits.std)
    model.preprocess = Preprocess(
        mean=mean,
        std=std,
        input_size=tuple(pre.input_size),
        crop_fraction=1.0,
        interpolation=cfg.interpolation,
        class_names=list(splits.class_names),
    )
    if state is not None:
        load_weights_into(model, run_dir / "last")
    n_params = sum(p.numel() for p in model.parameters())
    h, w = model.preprocess.input_size
    say(f"model {model.model_name}: {n_params / 1e6:.2f}M parameters at {h}x{w}, {model.cfg.num_queries} queries")

    common = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
    train_loader = DetectionLoader(splits.train, cfg.batch_size, shuffle=True, drop_last=True, **common)
    eval_bs = max(cfg.batch_size, 64)
    val_loader = DetectionLoader(splits.val, eval_bs, **common) if len(splits.val) else None
    test_loader = DetectionLoader(splits.test, eval_bs, **common) if len(splits.test) else None

    record = {**make_training_record(cfg, run_dir, threads.count), "task": "detect"}
    trainer = Trainer(
        model,
        config=cfg,
        run_dir=run_dir,
        dist=dist,
        log=say,
        checkpoint_extra={"training": record},
        task=DetectionTask(),
    )
    if resume is None:
        say(f"run directory: {run_dir}")
        create_run_dir(run_dir, cfg, dist, [batch_note] if batch_note else [])
    summary: dict[str, Any] = {
        "status": "running",
        "task": "detect",
        "run_dir": str(run_dir),
        "data": cfg.data,
        "model": model.model_name,
        "skipped_entries": [{"entry": e, "reason": r} for e, r in splits.skipped],
        "batch_size": cfg.batch_size,
        "batch_size_requested": requested_batch_size,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "threads": threads.to_dict(),
    }

    test = fit_and_test(trainer, train_loader, val_loader, test_loader, state, run_dir, summary)
    hist = trainer.history
    best_epoch = trainer.best.get("epoch")
    best_row = hist.epochs[best_epoch - 1] if best_epoch else (hist.epochs[-1] if len(hist) else {})
    prefix = "ema" if cfg.monitor.startswith("ema_") else "val"
    train_time = trainer.elapsed()
    summary.update(
        status="finished",
        best_val_map50=best_row.get(f"{prefix}_map50"),
        best_val_map=best_row.get(f"{prefix}_map"),
        best_epoch=best_epoch,
        best_is_ema=prefix == "ema",
        monitor=cfg.monitor,
        # NaN (a test split without boxes: mAP undefined) is not JSON: None
        test_map=finite_or_none(test.get("map")),
        test_map50=finite_or_none(test.get("map50")),
        test_map75=finite_or_none(test.get("map75")),
        test_loss=finite_or_none(test.get("loss")),
        test_images=test.get("n", 0),
        epochs_run=len(hist),
        stopped_early=bool(trainer.best.get("stopped_early")),
        steps=trainer.step,
        wall_time_s=time.perf_counter() - t0 + (state or {}).get("elapsed_s", 0.0),
        train_time_s=train_time,
        images_per_s=trainer.train_images_per_s(),
        num_params=sum(p.numel() for p in model.parameters()),
        num_queries=model.cfg.num_queries,
        img_size=list(model.preprocess.input_size),
        class_names=list(splits.class_names),
        category_ids=list(splits.category_ids),
        device=str(dist.device),
        world_size=dist.world_size,
        amp=cfg.amp,
        checkpoints={"best": str(run_dir / "best"), "last": str(run_dir / "last")},
    )
    keep_finished_timing(summary, state, run_dir)
    if dist.is_main:
        write_summary(run_dir, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and prediction with a trained detector
# ----------------------------------------------------------------------------------------------------------------
def is_detector(checkpoint: str | os.PathLike) -> bool:
    """Whether a run or model directory holds a detector (family "detr")."""
    try:
        directory = resolve_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError):
        return False
    return directory.is_dir() and model_config(directory).get("family") == "detr"


def _load_detector(checkpoint: str | os.PathLike, device: str | torch.device | None) -> tuple[nn.Module, dict]:
    from vitkit.train.distributed import resolve_device
    from vitkit.weights import load_model

    directory = resolve_checkpoint(checkpoint)
    model = load_model(str(directory))
    if getattr(model, "family", None) != "detr":
        raise ValueError(f"{checkpoint} holds a {type(model).__name__}, not a detector (ViTDETR)")
    return model.to(resolve_device(device)).eval(), training_record(directory)


@torch.no_grad()
def evaluate_detection(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    *,
    split: str = "test",
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    out: str | os.PathLike | None = None,
    threads: ThreadSetting | None = "auto",
) -> dict[str, Any]:
    """COCO mAP, mAP@0.5, mAP@0.75 and the set loss of a detector on a split of its data (or other data).

    Args:
        checkpoint: a detection run (best/) or a detector model directory.
        data: a detection data spec; None = the run's own (same seed, so the same held-out split).
        split: train, val, test or all.
        batch_size: images per forward pass.
        device: where to run.
        out: a directory for eval.json; None writes nothing.
        threads: CPU threads (None leaves the setting alone).

    Returns:
        {"data", "split", "checkpoint", "n", "n_boxes", "loss", "map", "map50", "map75", and with split="test"
        also "test_map", "test_map50", "test_map75"}.

    Raises:
        ValueError: not a detector, an unknown or empty split, data whose classes are not the detector's.
    """
    from vitkit.data.detection import DetectionDataset, load_detection_data
    from vitkit.train.det_metrics import coco_map

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split={split!r} is not allowed; choose one of train, val, test, all")
    if threads is not None:
        set_threads(threads)
    model, record = _load_detector(checkpoint, device)
    spec = data or record.get("data")
    if not spec:
        raise ValueError(f"{checkpoint} records no training data; pass data=")
    splits = load_detection_data(
        spec,
        seed=int(record.get("seed", 0)),
        val_fraction=float(record.get("val_fraction", 0.1)),
        test_fraction=float(record.get("test_fraction", 0.1)),
        load_size=record.get("load_size"),
        shapes_size=int(record.get("shapes_size", 64)),
    )
    if split == "all":
        parts = [splits.train, splits.val, splits.test]
        ds = DetectionDataset(
            torch.cat([p.images for p in parts]), [t for p in parts for t in p.targets], splits.class_names
        )
    else:
        ds = getattr(splits, split)
    refuse_empty_split(len(ds), split, spec, record, ("train", "val", "test", "all"))  # mAP of nothing is NaN
    check_queries(model.cfg.num_queries, spec, {split: ds})
    if list(splits.class_names) != list(model.preprocess.class_names or splits.class_names):
        raise ValueError(
            f"the data's classes {splits.class_names} are not the detector's {model.preprocess.class_names}"
        )
    task = DetectionTask()
    dev = next(model.parameters()).device
    task.setup(model, TrainConfig(task="detect"), dev)
    loss_sum, preds, targets = 0.0, [], []
    for raw in DetectionLoader(ds, batch_size):
        batch = task.eval_batch(raw)
        out_ = model(batch["image"])
        loss_sum += task.eval_sums(out_, batch)["loss"]
        for p, t in task.eval_collect(out_, batch):
            preds.append(p)
            targets.append(t)
    scores = coco_map(preds, targets, model.num_classes)
    n = len(ds)
    result: dict[str, Any] = {
        "data": spec,
        "split": split,
        "checkpoint": str(resolve_checkpoint(checkpoint)),
        "n": n,
        "n_boxes": scores["n_boxes"],
        "loss": finite_or_none(loss_sum / n),
        # None where mAP is undefined (no ground-truth box in the split): NaN is not JSON
        "map": finite_or_none(scores["map"]),
        "map50": finite_or_none(scores["map50"]),
        "map75": finite_or_none(scores["map75"]),
    }
    if split == "test":
        result.update(test_map=result["map"], test_map50=result["map50"], test_map75=result["map75"])
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
        result["files"] = {"json": str(out / "eval.json")}
    return result


@torch.no_grad()
def predict_detection(
    checkpoint: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    score_threshold: float = 0.5,
    device: str | torch.device | None = "auto",
    threads: ThreadSetting | None = "auto",
) -> list[dict[str, Any]]:
    """Detect objects in image files.

    Each image is decoded, resized (stretched) to the detector's input size and normalised as in training; boxes
    are scaled back to the file's own pixels.

    Args:
        checkpoint: a detection run or detector model directory.
        images: image files or folders (every image under a folder, sorted).
        score_threshold: keep detections scoring at least this (0 keeps all num_queries).
        device: where to run.
        threads: CPU threads (None leaves the setting alone).

    Returns:
        Per image {"path", "size": [H, W], "image" (the decoded uint8 (H, W, 3) array), "detections": [{"box": xyxy
        pixels, "label": class index, "class": name, "category_id": the data's id, "score"}] by score}.

    Raises:
        ValueError: a threshold outside [0, 1], no images, or a file that cannot be decoded (naming it).
    """
    from vitkit.data.detection import DetectionTransform
    from vitkit.data.images import decode_image, list_image_files, naming_the_file

    if not 0 <= score_threshold <= 1:
        raise ValueError(f"score_threshold={score_threshold} is outside [0, 1]")
    if threads is not None:
        set_threads(threads)
    model, _ = _load_detector(checkpoint, device)
    files = list_image_files(images)
    if not files:
        raise ValueError(f"no image files in {list(map(str, images))}")
    pre = model.preprocess
    dev = next(model.parameters()).device
    tf = DetectionTransform(pre.input_size, pre.mean, pre.std).to(dev)
    names = pre.class_names or [str(i) for i in range(model.num_classes)]
    ids = model.cfg.category_ids or list(range(1, model.num_classes + 1))
    results = []
    for path in files:
        with naming_the_file(path):
            array = decode_image(path)
        h, w = array.shape[:2]
        x, _ = tf(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].to(dev), [])
        det = postprocess(model(x), [(h, w)])[0]
        keep = det["scores"] >= score_threshold
        detections = [
            {
                "box": [round(float(v), 2) for v in box],
                "label": int(label),
                "class": names[int(label)],
                "category_id": int(ids[int(label)]),
                "score": round(float(score), 4),
            }
            for box, label, score in zip(det["boxes"][keep], det["labels"][keep], det["scores"][keep], strict=True)
        ]
        results.append({"path": str(path), "size": [h, w], "image": array, "detections": detections})
    return results


def coco_results(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`predict_detection` output -> COCO results format: [{"image_id", "file_name", "category_id", "bbox" [x, y,
    w, h] pixels, "score"}], image ids being the positions of the images (0, 1, ...)."""
    from vitkit.data.boxes import xyxy_to_xywh

    out = []
    for image_id, p in enumerate(predictions):
        for d in p["detections"]:
            x, y, bw, bh = xyxy_to_xywh(torch.tensor(d["box"], dtype=torch.float64)).tolist()
            out.append(
                {
                    "image_id": image_id,
                    "file_name": p["path"],
                    "category_id": d["category_id"],
                    "bbox": [round(v, 2) for v in (x, y, bw, bh)],
                    "score": d["score"],
                }
            )
    return out


def check_queries(num_queries: int, spec: str, datasets: dict[str, Any]) -> None:
    """Refuse data with an image holding more objects than the detector has queries, before any step: the Hungarian
    matching gives each object its own query, and would otherwise stop the run where it meets that image (a crowded
    test image: after the whole training).

    Raises:
        ValueError: naming the split, the image and the smallest num_queries that fits.
    """
    counts = [(len(t["labels"]), split, i) for split, ds in datasets.items() for i, t in enumerate(ds.targets)]
    if not counts:
        return
    most, split, i = max(counts, key=lambda c: c[0])
    if most > num_queries:
        ds = datasets[split]
        image = ds.paths[i] or f"image {ds.image_ids[i]}"
        raise ValueError(
            f"{spec}: {split} {image} has {most} objects but num_queries={num_queries}; DETR matches each object to "
            f"a query of its own: use at least {most}"
        )


def describe_summary(summary: dict[str, Any]) -> str:
    """The lines `vitkit train` prints at the end of a detection run."""
    run = summary["run_dir"]

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [
        f"test mAP@0.5 {num(summary['test_map50'])}  mAP@[.5:.95] {num(summary['test_map'])}"
        if summary.get("test_images")
        else "no test split",
        f"best val mAP@0.5 {num(summary['best_val_map50'])} (epoch {summary['best_epoch']})",
        f"{summary['epochs_run']} epochs in {summary['wall_time_s']:.0f} s ({summary['images_per_s']:.0f} img/s)",
        f"outputs in {run}/: best/ last/ (checkpoints), metrics.jsonl, metrics.csv, curves.png, summary.json",
        f"next: vitkit eval --checkpoint {run}    vitkit predict --checkpoint {run} IMAGE",
    ]
    return "\n".join(lines)
