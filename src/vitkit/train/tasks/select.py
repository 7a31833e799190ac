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
    transforms). task="detect": `DetectionTask` (DETR's set criterion and COCO mAP) with DETR's loss weights.

    Raises:
        ValueError: distillation is on but no teacher is named (give one, or pass a DistillationTask); a task this
            version cannot train.
    """
    if config.task == "detect":
        from vitkit.train.tasks.detection import DetectionTask

        return DetectionTask()
    if config.task != "classify":
        raise ValueError(f"task={config.task!r} is not available in this version of vitkit; use task='classify'")
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
