"""The Task interface: what a training run learns, apart from how the loop runs it.

The Trainer's loop owns everything that is the same for every objective: micro-batch accumulation, autocast,
DDP, EMA, the optimiser step and LR schedule, checkpoints and exact resume, signals, the progress bar, non-finite
checks, the best checkpoint and early stopping. A Task owns everything that depends on the objective: the fields
of a batch, the loss, the numbers summed per step and the metrics made from them, evaluation, the monitored
metric and the progress bar's numbers. Per micro-batch the loop does, with no other branch on the objective:

    batch = task.train_batch(raw)                 # loader output -> named fields on the device, augmented, mixed
    with autocast:
        out = task.forward(model, batch)
    loss = task.loss(out, batch)                  # float32 scalar, the mean over the micro-batch
    n = task.batch_size(batch)                    # samples, for means and images/s
    sums = task.train_sums(out, batch)            # additive numbers for the epoch, keys = task.train_sum_keys

and at the end of an epoch `task.train_metrics(sums)` gives the `train_*` columns; evaluation runs
`eval_batch` -> `forward` -> `eval_sums` over a loader and `eval_metrics` turns the sums (summed over processes)
into the `val_*` / `ema_*` columns. Sums rather than lists keep DDP to one all-reduce.

A metric that is not a sum of per-batch numbers (detection's mAP ranks every detection of the whole split) sets
`collects = True`: evaluation then also calls `eval_collect(out, batch)` per batch, which returns a list of
picklable per-sample results (e.g. numpy boxes and scores); the lists of all processes are gathered onto every
process (`all_gather_object`, rank order) and passed as `eval_metrics(sums, collected)`. Tasks that leave
`collects` False are called exactly as before, `eval_metrics(sums)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vitkit.train.config import TrainConfig

Batch = dict[str, Tensor]  # named fields, e.g. {"image": (B, C, H, W), "label": (B,)}


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> Batch:
    """Every field on `device` (asynchronously from pinned memory on CUDA)."""
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) for k, v in batch.items()}


class Task:
    """Base class of training objectives (see the module docstring for the order the loop calls these in).

    Attributes:
        metrics: names of what `eval_metrics` reports besides "n"; the columns are `val_<name>` / `ema_<name>`.
        monitor: the monitored column this task suggests for the best checkpoint and early stopping.
        train_sum_keys: the keys `train_sums` returns, in a fixed order (they are all-reduced as one list).
        eval_sum_keys: the keys `eval_sums` returns, in a fixed order.
        log_metrics: the row columns the end-of-epoch log line shows after `train_loss`.
        collects: whether evaluation gathers `eval_collect` results for `eval_metrics` (see the module docstring).
    """

    metrics: tuple[str, ...] = ("loss",)
    monitor: str = "val_loss"
    train_sum_keys: tuple[str, ...] = ()
    eval_sum_keys: tuple[str, ...] = ("loss",)
    log_metrics: tuple[str, ...] = ("val_loss", "ema_loss")
    collects: bool = False

    # --- wiring ------------------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this task cannot train (called when the Trainer is built). Default: accept any."""

    def setup(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        """Build what depends on the model, the recipe and the device (transforms, mixing). Called at the start
        of every `Trainer.train` and before an evaluation that comes first. Must not draw random numbers: the run
        is seeded after it."""

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger value of `metric` (a name from `metrics`, without prefix) is an improvement."""
        return not metric.endswith("loss")

    # --- batches -----------------------------------------------------------------------------------------------
    def train_batch(self, raw: Any) -> Batch:
        """What a training loader yielded -> fields on the device, augmented and mixed."""
        raise NotImplementedError

    def eval_batch(self, raw: Any) -> Batch:
        """What an evaluation loader yielded -> fields on the device, preprocessed deterministically."""
        raise NotImplementedError

    def batch_size(self, batch: Batch) -> int:
        """Samples in a batch (for means and images/s). Default: the length of the first field."""
        return len(next(iter(batch.values())))

    # --- training ----------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """The model's output for a batch; runs under the loop's autocast. Default: `model(batch["image"])`."""
        return model(batch["image"])

    def loss(self, out: Any, batch: Batch) -> Tensor:
        """The training loss, a float32 scalar: the mean over the micro-batch (the loop divides it by the
        accumulation group's size). Runs outside autocast."""
        raise NotImplementedError

    def train_sums(self, out: Any, batch: Batch) -> dict[str, float]:
        """Additive numbers of one training micro-batch (keys = `train_sum_keys`), run under no_grad."""
        return {}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """The epoch's `train_<name>` columns besides train_loss from summed `train_sums` (+ "seen", the samples)."""
        return {}

    def progress(self, sums: Mapping[str, float]) -> dict[str, str]:
        """Extra progress-bar fields from the running sums of the epoch (+ "seen"). The loop shows loss, lr, img/s."""
        return {}

    # --- evaluation --------------------------------------------------------------------------------------------
    def eval_sums(self, out: Any, batch: Batch) -> dict[str, float]:
        """Additive numbers of one evaluation batch (keys = `eval_sum_keys`; the loop adds "n", the samples)."""
        raise NotImplementedError

    def eval_collect(self, out: Any, batch: Batch) -> list[Any]:
        """Picklable per-sample results of one evaluation batch for metrics that are not sums; called only when
        `collects` is True (then it must be overridden)."""
        raise NotImplementedError

    def eval_metrics(self, sums: Mapping[str, float], collected: list[Any] | None = None) -> dict[str, Any]:
        """Metrics from the sums over the whole loader and all processes (with "n"), e.g. {"loss", "n"}; with
        `collects`, also from `collected`: every `eval_collect` result of every process.

        A metric that does not apply (e.g. top-5 with 5 classes or fewer) is None and is left out of the history.
        """
        raise NotImplementedError

    # --- after each epoch (rank 0, after the checkpoints) ---------------------------------------------------------
    def end_epoch(self, model: nn.Module, epoch: int, run_dir: Path | None) -> None:
        """Write the task's own outputs of `epoch` (1-based) into `run_dir`, e.g. MAE's reconstruction figures.
        Must not draw global random numbers (the run's RNG state was just saved). Default: nothing."""
