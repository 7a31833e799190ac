"""Resumable units of work shared by `compare` and `sweep`: a plan file, one JSON result per unit, one training.

An output directory holds:
    plan.json               the resolved settings; a re-run must ask for the same ones (or it is refused)
    units/<unit>.json       one finished unit's numbers, written atomically when the unit ends
    runs/<unit>/            the Trainer's run directory of a training unit (last/, best/, metrics.jsonl ...)

A re-run skips every unit whose JSON exists, and a training unit killed midway continues from runs/<unit>/last
(the Trainer's exact resume). Results are only ever read from units/, so a half-written unit is never reported.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit._io import atomic_write_text, resolve_dir
from vitkit.data.dataset import DataSplits, ImageDataset, stratified_split
from vitkit.train.config import DIGITS_RECIPE, TrainConfig

Log = Callable[[str], None]


def default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name plus architecture overrides (`create_model` keywords), e.g. smaller widths."""

    name: str
    args: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    @property
    def label(self) -> str:
        """How the model is named in the report: the name, with its overrides when it has any."""
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_short(v)}' for k, v in self.args.items())})"

    @property
    def slug(self) -> str:
        """A file-name-safe form of the label, used for unit and run directory names."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": _jsonable(self.args)}


def _short(v: Any) -> str:
    return "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def check_models(models: Sequence[str | ModelSpec], min_count: int = 1) -> list[ModelSpec]:
    """Model specs from names or specs; every name must be registered, no label twice.

    Raises:
        ValueError: fewer than `min_count` models, an unknown name (with close names), or a duplicate.
        TypeError: an entry that is neither a str nor a ModelSpec, or overrides that are not a dict.
    """
    from vitkit.models.registry import model_family

    specs = []
    for m in models:
        if isinstance(m, str):
            m = ModelSpec(m.strip())
        if not isinstance(m, ModelSpec):
            raise TypeError(f"a model must be a registered name or a ModelSpec, got {m!r}")
        if not isinstance(m.args, dict):
            raise TypeError(f"model overrides for {m.name!r} must be a dict, got {m.args!r}")
        model_family(m.name)  # an unknown name fails here, naming the close ones
        specs.append(m)
    if len(specs) < min_count:
        raise ValueError(f"give at least {min_count} model(s), got {len(specs)}: {[s.label for s in specs]}")
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"model(s) {', '.join(dupes)} given twice; each model is compared once")
    return specs


def base_config(data: str, overrides: dict[str, Any]) -> TrainConfig:
    """The recipe every unit trains with: the digits recipe on digits (tuned for 8x8 images upsampled to 16 px),
    TrainConfig's defaults otherwise; then `overrides` (None values ignored). No progress bar: units log lines."""
    base = {k: v for k, v in DIGITS_RECIPE.items() if k != "model"} if data == "digits" else {}
    settings = {**base, "data": data, "progress": False, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig.from_dict(settings)


def load_splits(cfg: TrainConfig) -> DataSplits:
    """The train/val/test splits of `cfg.data` with the config's seed and fractions."""
    from vitkit.data import load_data

    return load_data(cfg.data, **cfg.data_settings())


def train_subset(train: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """A class-stratified `fraction` of the training split (the whole split for 1.0), fixed by `seed`.

    Raises:
        ValueError: fraction outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"a training fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return train
    _rest, part = stratified_split(train.labels, (fraction,), seed)
    return train.subset(part)


# ----------------------------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------------------------
class UnitStore:
    """plan.json and units/*.json of one output directory."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.units = self.out / "units"
        self.runs = self.out / "runs"

    def check_plan(self, plan: dict[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        """Write plan.json for a new directory, or check a re-run asks for the same settings.

        Args:
            plan: the resolved settings (JSON-able).
            keep: keys whose recorded value a re-run reuses instead of comparing (e.g. the epochs a budget chose).

        Returns:
            The plan in force (the recorded one on a re-run).

        Raises:
            ValueError: a setting differs from the one recorded, named with both values.
        """
        path = self.out / "plan.json"
        plan = _jsonable(plan)
        if path.is_file():
            old = json.loads(path.read_text())
            diff = [k for k in sorted(set(plan) | set(old)) if k not in keep and plan.get(k) != old.get(k)]
            if diff:
                shown = "; ".join(f"{k}: recorded {old.get(k)!r}, now {plan.get(k)!r}" for k in diff)
                raise ValueError(
                    f"{self.out} holds a run with other settings ({shown}); re-run with the recorded settings to "
                    "continue it, or choose another --out"
                )
            return old
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(plan, indent=2) + "\n")
        return plan

    def write_plan(self, plan: dict[str, Any]) -> None:
        """Record a plan value chosen after the first check (e.g. the epochs a budget allows)."""
        atomic_write_text(self.out / "plan.json", json.dumps(_jsonable(plan), indent=2) + "\n")

    def path(self, unit: str) -> Path:
        return self.units / f"{unit}.json"

    def done(self, unit: str) -> bool:
        return self.path(unit).is_file()

    def read(self, unit: str) -> dict[str, Any]:
        return json.loads(self.path(unit).read_text())

    def write(self, unit: str, result: dict[str, Any]) -> None:
        self.units.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(unit), json.dumps(_jsonable(result), indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# One training
# ----------------------------------------------------------------------------------------------------------------
def build(spec: ModelSpec, cfg: TrainConfig, splits: DataSplits, log: Log) -> nn.Module:
    """The model of `spec` for the data, with the data's normalisation and class names (as `vitkit train` sets)."""
    from vitkit.data.inference import eval_load_size
    from vitkit.models.base import Preprocess
    from vitkit.train.setup import build_model

    cfg = cfg.replace(model=spec.name, model_args={**cfg.model_args, **spec.args})
    model = build_model(cfg, splits.num_classes, log)
    model.preprocess = Preprocess(
        mean=splits.mean,
        std=splits.std,
        input_size=tuple(model.preprocess.input_size),
        crop_fraction=cfg.crop_fraction,
        interpolation=cfg.interpolation,
        class_names=list(splits.class_names),
        load_size=eval_load_size({"data": cfg.data, "load_size": cfg.load_size}),
    )
    return model


def fitted_batch_size(cfg: TrainConfig, n_train: int) -> int:
    """The batch size a unit trains with: the config's, or the whole subset when that is smaller (one step/epoch)."""
    if n_train < 1:
        raise ValueError("a training subset is empty; raise the fraction or use more data")
    return min(cfg.batch_size, n_train)


def run_training(
    spec: ModelSpec,
    cfg: TrainConfig,
    splits: DataSplits,
    train_ds: ImageDataset,
    run_dir: Path,
    log: Log,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `spec` on `train_ds` (validating on splits.val), continuing run_dir/last when a killed run left one.

    Returns:
        (the model with its best/ weights loaded, {test_acc, best_val_acc, best_epoch, epochs, steps, n_train,
        batch_size, train_time_s, resumed})
    """
    from vitkit.train.checkpoint import has_checkpoint, load_weights_into, read_training_state
    from vitkit.train.loader import BatchLoader
    from vitkit.train.trainer import Trainer, seed_everything

    batch = fitted_batch_size(cfg, len(train_ds))
    cfg = cfg.replace(batch_size=batch, model=spec.name, model_args={**cfg.model_args, **spec.args})
    seed_everything(cfg.seed)  # the same init for a model whatever ran before it in this process
    model = build(spec, cfg, splits, log)
    state = None
    if has_checkpoint(run_dir / "last"):
        state = read_training_state(run_dir / "last")
        load_weights_into(model, run_dir / "last")
        log(f"  resuming {run_dir} from epoch {int(state['epoch']) + 1}, step {state['step']}")
    device_loaders = dict(seed=cfg.seed)
    train_loader = BatchLoader(train_ds, batch, shuffle=True, drop_last=True, **device_loaders)
    val_loader = BatchLoader(splits.val, 256, **device_loaders) if len(splits.val) else None
    test_loader = BatchLoader(splits.test, 256, **device_loaders) if len(splits.test) else None
    # The same `training` record `vitkit train` writes, so eval / predict / explain find the data and its split.
    from vitkit.train.setup import make_training_record

    record = make_training_record(cfg, run_dir, torch.get_num_threads())
    trainer = Trainer(model, config=cfg, run_dir=run_dir, log=log, checkpoint_extra={"training": record})
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer.train(train_loader, val_loader, resume_state=state)
    if trainer.best.get("epoch") is None:  # no validation split: the final weights are the best known
        trainer.save("best")
    load_weights_into(model, resolve_dir(run_dir / "best"), map_location=trainer.device)
    test = trainer.evaluate(test_loader) if test_loader is not None else {}
    hist = trainer.history.epochs
    best_epoch = trainer.best.get("epoch")
    result = {
        "test_acc": test.get("acc"),
        "test_images": int(test.get("n", 0)),
        "best_val_acc": hist[best_epoch - 1].get("val_acc") if best_epoch else None,
        "best_epoch": best_epoch,
        "epochs": cfg.epochs,
        "steps": trainer.step,
        "n_train": len(train_ds),
        "batch_size": batch,
        "train_time_s": trainer.elapsed(),
        "wall_s_this_process": time.perf_counter() - t0,
        "resumed": state is not None,
        "val_acc_curve": [row.get("val_acc") for row in hist],
    }
    return model.eval(), result


def load_trained(spec: ModelSpec, cfg: TrainConfig, splits: DataSplits, run_dir: Path, log: Log) -> nn.Module:
    """The best/ weights of a finished training unit, in a freshly built model (eval mode)."""
    from vitkit.train.checkpoint import load_weights_into
    from vitkit.train.distributed import resolve_device

    model = build(spec, cfg.replace(model=spec.name), splits, log)
    load_weights_into(model, resolve_dir(run_dir / "best"))
    return model.to(resolve_device(cfg.device)).eval()


# ----------------------------------------------------------------------------------------------------------------
# Time estimate
# ----------------------------------------------------------------------------------------------------------------
# Fixed costs the step time does not cover, measured on 2 busy CPU cores with small models: per epoch, writing the
# last/ and best/ checkpoints; per unit, building the model, the curves figure and the test pass.
EPOCH_OVERHEAD_S = 0.5
UNIT_OVERHEAD_S = 3.0


def training_seconds(step_s: float, infer_img_s: float, n_train: int, n_val: int, batch: int, epochs: int) -> float:
    """Estimated seconds of one training unit: epochs x (steps x measured step time + one validation pass +
    EPOCH_OVERHEAD_S) + UNIT_OVERHEAD_S.

    Steps per epoch are floor(n_train / batch) (the last incomplete batch is dropped, as the Trainer does).
    """
    steps = max(1, n_train // batch)
    return epochs * (steps * step_s + n_val / max(infer_img_s, 1e-9) + EPOCH_OVERHEAD_S) + UNIT_OVERHEAD_S


def epochs_for_budget(budget_s: float, seconds_per_epoch: float, reserve_s: float) -> int:
    """The most epochs whose estimated training time fits `budget_s` minus `reserve_s` (at least 1, even when the
    budget is already spent)."""
    return max(1, int(math.floor((budget_s - reserve_s) / max(seconds_per_epoch, 1e-9))))


def check_budget(epochs: int | None, budget_minutes: float | None) -> None:
    """Raise a ValueError unless at most one of them is given, epochs a positive integer, the budget positive."""
    if epochs is not None and budget_minutes is not None:
        raise ValueError("give either epochs or budget_minutes, not both")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if budget_minutes is not None and not budget_minutes > 0:
        raise ValueError(f"budget_minutes must be positive, got {budget_minutes!r}")


def default_img_size(cfg: TrainConfig, splits: DataSplits, log: Log) -> TrainConfig:
    """`cfg` with img_size set to the data's own side when the recipe gives none, so every model sees the same
    resolution (native sizes differ: 32 px for the small ViTs, 224 px for ResNets and ConvNeXts)."""
    if cfg.img_size is not None:
        return cfg
    side = splits.train.image_size[0]
    log(f"img_size {side} px: the data's own (set img_size to change it)")
    return cfg.replace(img_size=side)


def format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def held_out(splits: DataSplits, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Up to `count` test images (uint8 (B, 3, H, W)), their labels and indices: a fixed seeded sample, the same
    for every model."""
    ds = splits.test if len(splits.test) else splits.val
    if len(ds) == 0:
        raise ValueError("the data has no test or validation images to probe the models on")
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[: min(count, len(ds))])
    images = torch.stack([ds[int(i)][0] for i in idx])
    labels = torch.tensor([int(ds[int(i)][1]) for i in idx])
    return images, labels, idx
