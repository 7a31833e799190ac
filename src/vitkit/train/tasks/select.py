"""Which Task a recipe asks for: `TrainConfig.task` picks the objective, a teacher turns classification into
distillation."""

from __future__ import annotations

from torch import nn

from vitkit.train.config import TrainConfig
from vitkit.train.tasks.base import Task
from vitkit.train.tasks.classification import ClassificationTask
from vitkit.train.tasks.distillation import DistillationTask, LogFn


def task_from_config(
    config: TrainConfig,
    train_transform: nn.Module | None = None,
    eval_transform: nn.Module | None = None,
    log: LogFn | None = None,
) -> Task:
    """The task a recipe describes.

    task="classify": `DistillationTask` when the recipe names a teacher, else `ClassificationTask` (with the given
    transforms). task="mae": `MAETask` (masked-autoencoder pretraining, labels ignored). task="segment":
    `SegmentationTask` (cross-entropy + the recipe's `dice_weight`).
    task="detect": `DetectionTask` (DETR's set criterion and COCO mAP) with DETR's loss weights.

    Raises:
        ValueError: distillation is on but no teacher is named (give one, or pass a DistillationTask); a task this
            version cannot train.
    """
    if config.task == "mae":
        from vitkit.train.tasks.mae import MAETask

        if config.distillation != "none":
            raise ValueError("task='mae' learns without labels or a teacher; set distillation: none")
        return MAETask(train_transform, eval_transform)
    if config.task == "segment":
        if config.distillation != "none":
            raise ValueError(f"distillation={config.distillation!r} is for task='classify'; drop it for segmentation")
        from vitkit.train.tasks.segmentation import SegmentationTask

        return SegmentationTask(train_transform, eval_transform)
    if config.task == "detect":
        if config.distillation != "none":
            raise ValueError(f"distillation={config.distillation!r} is for task='classify'; drop it for detection")
        from vitkit.train.tasks.detection import DetectionTask

        return DetectionTask()
    if config.task != "classify":
        raise ValueError(f"unknown task {config.task!r}; allowed: classify, segment, detect, mae")
    if config.distillation != "none":
        if config.teacher is None:
            raise ValueError(
                f"distillation={config.distillation!r} needs a teacher: set teacher (a checkpoint) in the recipe, "
                "or give the Trainer task=DistillationTask(teacher_module)"
            )
        return DistillationTask.from_config(
            config, train_transform=train_transform, eval_transform=eval_transform, log=log
        )
    return ClassificationTask(train_transform, eval_transform)
