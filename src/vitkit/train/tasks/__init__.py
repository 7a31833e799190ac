"""Training objectives the Trainer's loop runs: a `Task` owns batch fields, loss, metrics and evaluation.

from vitkit.train.tasks import ClassificationTask, Task
Trainer(model, config=cfg, task=ClassificationTask())     # the default
Trainer(model, config=cfg.replace(teacher="runs/cnn", distillation="hard"))   # DistillationTask from the recipe
"""

from vitkit.train.tasks.base import Batch, Task, to_device
from vitkit.train.tasks.classification import ClassificationTask
from vitkit.train.tasks.distillation import DistillationTask, distillation_loss, load_teacher
from vitkit.train.tasks.mae import MAETask
from vitkit.train.tasks.segmentation import SegmentationTask
from vitkit.train.tasks.select import task_from_config

__all__ = [
    "Batch",
    "ClassificationTask",
    "DistillationTask",
    "MAETask",
    "SegmentationTask",
    "Task",
    "distillation_loss",
    "load_teacher",
    "task_from_config",
    "to_device",
]
