"""`TrainConfig`: every setting of a training run, loadable from a YAML recipe and saved into each run.

Precedence when the CLI builds a config: TrainConfig defaults < recipe file (`--config`) < command-line flags.
With no `--config`, `vitkit train` on the default data and model uses `DIGITS_RECIPE` (the same settings as
recipes/digits.yaml): it is tuned for 8x8 digits (16 px input, no flips), so it only applies when you have not
asked for other data or another model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitkit.data.shapes import MIN_SIDE
from vitkit.data.transforms import AutoAugmentPolicy as AutoAugment
from vitkit.data.transforms import check_range
from vitkit.models.base import Interpolation, check_literal, config_from_dict, config_to_dict
from vitkit.threads import ThreadSetting, check_threads

DEFAULT_MODEL = "vit_nano_patch4_32"  # a 1.2M-parameter ViT that trains on CPU in minutes
DEFAULT_SHAPES_SIZE = 64  # side of the procedural shapes / scenes when neither shapes_size nor img_size is given
Amp = Literal["none", "bf16", "fp16"]
Monitor = Literal[
    "val_acc", "val_loss", "ema_acc", "ema_loss", "val_miou", "ema_miou", "val_map50", "val_map", "ema_map50", "ema_map"
]
Parallel = Literal["ddp", "fsdp"]
Distillation = Literal["none", "soft", "hard"]
TaskName = Literal["classify", "segment", "detect", "mae"]
SegHeadName = Literal["linear", "segmenter", "unetr"]


@dataclass
class TrainConfig:
    """One training run. The defaults are a generic small-data ViT recipe (DeiT-style AdamW + cosine)."""

    # what is learned: image classes, per-pixel classes (segment), boxes (detect), or masked-autoencoder
    # pretraining without labels (mae: `model` names the ViT encoder, model_args also set the decoder and masking)
    task: TaskName = "classify"
    # segment: the head on the backbone (`model`): linear, segmenter (mask transformer), unetr (multi-depth decoder)
    seg_head: SegHeadName = "linear"
    seg_args: dict[str, Any] = field(default_factory=dict)  # segment: head config overrides, e.g. {decoder_depth: 1}
    dice_weight: float = 0.0  # segment: weight of a soft Dice term added to the pixel cross-entropy (0 = off)

    # --- data -------------------------------------------------------------------------------------------------
    data: str = "digits"  # a vitkit.data spec: digits, shapes[:N], a folder, csv:FILE, cifar10:DIR, mnist:DIR ...
    img_size: int | None = None  # training resolution; None = the model's native size (the pretrained one's)
    load_size: int | None = None  # decode size for file-based data (folders, CSV); None = the data default (224)
    batch_size: int = 128  # global batch: split evenly across DDP processes, so results do not depend on N
    workers: int = 0  # DataLoader worker processes for lazily decoded datasets (in-memory data needs none)
    val_fraction: float = 0.1  # share of each class held out for validation (model selection, early stopping)
    test_fraction: float = 0.1  # share held out for the final test (sources with an official test split ignore it)
    strict: bool = False  # fail on the first unreadable image instead of skipping and listing it in the summary
    # side of the procedural `shapes` / `scenes` images; None = img_size when given (at least 16 px, below which
    # shapes stop being recognisable), else 64. Resolved on construction, so config.yaml records the size drawn.
    shapes_size: int | None = None

    # --- model ------------------------------------------------------------------------------------------------
    model: str | None = None  # registered name (`vitkit models`); None = DEFAULT_MODEL, or the pretrained one's
    model_args: dict[str, Any] = field(
        default_factory=dict
    )  # architecture overrides, e.g. {depth: 4, drop_path_rate: 0.1}
    pretrained: str | None = None  # fine-tune from a checkpoint: vitkit dir, timm/HF file or dir, JAX .npz
    freeze_layers: int = 0  # fine-tuning: freeze embeddings + the first N blocks (0 = train everything)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    tome: int = 0  # token merging (ToMe): tokens merged per block while training and validating; 0 = off

    # --- optimisation -----------------------------------------------------------------------------------------
    epochs: int = 30  # passes over the training split
    lr: float = 1e-3  # peak learning rate for the whole (global) batch
    min_lr: float = 1e-5  # floor of the cosine decay
    weight_decay: float = 0.05  # AdamW decoupled decay (none on norms, biases, pos embed, prefix tokens)
    warmup_epochs: float = 2.0  # linear warmup length (fractions allowed, capped at the run); ViTs need one
    layer_decay: float | None = None  # layer-wise LR decay for fine-tuning (0.65-0.75 in BEiT/MAE); None = off
    head_lr_mult: float = 1.0  # LR factor on the classifier head (e.g. 10 for a fresh head on a frozen body)
    clip_grad: float | None = None  # clip the global gradient norm to this value; None = no clipping
    accum_steps: int = 1  # micro-batches per optimiser step (batch_size is per micro-batch)
    label_smoothing: float = 0.1  # as in DeiT; also applied to mixup targets

    # --- augmentation (on whole batches, on the training device) ----------------------------------------------
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range (ImageNet's; raise it for tiny images)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # crop aspect-ratio range
    hflip: float = 0.5  # horizontal flip probability (0 for digits/text)
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength
    auto_augment: AutoAugment = "none"  # RandAugment / TrivialAugment policy
    randaug_n: int = 2  # RandAugment: operations per image
    randaug_m: int = 9  # RandAugment: magnitude on timm's 0-10 scale
    random_erasing: float = 0.0  # probability of erasing a random rectangle (0.25 in DeiT)
    mixup: float = 0.0  # Mixup Beta alpha (0.8 in DeiT); 0 = off
    cutmix: float = 0.0  # CutMix Beta alpha (1.0 in DeiT); 0 = off
    mixup_prob: float = 1.0  # probability a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    crop_fraction: float = 0.875  # eval: resize to img_size / crop_fraction, centre crop (1.0 for tiny images)
    interpolation: Interpolation = "bicubic"  # resize filter in training and eval

    # --- knowledge distillation (DeiT; vitkit.train.tasks.distillation) -----------------------------------------
    teacher: str | None = None  # teacher checkpoint: a run or model dir, a timm/HF file or dir; None = no teacher
    teacher_model: str | None = None  # registered name for a teacher file whose layout does not say (a CNN .pth)
    distillation: Distillation = "none"  # hard: CE against the teacher's argmax (DeiT's best); soft: KL at tau
    distill_alpha: float = 0.5  # loss = (1 - alpha) * label loss + alpha * distillation loss (DeiT: 0.5)
    distill_tau: float = 1.0  # soft distillation temperature; the KL is scaled by tau^2 (DeiT: 1.0)

    # --- masked-autoencoder pretraining (task: mae; vitkit.train.tasks.mae) --------------------------------------
    figures_every: int = 5  # RUN_DIR/reconstructions/epoch_NNN.png every N epochs and after the last (0 = none)

    # --- runtime ----------------------------------------------------------------------------------------------
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...
    amp: Amp = "none"  # autocast: bf16 (CPU with AMX, or GPU) or fp16 (GPU only, with a GradScaler)
    compile: bool = False  # torch.compile the model (slow first steps; pays off on long GPU runs)
    # Under torchrun: ddp = a full replica per process; fsdp = FSDP2, parameters, gradients and optimiser state
    # sharded over the processes (for models that do not fit one device; docs/train.md says when to choose which).
    parallel: Parallel = "ddp"
    ema: bool = False  # keep an exponential moving average of the weights, evaluated alongside (ema_acc)
    ema_decay: float = 0.999  # EMA decay per optimiser step (warmed up as min(decay, (1+s)/(10+s)))
    threads: ThreadSetting = "auto"  # CPU intra-op threads: N, or auto = the CPUs idle at the start (vitkit.threads)
    seed: int = 0  # same seed + machine + thread count = same weights (pin `threads`)

    # --- run --------------------------------------------------------------------------------------------------
    out: str | None = None  # run directory; None = runs/<data>-<model>-<timestamp>
    ckpt_every_steps: int = 0  # also write RUN_DIR/last every N optimiser steps (0 = only at epoch ends)
    patience: int = 0  # early stopping: epochs without improvement of `monitor` before stopping (0 = off)
    monitor: Monitor = "val_acc"  # metric for the best checkpoint and early stopping (ema_* use the EMA weights)
    tensorboard: bool = False  # also write TensorBoard events to RUN_DIR/tensorboard
    progress: bool = True  # show a tqdm progress bar per epoch

    def __post_init__(self) -> None:
        # the crop ranges of every task's augmentation (classification, segmentation), checked before a transform is
        # built: kornia's own error speaks of tensors
        self.scale = check_range("scale", self.scale, upper=1.0)
        self.ratio = check_range("ratio", self.ratio)
        self.model_args = dict(self.model_args or {})
        self.seg_args = dict(self.seg_args or {})
        check_literal("amp", self.amp, Amp)
        check_literal("parallel", self.parallel, Parallel)
        check_literal("monitor", self.monitor, Monitor)
        check_literal("auto_augment", self.auto_augment, AutoAugment)
        check_literal("distillation", self.distillation, Distillation)
        check_literal("task", self.task, TaskName)
        check_literal("seg_head", self.seg_head, SegHeadName)
        if not self.dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")
        # Settings of one task given to another would be ignored without a word: refuse them by name.
        if self.task != "segment":
            for name, given in (("seg_head", self.seg_head != "linear"), ("seg_args", bool(self.seg_args)),
                                ("dice_weight", self.dice_weight != 0)):  # fmt: skip
                if given:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is for task='segment', not task={self.task!r}; drop it"
                    )
        if self.task != "detect" and "num_queries" in self.model_args:
            raise ValueError(
                f"num_queries={self.model_args['num_queries']!r} (in model_args) is for task='detect', not "
                f"task={self.task!r}; drop it"
            )
        check_literal("interpolation", self.interpolation, Interpolation)
        check_threads(self.threads)
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("accum_steps", self.accum_steps)
        if isinstance(self.tome, bool) or not isinstance(self.tome, int) or self.tome < 0:
            raise ValueError(f"tome must be an int >= 0 (tokens merged per block, 0 = off), got {self.tome!r}")
        if self.shapes_size is None:
            self.shapes_size = DEFAULT_SHAPES_SIZE if self.img_size is None else max(int(self.img_size), MIN_SIDE)
        _positive_int("shapes_size", self.shapes_size)
        for name in ("workers", "patience", "ckpt_every_steps", "freeze_layers", "seed", "figures_every"):
            _nonneg_int(name, getattr(self, name))
        for name in ("img_size", "load_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.teacher is not None and self.distillation == "none":
            raise ValueError(
                f"teacher={self.teacher!r} needs distillation: 'hard' (DeiT's best) or 'soft'; drop the teacher to "
                "train on labels alone"
            )
        if self.teacher_model is not None and self.teacher is None:
            raise ValueError(f"teacher_model={self.teacher_model!r} names the architecture of a teacher; give teacher")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not self.distill_tau > 0:
            raise ValueError(f"distill_tau must be > 0, got {self.distill_tau}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        if not self.head_lr_mult > 0:
            raise ValueError(f"head_lr_mult must be > 0, got {self.head_lr_mult}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 or null, got {self.clip_grad}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} (a Beta alpha) must be >= 0, got {getattr(self, name)}")
        for name in ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.parallel == "fsdp" and self.amp == "fp16":
            # fp16 needs a GradScaler whose inf/NaN check sees every shard's gradients; the plain one sees only
            # this process's shard, so processes could disagree on skipping a step and their weights diverge.
            raise ValueError("amp='fp16' cannot be used with parallel='fsdp'; use amp='bf16' (no scaler needed)")
        if self.parallel == "fsdp" and self.tome:
            # Merging runs a block's parts (norm, qkv, projection) outside the block's forward, where FSDP gathers
            # the block's parameters: the parts would see shards.
            raise ValueError(
                f"tome={self.tome} cannot be used with parallel='fsdp'; train with tome=0 (merge at inference)"
            )
        if self.monitor.startswith("ema_") and not self.ema:
            raise ValueError(f"monitor={self.monitor!r} needs ema: true")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} is not allowed; use auto, cpu, cuda, cuda:N or mps")

    # --- (de)serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing unknown keys by name (with the closest known names)."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ValueError(f"unknown training setting {key!r}{hint}; see docs/train.md for the full list")
        return config_from_dict(cls, dict(data))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def data_settings(self) -> dict[str, Any]:
        """The keyword arguments every data loader takes from a run's settings (`vitkit.data.load_data`,
        `load_detection_data`, `load_unlabeled`, ...): the split (seed, fractions), strictness and image sizes."""
        return dict(
            seed=self.seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            strict=self.strict,
            load_size=self.load_size,
            shapes_size=self.shapes_size,
        )

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _nonneg_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


# The default run (`vitkit train` with no arguments): a 6-block, 128-wide ViT on scikit-learn's digits upsampled
# to 16 px (4x4 patches of 4 px = 16 tokens + [CLS]). Kept identical to recipes/digits.yaml (a test checks it).
DIGITS_RECIPE: dict[str, Any] = {
    "data": "digits",
    "model": "vit_nano_patch4_32",
    "img_size": 16,
    "batch_size": 64,
    "epochs": 50,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "weight_decay": 0.05,
    "warmup_epochs": 2.0,
    "label_smoothing": 0.1,
    "scale": [0.8, 1.0],
    "ratio": [0.9, 1.1],
    "hflip": 0.0,
    "crop_fraction": 1.0,
    "interpolation": "bilinear",
    "amp": "none",
    "seed": 0,
}


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a dict of settings (validated by `TrainConfig.from_dict` when merged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def resolve_config(
    recipe: str | os.PathLike | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """TrainConfig defaults < recipe < overrides (None values in `overrides` mean "not given").

    Without a recipe, the digits recipe is the base when neither `data` (other than "digits") nor `model` is
    overridden, so `vitkit train` alone reproduces recipes/digits.yaml. `model_args` merge key by key (a recipe's
    `{depth: 4}` plus an override `{attn_layer: local}` gives both); every other setting is replaced.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if recipe is None:
        default_run = overrides.get("data", "digits") == "digits" and "model" not in overrides
        base = dict(DIGITS_RECIPE) if default_run else {}
    elif isinstance(recipe, dict):
        base = dict(recipe)
    else:
        base = load_recipe(recipe)
    if isinstance(base.get("model_args"), dict) and isinstance(overrides.get("model_args"), dict):
        overrides["model_args"] = {**base["model_args"], **overrides["model_args"]}
    merged = {**base, **overrides}
    if merged.get("task") == "segment" and "monitor" not in merged:
        merged["monitor"] = "ema_miou" if merged.get("ema") else "val_miou"  # a segmentation run's default
    if merged.get("task") == "detect" and "monitor" not in merged:
        merged["monitor"] = "ema_map50" if merged.get("ema") else "val_map50"  # a detection run's default
    return TrainConfig.from_dict(merged)
