"""The loop has no classification assumptions: a task with no labels at all (reconstruct the image) trains through
the same loop, with accumulation, EMA, checkpoints and an exact mid-epoch resume; and the classification task's
own rules (top-5 only with more than 5 classes, monitor must be one of the task's metrics)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.train.conftest import assert_same_bits, tiny_model, toy_dataset, weights
from vitkit.train import BatchLoader, TrainConfig, Trainer, TrainingInterrupted, epoch_permutation
from vitkit.train.checkpoint import load_weights_into, read_training_state
from vitkit.train.tasks import Batch, ClassificationTask, Task


class Reconstruct(Task):
    """A toy objective with no labels: the model's output (B, 3*8*8) should reproduce its input image.

    Random horizontal flips drawn from the global RNG stand in for augmentation, so an exact resume must restore
    the RNG state as it does for classification. `signal_at` sends SIGTERM during that training batch.
    """

    metrics = ("loss", "mae")
    monitor = "val_loss"
    train_sum_keys = ("abs_err",)
    eval_sum_keys = ("loss", "abs_err")
    log_metrics = ("train_mae", "val_loss", "val_mae", "ema_loss")

    def __init__(self, signal_at: int | None = None) -> None:
        self.signal_at, self.calls = signal_at, 0

    def setup(self, model: nn.Module, config: Any, device: torch.device) -> None:
        self.device = device

    def train_batch(self, raw: Tensor) -> Batch:
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x = raw.to(self.device)
        flip = torch.rand(len(x)) < 0.5
        return {"image": torch.where(flip[:, None, None, None], x.flip(-1), x)}

    def eval_batch(self, raw: Tensor) -> Batch:
        return {"image": raw.to(self.device)}

    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(out.float(), batch["image"].flatten(1))

    def train_sums(self, out: Tensor, batch: Batch) -> dict[str, float]:
        return {"abs_err": float((out.float() - batch["image"].flatten(1)).abs().mean(1).sum())}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"mae": sums["abs_err"] / sums["seen"]}

    def eval_sums(self, out: Tensor, batch: Batch) -> dict[str, float]:
        err = out.float() - batch["image"].flatten(1)
        return {"loss": float(err.pow(2).mean(1).sum()), "abs_err": float(err.abs().mean(1).sum())}

    def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, Any]:
        n = sums["n"]
        return {"loss": sums["loss"] / n, "mae": sums["abs_err"] / n, "n": int(n)}


class ImagesOnly:
    """Batches of bare float images (no labels), in an order that is a function of (seed, epoch): resumable."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(123)
        self.images = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def iter_from(self, start: int) -> Iterator[Tensor]:
        n = len(self.images)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        for b in range(start, len(self)):
            yield self.images[order[b * self.batch_size : (b + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[Tensor]:
        return self.iter_from(0)


# 7 micro-batches of 8 per epoch in groups of 2: 4 optimiser steps, the last one a single micro-batch.
TOY = dict(
    epochs=3,
    lr=3e-3,
    warmup_epochs=0.5,
    weight_decay=0.01,
    accum_steps=2,
    ema=True,
    ema_decay=0.9,
    ckpt_every_steps=3,
    monitor="val_loss",
    progress=False,
)


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return tiny_model(num_classes=3 * 8 * 8)  # the "head" regresses the 192 pixel values


def _no_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s", "elapsed_s")} for row in history]


def test_a_task_without_labels_trains_and_resumes_exactly(tmp_path):
    val = ImagesOnly(24, 12, shuffle=False)

    ref_model = _toy_model()
    ref = Trainer(ref_model, "cpu", TrainConfig(**TOY), run_dir=tmp_path / "ref", task=Reconstruct())
    history = ref.train(ImagesOnly(56, 8), val)
    # The toy objective's own columns, and none of classification's.
    assert set(history.keys()) >= {"train_loss", "train_mae", "val_loss", "val_mae", "ema_loss", "ema_mae"}
    assert not any("acc" in k or "top5" in k for k in history.keys())
    assert history["step"] == [4, 8, 12]
    assert history["val_loss"][-1] < history["val_loss"][0] and history["train_loss"][-1] < history["train_loss"][0]
    assert set(ref.evaluate(val)) == {"loss", "mae", "n"} and ref.evaluate(val)["n"] == 24
    best = read_training_state(tmp_path / "ref" / "best")
    assert best["best"]["value"] == min(history["val_loss"])  # lower loss is better: the task says so

    # The same run, stopped by SIGTERM in epoch 2 (micro-batch 10 of 21: mid-epoch, mid-run) and resumed.
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="after step 6"):
        Trainer(_toy_model(), "cpu", TrainConfig(**TOY), run_dir=run, task=Reconstruct(signal_at=10)).train(
            ImagesOnly(56, 8), val
        )
    state = read_training_state(run / "last")
    assert (state["epoch"], state["batches_done"], state["step"]) == (1, 4, 6)
    model = tiny_model(num_classes=3 * 8 * 8)
    load_weights_into(model, run / "last")
    trainer = Trainer(model, "cpu", TrainConfig(**TOY), run_dir=run, task=Reconstruct())
    resumed = trainer.train(ImagesOnly(56, 8), val, resume_state=state)

    assert_same_bits(weights(tmp_path / "ref" / "last"), weights(run / "last"))
    assert_same_bits(weights(tmp_path / "ref" / "best"), weights(run / "best"))
    assert_same_bits(ref.ema.state_dict(), trainer.ema.state_dict())
    assert _no_time(resumed.epochs) == _no_time(history.epochs)

    # A classification trainer refuses to continue the toy task's run.
    with pytest.raises(ValueError, match="the checkpoint is of a Reconstruct run; this trainer's task is Classif"):
        Trainer(tiny_model(), "cpu", TrainConfig(**TOY)).train(ImagesOnly(56, 8), resume_state=state)


def test_monitor_must_be_a_metric_of_the_task():
    cfg = TrainConfig(**{**TOY, "monitor": "val_acc"})
    with pytest.raises(ValueError, match=r"monitor='val_acc' is not a metric of Reconstruct.*'val_mae'.*'val_loss'"):
        Trainer(_toy_model(), "cpu", cfg, task=Reconstruct()).train(ImagesOnly(16, 8), ImagesOnly(8, 8))


def test_transforms_go_to_the_task_not_beside_it():
    with pytest.raises(TypeError, match="with task=Reconstruct"):
        Trainer(_toy_model(), "cpu", TrainConfig(**TOY), task=Reconstruct(), train_transform=nn.Identity())


def test_classification_refuses_a_model_without_classes():
    with pytest.raises(ValueError, match="the model has no classifier head"):
        Trainer(tiny_model(num_classes=0), "cpu", TrainConfig(progress=False))
    with pytest.raises(TypeError, match=r"must yield \(images, labels\)"):
        task = ClassificationTask()
        task.setup(tiny_model(), TrainConfig(), torch.device("cpu"))
        task.train_batch(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("num_classes", [3, 6])
def test_top5_only_with_more_than_5_classes(tmp_path, num_classes):
    from vitkit.models.base import Preprocess

    ds = toy_dataset(48, num_classes=num_classes)
    model = tiny_model(num_classes=num_classes)
    model.preprocess = Preprocess(mean=(0.3,) * 3, std=(0.3,) * 3, input_size=(8, 8), crop_fraction=1.0)
    cfg = TrainConfig(epochs=1, lr=1e-3, ema=True, progress=False, scale=(1.0, 1.0), hflip=0.0, crop_fraction=1.0)
    trainer = Trainer(model, "cpu", cfg, run_dir=tmp_path)
    history = trainer.train(BatchLoader(ds, 16, shuffle=True, drop_last=True), BatchLoader(ds, 48))
    top5 = trainer.evaluate(BatchLoader(ds, 48))["top5"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    if num_classes <= 5:  # top-5 of 3 classes is always 1.0: not a measurement, so not reported anywhere
        assert top5 is None
        assert not any("top5" in k for k in [*history.keys(), *rows[0], *header])
    else:
        assert 0.0 < top5 <= 1.0 and history["val_top5"] == [top5]  # val = the same loader, same weights
        assert {"val_top5", "ema_top5"} <= set(rows[0]) and {"val_top5", "ema_top5"} <= set(header)
