"""The body of a masked-autoencoder run (`task: mae`), called by `vitkit.train.train` for such a config:
unlabeled data, the MAE model around its ViT encoder, the Trainer with `MAETask`, the test reconstruction loss and
summary.json. The entry point users call is `vitkit.train.pretrain.pretrain` (`vitkit pretrain`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from vitkit.train.checkpoint import load_weights_into
from vitkit.train.config import DEFAULT_MODEL, TrainConfig
from vitkit.train.distributed import DistInfo
from vitkit.train.loader import BatchLoader
from vitkit.train.trainer import Trainer


def build_mae(cfg: TrainConfig, log: Callable[[str], None]) -> nn.Module:
    """The masked autoencoder a config asks for: `model` (a registered ViT) wrapped with the decoder of
    `model_args`, at `img_size`; or `pretrained`, an MAE checkpoint (a vitkit MAE run or directory, a
    transformers ViTMAE directory) to continue pretraining from."""
    from vitkit.models.mae import mae_from_vit

    if cfg.pretrained:
        from vitkit.weights import load_model

        if cfg.model_args:
            raise ValueError(f"model_args {cfg.model_args} cannot change the architecture of a pretrained model")
        model = load_model(cfg.pretrained, img_size=cfg.img_size, log=log)
        if getattr(model, "family", None) != "mae":
            raise ValueError(
                f"pretrained={cfg.pretrained!r} is a {getattr(model, 'family', type(model).__name__)!r} model; MAE "
                "pretraining continues from a masked autoencoder (a vitkit MAE run or a transformers ViTMAE "
                "directory). To start from scratch, name the encoder with model"
            )
        return model
    args = dict(cfg.model_args)
    if cfg.img_size is not None:
        args["img_size"] = cfg.img_size
    return mae_from_vit(cfg.model or DEFAULT_MODEL, **args)


def run_mae(cfg: TrainConfig, dist: DistInfo, resume: str | os.PathLike | None, say, t0: float) -> dict[str, Any]:
    """The body of an MAE run (called by `vitkit.train.train` for task='mae'): data with labels ignored, the
    model, the Trainer with `MAETask`, the test loss with best/, the summary."""
    from vitkit.data.inference import eval_load_size
    from vitkit.data.unlabeled import load_unlabeled
    from vitkit.models.base import Preprocess
    from vitkit.train.setup import (
        create_run_dir,
        fit_and_test,
        fit_batch_size,
        make_training_record,
        start_run,
        write_summary,
    )
    from vitkit.train.tasks.mae import MAETask

    if cfg.distillation != "none":
        raise ValueError("task='mae' learns without labels or a teacher; drop teacher/distillation")
    run_dir, state, threads = start_run(cfg, dist, resume, say)

    # --- data: labels are loaded where the source has them, and ignored -------------------------------------
    splits = load_unlabeled(cfg.data, **cfg.data_settings())
    say(
        f"data {cfg.data} (labels ignored): {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images"
        + (f", {len(splits.skipped)} unreadable files skipped" if splits.skipped else "")
    )
    requested_batch_size = cfg.batch_size
    cfg, batch_note = fit_batch_size(cfg, len(splits.train), dist, say)

    # --- model ----------------------------------------------------------------------------------------------
    model = build_mae(cfg, say)
    img_size = tuple(model.preprocess.input_size)
    mean, std = (model.preprocess.mean, model.preprocess.std) if cfg.pretrained else (splits.mean, splits.std)
    model.preprocess = Preprocess(
        mean=mean,
        std=std,
        input_size=img_size,
        crop_fraction=cfg.crop_fraction,
        interpolation=cfg.interpolation,
        class_names=None,
        load_size=eval_load_size({"data": cfg.data, "load_size": cfg.load_size}),
    )
    if state is not None:
        load_weights_into(model, run_dir / "last")
    c = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"MAE {getattr(model, 'model_name', 'model')}: {n_params / 1e6:.2f}M parameters at {img_size[0]}x{img_size[1]}, "
        f"{model.num_patches} patches of {c.patch_size} px, {model.num_visible()} seen by the encoder "
        f"(mask_ratio {c.mask_ratio}), decoder {c.decoder_depth} x {c.decoder_embed_dim}, "
        f"norm_pix_loss {c.norm_pix_loss} on {dist.device}"
        + (f" x {dist.world_size} processes" if dist.enabled else "")
    )

    # --- loaders and the run --------------------------------------------------------------------------------
    common = dict(rank=dist.rank, world_size=dist.world_size, workers=cfg.workers, seed=cfg.seed,
                  pin_memory=dist.device.type == "cuda")  # fmt: skip
    train_loader = BatchLoader(splits.train, cfg.batch_size, shuffle=True, drop_last=True, **common)
    eval_bs = max(cfg.batch_size, 256)
    val_loader = BatchLoader(splits.val, eval_bs, **common) if len(splits.val) else None
    test_loader = BatchLoader(splits.test, eval_bs, **common) if len(splits.test) else None
    record = make_training_record(cfg, run_dir, threads.count)
    trainer = Trainer(model, config=cfg, run_dir=run_dir, dist=dist, log=say, checkpoint_extra={"training": record},
                      task=MAETask())  # fmt: skip
    if resume is None:
        say(f"run directory: {run_dir}")
        create_run_dir(run_dir, cfg, dist, [batch_note] if batch_note else [])
    summary: dict[str, Any] = {
        "status": "running",
        "method": "mae",
        "run_dir": str(run_dir),
        "data": cfg.data,
        "model": getattr(model, "model_name", None),
        "skipped_files": [{"path": str(p), "reason": str(r)} for p, r in splits.skipped],
        "batch_size": cfg.batch_size,
        "batch_size_requested": requested_batch_size,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "threads": threads.to_dict(),
    }

    # --- test reconstruction loss with best/ -----------------------------------------------------------------
    test = fit_and_test(trainer, train_loader, val_loader, test_loader, state, run_dir, summary)
    hist = trainer.history
    best_epoch = trainer.best.get("epoch")
    best_row = hist.epochs[best_epoch - 1] if best_epoch else (hist.epochs[-1] if len(hist) else {})
    train_time = trainer.elapsed()
    figures = sorted((run_dir / "reconstructions").glob("epoch_*.png")) if dist.is_main else []
    summary.update(
        status="finished",
        best_val_loss=best_row.get("ema_loss" if cfg.monitor.startswith("ema_") else "val_loss"),
        best_epoch=best_epoch,
        monitor=cfg.monitor,
        test_loss=test.get("loss"),
        test_images=test.get("n", 0),
        final_train_loss=hist.epochs[-1].get("train_loss") if len(hist) else None,
        epochs_run=len(hist),
        stopped_early=bool(trainer.best.get("stopped_early")),
        steps=trainer.step,
        wall_time_s=time.perf_counter() - t0 + (state or {}).get("elapsed_s", 0.0),
        train_time_s=train_time,
        images_per_s=trainer.train_images_per_s(),
        num_params=n_params,
        encoder_params=sum(p.numel() for p in model.encoder.parameters()),
        img_size=list(img_size),
        mask_ratio=c.mask_ratio,
        norm_pix_loss=c.norm_pix_loss,
        device=str(dist.device),
        world_size=dist.world_size,
        amp=cfg.amp,
        checkpoints={"best": str(run_dir / "best"), "last": str(run_dir / "last")},
        figures=[str(p) for p in figures],
        fine_tune=f"vitkit train --pretrained {run_dir} --data DATA",
    )
    if dist.is_main:
        write_summary(run_dir, summary)
    return summary


__all__ = ["build_mae", "run_mae"]
