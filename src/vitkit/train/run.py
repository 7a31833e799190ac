"""`train(config) -> summary`: a whole training run (data, model, Trainer, test, summary), as the CLI runs it.

A run directory holds:
    config.yaml      the resolved TrainConfig (what `--resume` restarts from)
    last/  best/     vitkit model dirs + training_state.pt (best = the monitored metric's best epoch)
    metrics.jsonl    one JSON object per epoch (also metrics.csv)
    curves.png       loss, accuracy and learning rate
    summary.json     best_val_acc, test_acc (with best/), wall time, images/s, skipped files ...
    tensorboard/     with `tensorboard: true`
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from vitkit.data.inference import eval_load_size
from vitkit.runs import training_record
from vitkit.train.checkpoint import load_weights_into
from vitkit.train.config import TrainConfig, resolve_config
from vitkit.train.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from vitkit.train.loader import BatchLoader
from vitkit.train.setup import (
    build_model,
    create_run_dir,
    describe_split_gaps,
    fit_and_test,
    fit_batch_size,
    keep_finished_timing,
    make_training_record,
    release_run_dirs,
    start_run,
    write_summary,
)
from vitkit.train.tasks import DistillationTask, task_from_config
from vitkit.train.trainer import Trainer, amp_dtype

# Settings that only change how a run executes, not what it computes: these may differ when resuming.
RESUMABLE_OVERRIDES = ("workers", "progress", "tensorboard", "ckpt_every_steps", "device", "threads")


def _read_run_config(run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    cfg_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {str(run_dir)!r}: no such run directory")
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"--resume {str(run_dir)!r}: it has no config.yaml, so it is not a vitkit run directory"
        )
    data = yaml.safe_load(cfg_path.read_text()) or {}
    bad = sorted(k for k, v in overrides.items() if v is not None and k not in RESUMABLE_OVERRIDES and data.get(k) != v)
    if bad:
        raise ValueError(
            f"cannot change {', '.join(bad)} when resuming: {cfg_path} fixes them so the run continues exactly "
            f"(only {', '.join(RESUMABLE_OVERRIDES)} may change)"
        )
    data.update({k: v for k, v in overrides.items() if v is not None and k in RESUMABLE_OVERRIDES})
    return TrainConfig.from_dict(data)


def train(
    config: TrainConfig | dict[str, Any] | str | os.PathLike | None = None,
    *,
    resume: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a whole training job and return its summary (also written to RUN_DIR/summary.json).

    Works the same alone and under `torchrun` (DDP: logging and files from rank 0 only).

    Args:
        config: a TrainConfig, a dict of settings, a recipe YAML path, or None for the digits default.
        resume: a run directory to continue: from its `last/` checkpoint exactly, or from the start (with its saved
            config.yaml) when it has no checkpoint yet. `config` must then be None.
        overrides: settings applied on top of `config` (None values ignored), e.g. parsed command-line flags.
        log: message sink (rank 0); print to stderr by default.

    Returns:
        The summary dict: status, run_dir, best_val_acc, test_acc, test_top5, wall_time_s, images_per_s,
        skipped_files ([{path, reason}]), epochs_run, stopped_early, ...

    Raises:
        ValueError / FileNotFoundError: bad settings or paths, each named.
        TrainingInterrupted: SIGINT/SIGTERM (RUN_DIR/last saved; `exit_code` is 130/143).
        NonFiniteLossError: NaN/inf loss (stopped before the bad update; the last good checkpoint is kept).
    """
    t0 = time.perf_counter()
    if resume is not None:
        if config is not None:
            raise ValueError("give either a config or resume=RUN_DIR, not both (a resumed run uses its config.yaml)")
        run_dir = Path(resume)
        cfg = _read_run_config(run_dir, dict(overrides or {}))
    elif isinstance(config, TrainConfig):
        cfg = config.replace(**{k: v for k, v in (overrides or {}).items() if v is not None})
    else:
        cfg = resolve_config(config, overrides)

    dist = init_distributed(cfg.device)
    emit = log or (lambda m: print(m, file=sys.stderr, flush=True))
    say = (lambda m: emit(m)) if dist.is_main else (lambda m: None)
    try:
        amp_dtype(cfg.amp, dist.device, warn=False)  # fail on an impossible AMP setting before creating anything
        if cfg.task == "mae":  # masked-autoencoder pretraining: its own data, model and summary
            from vitkit.train.mae_run import run_mae as run
        elif cfg.task == "segment":
            from vitkit.train.seg_run import train_segmentation as run
        elif cfg.task == "detect":  # a ViTDETR on detection data
            from vitkit.train.detection_run import train_detection as run
        else:
            run = _train
        summary = run(cfg, dist, resume, say, t0)
        # Every process has finished its collectives before any tears the group down: a gloo process whose peer
        # destroys the group while it still talks can abort ("terminate called without an active exception").
        # Only on success: after a failure torchrun stops the other processes.
        barrier(dist)
        return summary
    finally:
        release_run_dirs()
        cleanup_distributed()


