"""Training history, classification metrics, and the per-epoch metric files of a run directory."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitkit._io import atomic_write_text


def finite_or_none(value: float | None) -> float | None:
    """A metric for JSON: NaN (undefined: nothing was counted, e.g. mAP of a split without boxes) becomes None."""
    return None if value is None or math.isnan(value) else float(value)


class History:
    """Per-epoch metrics of a run, readable both ways.

    `history.epochs` is the list of per-epoch dicts: epoch, step, lr, train_loss, the task's train_* columns, its
    val_* / ema_* metrics, epoch_time_s, images_per_s, elapsed_s (for classification train_acc, val_loss, val_acc,
    val_top5 with more than 5 classes, ema_loss ...); `history["val_acc"]` is the list of one metric over the epochs
    (None where an epoch lacks it). Iterating yields the per-epoch dicts.
    """

    def __init__(self, epochs: list[dict[str, Any]] | None = None) -> None:
        self.epochs: list[dict[str, Any]] = [dict(e) for e in (epochs or [])]

    def append(self, row: dict[str, Any]) -> None:
        self.epochs.append(dict(row))

    def keys(self) -> list[str]:
        keys: dict[str, None] = {}
        for row in self.epochs:
            keys.update(dict.fromkeys(row))
        return list(keys)

    def __getitem__(self, key: str) -> list[Any]:
        if not isinstance(key, str):
            raise TypeError(f"index History by metric name (e.g. 'val_acc'), or use history.epochs[{key!r}]")
        if key not in self.keys():
            raise KeyError(f"no metric {key!r} in this history; metrics are {self.keys()}")
        return [row.get(key) for row in self.epochs]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.epochs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.epochs)

    def __repr__(self) -> str:
        last = self.epochs[-1] if self.epochs else {}
        shown = {k: last[k] for k in ("epoch", "train_loss", "val_acc") if k in last}
        return f"History({len(self)} epochs, last={shown})"

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.epochs]


# ----------------------------------------------------------------------------------------------------------------
# Classification metrics
# ----------------------------------------------------------------------------------------------------------------
def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many labels are among the top-k logits, for each k (k is capped at the number of classes)."""
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices  # (B, maxk)
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Run-directory files
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


def write_metric_files(run_dir: str | os.PathLike, history: History) -> None:
    """Write RUN_DIR/metrics.jsonl and metrics.csv (one row per epoch).

    Rewritten whole and atomically each epoch rather than appended: a run resumed from a checkpoint taken before
    the kill then never shows an epoch twice, and a reader never sees half a line.
    """
    run_dir = Path(run_dir)
    lines = "".join(json.dumps(row) + "\n" for row in history.epochs)
    atomic_write_text(run_dir / "metrics.jsonl", lines)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=history.keys(), lineterminator="\n")
    writer.writeheader()
    for row in history.epochs:
        writer.writerow({k: _fmt(row.get(k)) for k in history.keys()})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


class TensorBoardLogger:
    """Scalars to RUN_DIR/tensorboard when the `tensorboard` package is installed (a clear error when not)."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch imports tensorboard lazily; missing package surfaces here
            raise ValueError(
                "--tensorboard needs the tensorboard package: pip install tensorboard (or pip install 'vitkit[tensorboard]')"
            ) from e
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
