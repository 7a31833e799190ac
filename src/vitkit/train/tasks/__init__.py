"""Training objectives the Trainer's loop runs: a `Task` owns batch fields, loss, metrics and evaluation.

from vitkit.train.tasks import ClassificationTask, Task
Trainer(model, config=cfg, task=ClassificationTask())     # the default
"""

from vitkit.train.tasks.base import Batch, Task, to_device
from vitkit.train.tasks.classification import ClassificationTask

__all__ = ["Batch", "ClassificationTask", "Task", "to_device"]
