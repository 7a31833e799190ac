"""Training: the Trainer loop, AdamW groups and schedule, resumable checkpoints, DDP, and whole runs.

from vitkit.train import Trainer, TrainConfig, train
summary = train()                                  # the digits default, as `vitkit train` runs it
summary = train("recipes/shapes.yaml")             # a recipe
history = Trainer(model, device="cpu").train(train_loader=tl, val_loader=vl, n_epochs=50, learning_rate=3e-4)
"""

from vitkit.data import get_data_loaders
from vitkit.train.checkpoint import has_checkpoint, read_training_state, write_checkpoint
from vitkit.train.config import DIGITS_RECIPE, TrainConfig, load_recipe, resolve_config
from vitkit.train.distributed import DistInfo, init_distributed
from vitkit.train.evaluate import evaluate, load_checkpoint, predict, resolve_checkpoint
from vitkit.train.loader import BatchLoader, epoch_permutation
from vitkit.train.metrics import History
from vitkit.train.optim import WarmupCosine, freeze_backbone, param_groups, setup_optimizer_groups
from vitkit.train.run import train
from vitkit.train.tasks import ClassificationTask, Task
from vitkit.train.trainer import ModelEma, NonFiniteLossError, Trainer, TrainingInterrupted

__all__ = [
    "DIGITS_RECIPE",
    "BatchLoader",
    "ClassificationTask",
    "DistInfo",
    "History",
    "ModelEma",
    "NonFiniteLossError",
    "Task",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "WarmupCosine",
    "epoch_permutation",
    "evaluate",
    "get_data_loaders",
    "freeze_backbone",
    "has_checkpoint",
    "init_distributed",
    "load_checkpoint",
    "load_recipe",
    "param_groups",
    "predict",
    "read_training_state",
    "resolve_checkpoint",
    "resolve_config",
    "setup_optimizer_groups",
    "train",
    "write_checkpoint",
]