def _train(cfg: TrainConfig, dist: DistInfo, resume, say, t0: float) -> dict[str, Any]:
    from vitkit.data import load_data
    from vitkit.models.base import Preprocess

    # Everything that can fail on the settings or the data runs before a new run directory is created, so a start
    # that fails leaves nothing behind.
    run_dir, state, threads = start_run(cfg, dist, resume, say)

    # --- data -----------------------------------------------------------------------------------------------
    splits = load_data(cfg.data, **cfg.data_settings())
    say(
        f"data {cfg.data}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
        f"{splits.num_classes} classes"
        + (f", {len(splits.skipped)} unreadable files skipped" if splits.skipped else "")
    )
    describe_split_gaps(splits, say)
    requested_batch_size = cfg.batch_size
    cfg, batch_note = fit_batch_size(cfg, len(splits.train), dist, say)

    # --- model ----------------------------------------------------------------------------------------------
    model = build_model(cfg, splits.num_classes, say)
    img_size = tuple(model.preprocess.input_size)  # the contract: every model states its input size
    # Fine-tuning keeps the normalisation the checkpoint was trained with; from scratch, the data's own statistics.
    mean, std = (model.preprocess.mean, model.preprocess.std) if cfg.pretrained else (splits.mean, splits.std)
    model.preprocess = Preprocess(
        mean=mean,
        std=std,
        input_size=img_size,
        crop_fraction=cfg.crop_fraction,
        interpolation=cfg.interpolation,
        class_names=list(splits.class_names),
        load_size=eval_load_size({"data": cfg.data, "load_size": cfg.load_size}),  # predict/explain decode alike
    )
    if state is not None:
        load_weights_into(model, run_dir / "last")
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"model {getattr(model, 'model_name', cfg.model)}: {n_params / 1e6:.2f}M parameters at {img_size[0]}x{img_size[1]}"
        f" on {dist.device}" + (f" x {dist.world_size} processes" if dist.enabled else "")
    )

    # --- loaders --------------------------------------------------------------------------------------------
    common = dict(
        rank=dist.rank,
        world_size=dist.world_size,
        workers=cfg.workers,
        seed=cfg.seed,
        pin_memory=dist.device.type == "cuda",
    )
    train_loader = BatchLoader(splits.train, cfg.batch_size, shuffle=True, drop_last=True, **common)
    eval_bs = max(cfg.batch_size, 256)
    val_loader = BatchLoader(splits.val, eval_bs, **common) if len(splits.val) else None
    test_loader = BatchLoader(splits.test, eval_bs, **common) if len(splits.test) else None

    # --- train ----------------------------------------------------------------------------------------------
    record = make_training_record(cfg, run_dir, threads.count)
    task = task_from_config(cfg, log=say)  # loads the teacher when the recipe distils
    if isinstance(task, DistillationTask):
        record["teacher"] = _check_teacher(task, model, run_dir, state)
    trainer = Trainer(
        model, config=cfg, run_dir=run_dir, dist=dist, log=say, checkpoint_extra={"training": record}, task=task
    )
    if resume is None:
        say(f"run directory: {run_dir}")
        create_run_dir(run_dir, cfg, dist, [batch_note] if batch_note else [])
    skipped = [{"path": str(p), "reason": str(r)} for p, r in splits.skipped]
    summary: dict[str, Any] = {
        "status": "running",
        "run_dir": str(run_dir),
        "data": cfg.data,
        "model": getattr(model, "model_name", cfg.model),
        "skipped_files": skipped,
        "batch_size": cfg.batch_size,
        "batch_size_requested": requested_batch_size,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "threads": threads.to_dict(),
    }
    if isinstance(task, DistillationTask):
        summary["teacher"] = task.describe()

    # --- train, then test the best checkpoint ----------------------------------------------------------------
    test = fit_and_test(trainer, train_loader, val_loader, test_loader, state, run_dir, summary)
    hist = trainer.history
    best_epoch = trainer.best.get("epoch")
    best_row = hist.epochs[best_epoch - 1] if best_epoch else (hist.epochs[-1] if len(hist) else {})
    acc_key = "ema_acc" if cfg.monitor.startswith("ema_") else "val_acc"
    train_time = trainer.elapsed()
    summary.update(
        status="finished",
        best_val_acc=best_row.get(acc_key),
        best_epoch=best_epoch,
        best_is_ema=cfg.monitor.startswith("ema_"),
        monitor=cfg.monitor,
        test_acc=test.get("acc"),
        test_top5=test.get("top5"),
        test_loss=test.get("loss"),
        test_images=test.get("n", 0),
        final_val_acc=hist.epochs[-1].get("val_acc") if len(hist) else None,
        epochs_run=len(hist),
        stopped_early=bool(trainer.best.get("stopped_early")),
        steps=trainer.step,
        wall_time_s=time.perf_counter() - t0 + (state or {}).get("elapsed_s", 0.0),
        train_time_s=train_time,
        images_per_s=trainer.train_images_per_s(),
        num_params=sum(p.numel() for p in model.parameters()),
        img_size=list(model.preprocess.input_size),
        class_names=list(splits.class_names),
        device=str(dist.device),
        world_size=dist.world_size,
        amp=cfg.amp,
        checkpoints={"best": str(run_dir / "best"), "last": str(run_dir / "last")},
    )
    if isinstance(task, DistillationTask):
        summary["teacher"].update(test_agree=test.get("agree"), test_teacher_acc=test.get("teacher_acc"))
    keep_finished_timing(summary, state, run_dir)
    if dist.is_main:
        write_summary(run_dir, summary)
    return summary


def _check_teacher(task: DistillationTask, model: nn.Module, run_dir: Path, state: Any) -> dict[str, Any]:
    """The teacher's record for the checkpoints (after checking it against the student, which says how its input
    is adapted); on resume, refuse a teacher whose weights changed since."""
    task.check_model(model)
    info = task.describe()
    if state is not None:
        before = (training_record(run_dir / "last").get("teacher") or {}).get("fingerprint")
        if before is not None and before != info["fingerprint"]:
            raise ValueError(
                f"the teacher at {info['source']} is not the one {run_dir} was trained with (weights fingerprint "
                f"{info['fingerprint']}, recorded {before}): resuming would not continue the run exactly; put the "
                "original teacher back at that path"
            )
    return info
