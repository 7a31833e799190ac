"""MAE pretraining on the trainer: the task (labels ignored, fixed evaluation masks, errors), unlabeled data, the
`vitkit pretrain` run with its figures, fine-tuning its encoder with `vitkit train --pretrained RUN`, and an exact
resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vitkit
from tests.train.conftest import SUBPROCESS_ENV, assert_same_bits, vitkit_cmd, weights
from vitkit.cli import main
from vitkit.data.files import BadImageWarning
from vitkit.data.unlabeled import load_unlabeled
from vitkit.models.mae import mae_from_vit
from vitkit.train.checkpoint import read_training_state
from vitkit.train.config import TrainConfig
from vitkit.train.evaluate import evaluate, predict
from vitkit.train.tasks import MAETask, task_from_config

TINY_MAE = dict(img_size=16, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2)  # fmt: skip
# 120 shapes at 16 px: 96 train images = 6 steps of 16 per epoch.
PRETRAIN = ["pretrain", "--data", "shapes:120", "--set", "shapes_size=16", "--img-size", "16", "--embed-dim", "32",
            "--depth", "2", "--num-heads", "2", "--decoder-depth", "1", "--decoder-embed-dim", "16",
            "--decoder-num-heads", "2", "--batch-size", "16", "--no-progress", "--threads", "1"]  # fmt: skip


def _tiny_mae(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return mae_from_vit("vit_nano_patch4_32", **{**TINY_MAE, **overrides})


def _ready_task(model, **cfg) -> MAETask:
    task = task_from_config(TrainConfig(task="mae", **cfg))
    assert isinstance(task, MAETask)
    task.setup(model, TrainConfig(task="mae", **cfg), torch.device("cpu"))
    return task


def test_labels_are_ignored_and_evaluation_masks_are_fixed():
    model = _tiny_mae().eval()
    task = _ready_task(model, seed=3)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    a = task.eval_batch((images, torch.tensor([0, 1, 2, 3, 4])))
    b = task.eval_batch({"image": images, "label": torch.zeros(5, dtype=torch.long)})
    c = task.eval_batch(images)
    assert (
        sorted(a) == ["image", "noise"] and torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
    )
    assert torch.equal(a["noise"], b["noise"])  # the same masks for every batch ...
    state = torch.get_rng_state()
    with torch.no_grad():
        out1, out2 = task.forward(model, a), task.forward(model, b)
    assert torch.equal(torch.get_rng_state(), state)  # ... drawn without touching the training's random stream
    assert torch.equal(out1.mask, out2.mask) and out1.loss.item() == out2.loss.item()
    assert task.eval_sums(out1, a)["loss"] == pytest.approx(5 * out1.loss.item())
    assert task.eval_metrics({"loss": 10.0, "n": 4}) == {"loss": 2.5, "n": 4}
    assert not torch.equal(_ready_task(model, seed=4).eval_noise(5), a["noise"])  # the seed chooses them
    # Training masks come from the global generator (saved in checkpoints).
    train = task.train_batch((images, torch.zeros(5)))
    assert sorted(train) == ["image"] and train["image"].dtype == torch.float32
    torch.manual_seed(0)
    m1 = task.forward(model, train).mask
    torch.manual_seed(0)
    assert torch.equal(task.forward(model, train).mask, m1)
    assert not torch.equal(task.forward(model, train).mask, m1)


def test_task_errors_name_the_problem(tmp_path):
    from vitkit.train.pretrain import pretrain

    vit = vitkit.create_model("vit_nano_patch4_32", img_size=16, depth=1)
    with pytest.raises(ValueError, match="MAE pretraining needs a masked autoencoder"):
        MAETask().check_model(vit)
    with pytest.raises(ValueError, match="mixup=0.2 / cutmix=0.0: image mixing has no meaning for MAE"):
        MAETask().setup(_tiny_mae(), TrainConfig(task="mae", mixup=0.2), torch.device("cpu"))
    with pytest.raises(ValueError, match="figures_every must be an integer >= 0"):
        TrainConfig(task="mae", figures_every=-1)
    with pytest.raises(ValueError, match="pretrains with task='mae', but the settings ask for task='classify'"):
        pretrain({"task": "classify"})
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="is a 'vit' model; MAE pretraining continues from a masked autoencoder"):
        pretrain(
            {"data": "shapes:40", "shapes_size": 16, "pretrained": str(tmp_path / "vit"), "out": str(tmp_path / "r")}
        )
    assert not (tmp_path / "r").exists()  # refused before a run directory is made


def test_a_flat_image_folder_is_one_unlabeled_class(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(BadImageWarning, match="notes.txt: not an image file"):
        splits = load_unlabeled(str(tmp_path), load_size=16, val_fraction=0.2, test_fraction=0.1)
    assert splits.class_names == ["image"] and (len(splits.train), len(splits.val), len(splits.test)) == (7, 2, 1)
    assert splits.train.images.shape[1:] == (3, 16, 16)
    assert [p.endswith("notes.txt") for p, _ in splits.skipped] == [True]
    assert load_unlabeled("shapes:40", shapes_size=16).num_classes == 4  # any other spec: its labels, unused


def test_pretrain_writes_a_run_with_figures_and_its_encoder_fine_tunes(tmp_path, capsys):
    run = tmp_path / "mae"
    args = [*PRETRAIN, "--epochs", "2", "--figures-every", "1", "--mask-ratio", "0.5", "--norm-pix-loss"]
    assert main([*args, "--out", str(run)]) == 0
    out = capsys.readouterr()
    assert "test reconstruction loss" in out.out and "(labels ignored)" in out.err
    # The "outputs in RUN/:" line names every output the run holds, as train's does (it once left metrics.csv out);
    # config.yaml, the run's settings, is not an output.
    listed = next(line for line in out.out.splitlines() if line.startswith("outputs in ")).split(":", 1)[1]
    named = {name.strip().rstrip("/") for part in listed.split(",") for name in part.split()}
    assert named == {p.name for p in run.iterdir()} - {"config.yaml"}, listed
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"] == "mae" and config["model_args"]["mask_ratio"] == 0.5 and config["scale"] == [0.2, 1.0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 2 and summary["test_loss"] > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # it learns
    for epoch in (1, 2):
        png = run / "reconstructions" / f"epoch_{epoch:03d}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mae = vitkit.load_model(run)
    assert mae.family == "mae" and mae.cfg.norm_pix_loss and mae.cfg.mask_ratio == 0.5
    # Fine-tuning: the encoder's weights go into the ViT, the decoder is dropped, and the log says so.
    ft = tmp_path / "ft"
    ft_args = ["train", "--pretrained", str(run), "--data", "shapes:120", "--set", "shapes_size=16", "--epochs", "1",
               "--batch-size", "16", "--no-progress", "--threads", "1", "--lr", "1e-9", "--min-lr", "0",
               "--warmup-epochs", "0", "--out", str(ft)]  # fmt: skip
    assert main(ft_args) == 0
    assert "the decoder (" in capsys.readouterr().err
    vit = vitkit.load_model(ft)
    assert vit.family == "vit" and vit.num_classes == 4
    encoder = {k: v for k, v in mae.encoder.state_dict().items() if not k.startswith("head")}
    tuned = vit.state_dict()
    for k, v in encoder.items():  # lr 1e-9: one step moves the weights by ~1e-9 at most
        torch.testing.assert_close(tuned[k], v, atol=1e-6, rtol=0)


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    args = [*PRETRAIN, "--epochs", "2", "--ckpt-every-steps", "2", "--ema", "--figures-every", "1"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    victim = subprocess.Popen(vitkit_cmd(*args, "--out", str(run)), env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        state = run / "last" / "training_state.pt"
        deadline = time.monotonic() + 120
        while not state.exists():
            assert victim.poll() is None, f"the run ended before its first checkpoint: {victim.communicate()[1]}"
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.002)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    killed = read_training_state(run / "last")
    assert 0 < killed["step"] < 12 and killed["task"] == "MAETask"  # 6 steps per epoch, 2 epochs
    assert main([*args, "--out", str(ref)]) == 0
    assert main(["pretrain", "--resume", str(run), "--threads", "1"]) == 0
    assert_same_bits(weights(ref / "last"), weights(run / "last"))
    assert_same_bits(weights(ref / "best"), weights(run / "best"))
    assert_same_bits(read_training_state(ref / "last")["ema"], read_training_state(run / "last")["ema"])
    a, b = (read_training_state(d / "last")["history"] for d in (ref, run))
    assert [[r["train_loss"], r["val_loss"], r["ema_loss"]] for r in a] == [
        [r["train_loss"], r["val_loss"], r["ema_loss"]] for r in b
    ]


def test_eval_and_predict_refuse_an_mae_checkpoint_naming_what_to_use(tmp_path):
    # An MAE run has no classifier: eval used to fail with "the model only 0 outputs" and predict with an
    # AttributeError on MAEOutput.
    _tiny_mae().save_pretrained(tmp_path / "mae")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    with pytest.raises(ValueError, match=r"has no classifier \(family 'mae'.*vitkit probe --checkpoint"):
        evaluate(tmp_path / "mae", "shapes:40", threads=None)
    with pytest.raises(ValueError, match=r"has no classifier \(family 'mae'.*--pretrained"):
        predict(tmp_path / "mae", [image], threads=None)


def test_an_image_less_folder_is_named_as_such_for_pretraining(tmp_path):
    # It used to be told it "has no class subfolders", though a flat folder of images is what pretraining takes.
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"folder {tmp_path} has no image files .*a folder of images"):
        load_unlabeled(str(tmp_path))
