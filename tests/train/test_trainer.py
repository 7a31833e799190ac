"""The Trainer loop in-process: history, accumulation, EMA, AMP, early stopping, non-finite loss, signals."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
from torch import nn

from tests.train.conftest import tiny_model, toy_dataset
from vitkit.train import BatchLoader, ModelEma, NonFiniteLossError, TrainConfig, Trainer, TrainingInterrupted
from vitkit.train.checkpoint import has_checkpoint, read_training_state

FAST = dict(
    lr=3e-3,
    min_lr=0.0,
    warmup_epochs=0.0,
    weight_decay=0.0,
    label_smoothing=0.0,
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    hflip=0.0,
    crop_fraction=1.0,
    progress=False,
)


def _prepare(model: nn.Module, ds) -> nn.Module:
    from vitkit.models.base import Preprocess

    model.preprocess = Preprocess(
        mean=(0.3,) * 3, std=(0.3,) * 3, input_size=(8, 8), crop_fraction=1.0, class_names=ds.class_names
    )
    return model


def _loaders(ds, batch_size=16, seed=0):
    return BatchLoader(ds, batch_size, shuffle=True, drop_last=True, seed=seed), BatchLoader(ds, 64)


def test_trainer_learns_and_history_reads_both_ways():
    ds = toy_dataset(96)
    model = _prepare(tiny_model(num_classes=2), ds)
    trainer = Trainer(model, device="cpu", config=TrainConfig(**FAST))
    history = trainer.train(*_loaders(ds), n_epochs=4, learning_rate=3e-3)  # the tutorial's call
    assert len(history) == 4 and history["epoch"] == [1, 2, 3, 4]
    assert history["val_acc"] == [row["val_acc"] for row in history.epochs]
    assert history["val_acc"][-1] == 1.0  # a trivially separable task
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history.epochs[-1]["step"] == 4 * (96 // 16)
    assert {"lr", "val_loss", "epoch_time_s", "images_per_s"} <= set(history.keys())
    assert "val_top5" not in history  # 2 classes: top-5 would always be 1.0, so it is not reported
    with pytest.raises(KeyError, match="no metric 'nope'"):
        history["nope"]


def test_throughput_counts_the_training_loop_only(monkeypatch):
    """The run's img/s (summary.json) is the training loop's: a slow validation does not lower it."""
    import time

    ds = toy_dataset(64)
    model = _prepare(tiny_model(num_classes=2), ds)
    trainer = Trainer(model, device="cpu", config=TrainConfig(**FAST))
    evaluate = trainer.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.3)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    assert trainer.train_images_per_s() is None  # no epoch yet
    trainer.train(*_loaders(ds), n_epochs=2)
    loop_s = sum(trainer.history["epoch_time_s"])
    assert trainer.images_seen == 2 * 64
    assert trainer.train_images_per_s() == pytest.approx(128 / loop_s)
    assert trainer.elapsed() > loop_s + 0.6  # both validations slept, outside the loop's time


def test_accumulation_equals_a_bigger_batch():
    """2 micro-batches of 16 per step == one batch of 32 (no dropout, no augmentation randomness)."""
    ds = toy_dataset(64)
    results = []
    for bs, accum in ((32, 1), (16, 2)):
        torch.manual_seed(0)
        model = _prepare(tiny_model(num_classes=2), ds)
        cfg = TrainConfig(**FAST, accum_steps=accum, epochs=2)
        train_loader = BatchLoader(ds, bs, shuffle=False, drop_last=True)
        Trainer(model, "cpu", cfg).train(train_loader, None)
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


def test_ema_update_follows_the_formula():
    model = tiny_model(num_classes=2)
    ema = ModelEma(model, decay=0.9)
    old = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    ema.update(model, step=100)  # warmed-up decay min(0.9, 101/110) = 0.9
    torch.testing.assert_close(ema.module.head.weight, 0.9 * old + 0.1)
    ema.update(model, step=0)  # early steps: decay (1 + 0) / (10 + 0) = 0.1 follows the weights quickly
    torch.testing.assert_close(ema.module.head.weight, 0.1 * (0.9 * old + 0.1) + 0.9)


def test_ema_is_evaluated_and_best_holds_ema_weights(tmp_path):
    from tests.train.conftest import weights

    ds = toy_dataset(64)
    model = _prepare(tiny_model(num_classes=2), ds)
    cfg = TrainConfig(**FAST, ema=True, ema_decay=0.9, monitor="ema_acc", epochs=2)
    trainer = Trainer(model, "cpu", cfg, run_dir=tmp_path)
    history = trainer.train(*_loaders(ds))
    assert len(history["ema_acc"]) == 2 and all(0.5 <= v <= 1.0 for v in history["ema_acc"])
    assert not torch.equal(trainer.ema.module.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    # best/ holds the EMA weights of its epoch (they are also the EMA state saved next to them) ...
    best, best_state = weights(tmp_path / "best"), read_training_state(tmp_path / "best")
    assert torch.equal(best["blocks.0.attn.qkv.weight"], best_state["ema"]["blocks.0.attn.qkv.weight"])
    # ... while last/ holds the live weights, with the final EMA in its training state.
    last_state = read_training_state(tmp_path / "last")
    assert torch.equal(weights(tmp_path / "last")["head.weight"], model.head.weight.detach())
    assert torch.equal(last_state["ema"]["head.weight"], trainer.ema.module.head.weight)


def test_bf16_autocast_trains_on_cpu():
    ds = toy_dataset(64)
    model = _prepare(tiny_model(num_classes=2), ds)
    before = model.head.weight.detach().clone()
    history = Trainer(model, "cpu", TrainConfig(**FAST, amp="bf16", epochs=3)).train(*_loaders(ds))
    assert model.head.weight.dtype == torch.float32  # autocast keeps fp32 master weights
    assert not torch.equal(before, model.head.weight)
    assert history["val_acc"][-1] >= 0.9 and all(torch.isfinite(torch.tensor(history["train_loss"])))


def test_bf16_on_a_cpu_without_native_bf16_warns_and_not_with_it(native_bf16, monkeypatch):
    import importlib
    import warnings

    from vitkit.train.trainer import amp_dtype

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # native_bf16: no warning
        assert amp_dtype("none", torch.device("cpu")) is None
    monkeypatch.setattr(importlib.import_module("vitkit.cpu"), "NATIVE_BF16", False)
    monkeypatch.setattr(importlib.import_module("vitkit.train.trainer"), "is_x86", lambda: True)
    with pytest.warns(UserWarning, match=r"amp='bf16' on a CPU without native bf16.*amp='none' \(fp32\) is faster"):
        assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp_dtype("bf16", torch.device("cpu"), warn=False)  # run.py's early check: the Trainer warns, once
        monkeypatch.setattr(importlib.import_module("vitkit.train.trainer"), "is_x86", lambda: False)
        amp_dtype("bf16", torch.device("cpu"))  # ARM: the probe cannot tell, so no claim is made


def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        Trainer(tiny_model(), "cpu", TrainConfig(amp="fp16"))


def test_early_stopping_stops_after_patience(tmp_path):
    ds = toy_dataset(64)
    model = _prepare(tiny_model(num_classes=2), ds)
    # lr 1e-9: val_acc never rises above its first value, so patience 2 stops at epoch 3 of 10.
    cfg = TrainConfig(**{**FAST, "lr": 1e-9}, epochs=10, patience=2, monitor="val_acc")
    trainer = Trainer(model, "cpu", cfg, run_dir=tmp_path)
    history = trainer.train(*_loaders(ds))
    assert len(history) == 3
    assert trainer.best["stopped_early"] and trainer.best["epoch"] == 1
    assert read_training_state(tmp_path / "last")["finished"]


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    ds = toy_dataset(64)
    model = _prepare(tiny_model(num_classes=2), ds)
    calls = {"n": 0}

    def poison(module, args, output):  # NaN logits from the 7th forward pass on (step 7, epoch 2)
        calls["n"] += module.training
        return output * float("nan") if calls["n"] >= 7 and module.training else output

    model.head.register_forward_hook(poison)
    cfg = TrainConfig(**FAST, epochs=3, ckpt_every_steps=5)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7 \(epoch 2, batch 3 of 4\)") as info:
        Trainer(model, "cpu", cfg, run_dir=tmp_path).train(*_loaders(ds))
    assert info.value.step == 7
    state = read_training_state(tmp_path / "last")
    assert state["step"] == 5  # the last good checkpoint survives; nothing NaN was written
    from tests.train.conftest import weights

    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "last").values())


class _SignalAt(nn.Module):
    """A train transform that sends this process a signal during the n-th batch (then behaves like `inner`)."""

    def __init__(self, inner: nn.Module, at: int, signum: int) -> None:
        super().__init__()
        self.inner, self.at, self.signum, self.calls = inner, at, signum, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return self.inner(x)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_and_writes_last(tmp_path, signum):
    from vitkit.data.transforms import EvalTransform

    ds = toy_dataset(64)
    model = _prepare(tiny_model(num_classes=2), ds)
    tf = _SignalAt(EvalTransform(8, (0.3,) * 3, (0.3,) * 3, 1.0), at=6, signum=signum)
    handler_before = signal.getsignal(signum)
    cfg = TrainConfig(**FAST, epochs=3, accum_steps=2)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signal.Signals(signum).name} after step 3") as info:
        Trainer(model, "cpu", cfg, run_dir=tmp_path, train_transform=tf).train(*_loaders(ds))
    assert info.value.exit_code == 128 + signum
    assert has_checkpoint(tmp_path / "last")
    state = read_training_state(tmp_path / "last")
    assert (state["step"], state["epoch"], state["batches_done"]) == (3, 1, 2)  # batch 6 = epoch 2, batch 2
    assert signal.getsignal(signum) is handler_before  # the trainer's handlers are removed again


def test_tutorial_flow_with_plain_dataloaders():
    """The user's tutorial call on vitkit.data's plain DataLoaders (replayed, not resumable mid-epoch)."""
    import vitkit
    from vitkit.train import get_data_loaders

    train_loader, val_loader = get_data_loaders("digits", batch_size=32, seed=0)
    model = vitkit.create_model("vit_nano_patch4_32", num_classes=10, img_size=8, depth=1, embed_dim=32, num_heads=2)
    model.preprocess.crop_fraction = 1.0
    cfg = TrainConfig(progress=False, warmup_epochs=0.2, scale=(0.6, 1.0), hflip=0.0)
    history = Trainer(model, device="cpu", config=cfg).train(
        train_loader=train_loader, val_loader=val_loader, n_epochs=3, learning_rate=3e-3
    )
    assert history["epoch"] == [1, 2, 3] and history.epochs[-1]["step"] == 3 * len(train_loader)
    assert history["val_acc"][-1] > 0.5  # far above chance (0.1) after 3 epochs


def test_grad_checkpointing_gives_the_same_weights():
    ds = toy_dataset(32)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _prepare(tiny_model(num_classes=2), ds)
        Trainer(model, "cpu", TrainConfig(**FAST, epochs=1, grad_checkpointing=ckpt)).train(*_loaders(ds))
        assert model.grad_checkpointing is ckpt
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)


def test_absurd_lr_never_writes_non_finite_weights(tmp_path):
    ds = toy_dataset(64)
    model = _prepare(tiny_model(num_classes=2), ds)
    cfg = TrainConfig(**{**FAST, "lr": 1e30}, epochs=3, ckpt_every_steps=1)
    # Step 1 moves the weights by ~1e30 (still finite in fp32), so step 2's loss is NaN.
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 \(epoch 1, batch 2 of 4\)"):
        Trainer(model, "cpu", cfg, run_dir=tmp_path).train(*_loaders(ds))
    from tests.train.conftest import weights

    assert read_training_state(tmp_path / "last")["step"] == 1
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "last").values())


def test_tensorboard_events_and_clear_error_when_missing(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    ds = toy_dataset(32)
    model = _prepare(tiny_model(num_classes=2), ds)
    Trainer(model, "cpu", TrainConfig(**FAST, epochs=1, tensorboard=True), run_dir=tmp_path).train(*_loaders(ds))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        Trainer(model, "cpu", TrainConfig(**FAST, epochs=1, tensorboard=True), run_dir=tmp_path / "b").train(
            *_loaders(ds)
        )


def test_model_dependent_settings_fail_when_the_trainer_is_built(tmp_path):
    from torch import nn

    from tests.train.conftest import tiny_model
    from vitkit.train import TrainConfig, Trainer

    with pytest.raises(ValueError, match=r"freeze_layers=5 must be an integer in 0\.\.2"):
        Trainer(tiny_model(), "cpu", TrainConfig(freeze_layers=5))
    model = tiny_model()
    model.head = nn.Sequential(nn.Linear(model.embed_dim, 4), nn.ReLU(), nn.Linear(4, 10))
    with pytest.raises(ValueError, match="model.head is Sequential"):
        Trainer(model, "cpu", TrainConfig(), run_dir=tmp_path / "run")
    Trainer(model, "cpu", TrainConfig())  # without a run directory nothing is saved: allowed
