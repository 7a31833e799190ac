"""Segmentation training: metrics against scikit-learn and hand-made cases, the task's sums, the recipe rules, a tiny
`vitkit train --task segment` + eval + predict, and an exact resume of a run stopped mid-epoch."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score

from tests.train.conftest import assert_same_bits, run_vitkit, weights
from vitkit.train import TrainConfig, TrainingInterrupted, train
from vitkit.train.config import resolve_config
from vitkit.train.seg_metrics import (
    dice_per_class,
    foreground_iou,
    iou_per_class,
    mean_iou,
    seg_confusion_matrix,
    seg_metrics,
)
from vitkit.train.tasks import SegmentationTask, task_from_config
from vitkit.train.tasks.segmentation import soft_dice_loss


# --- metrics -------------------------------------------------------------------------------------------------------
def test_iou_and_dice_match_sklearn_on_flattened_masks_with_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 17, 13), generator=g)
    pred = torch.where(torch.rand(3, 17, 13, generator=g) < 0.6, target, torch.randint(0, 4, (3, 17, 13), generator=g))
    target[0, :5] = 255  # ignored pixels: left out whatever is predicted there
    cm = seg_confusion_matrix(pred, target, 4)
    keep = (target != 255).reshape(-1).numpy()
    t, p = target.reshape(-1).numpy()[keep], pred.reshape(-1).numpy()[keep]
    labels = list(range(4))
    assert np.allclose(iou_per_class(cm).numpy(), jaccard_score(t, p, labels=labels, average=None))
    assert np.allclose(dice_per_class(cm).numpy(), f1_score(t, p, labels=labels, average=None))
    assert math.isclose(mean_iou(cm), jaccard_score(t, p, labels=labels, average="macro"))
    assert int(cm.sum()) == keep.sum()
    # Binary foreground (classes 1-3) against background 0.
    assert math.isclose(foreground_iou(cm), jaccard_score(t > 0, p > 0))


def test_hand_made_masks():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 1]])
    cm = seg_confusion_matrix(pred, target, 4)
    # background: TP 3, FP 1 (a 2 predicted 0), FN 1 (a 0 predicted 1) -> 3/5; class 1: TP 4, FP 1 -> 4/5;
    # class 2: TP 2, FN 1 -> 2/3; class 3 occurs nowhere -> NaN and left out of the mean.
    iou = iou_per_class(cm)
    assert torch.allclose(iou[:3], torch.tensor([3 / 5, 4 / 5, 2 / 3], dtype=torch.float64))
    assert math.isnan(float(iou[3]))
    assert math.isclose(mean_iou(cm), (3 / 5 + 4 / 5 + 2 / 3) / 3)
    assert torch.allclose(dice_per_class(cm)[:3], torch.tensor([6 / 8, 8 / 9, 4 / 5], dtype=torch.float64))
    # Foreground: true object pixels 7, predicted object pixels 7, both 6 -> 6 / 8.
    assert math.isclose(foreground_iou(cm), 6 / 8)
    m = seg_metrics(cm, ["bg", "a", "b", "c"])
    assert m["per_class"]["c"] == {"iou": None, "dice": None, "pixels": 0}
    assert m["per_class"]["a"]["pixels"] == 4 and math.isclose(m["pixel_acc"], 9 / 11)


def test_confusion_matrices_of_parts_add_up_to_the_whole():
    g = torch.Generator().manual_seed(1)
    target, pred = torch.randint(0, 3, (4, 8, 8), generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)
    whole = seg_confusion_matrix(pred, target, 3)
    parts = seg_confusion_matrix(pred[:1], target[:1], 3) + seg_confusion_matrix(pred[1:], target[1:], 3)
    assert torch.equal(whole, parts)


def test_bad_metric_inputs_name_the_value():
    with pytest.raises(ValueError, match=r"target class 7 is outside 0..2"):
        seg_confusion_matrix(torch.zeros(2, 2), torch.full((2, 2), 7), 3)
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) differs from target shape \(2, 2\)"):
        seg_confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 2), 3)


def test_soft_dice_loss_is_zero_for_a_confident_right_answer_and_ignores_255():
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    logits[0, :, 1, 1] = torch.tensor([0.0, 0.0, 50.0])  # wrong where the pixel is ignored: does not count
    assert float(soft_dice_loss(logits, target)) < 1e-4
    assert float(soft_dice_loss(-logits, target)) > 0.5


# --- the task ------------------------------------------------------------------------------------------------------
def test_task_sums_give_the_metrics_of_the_whole_split():
    task = SegmentationTask()

    class M(torch.nn.Module):
        num_classes = 3

    task.check_model(M())
    task.device = torch.device("cpu")
    g = torch.Generator().manual_seed(2)
    logits, mask = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4, 6, 6), generator=g)
    a = task.eval_sums(logits[:2], {"mask": mask[:2]})
    b = task.eval_sums(logits[2:], {"mask": mask[2:]})
    sums = {k: a[k] + b[k] for k in task.eval_sum_keys} | {"n": 4}
    metrics = task.eval_metrics(sums)
    cm = seg_confusion_matrix(logits.argmax(1), mask, 3)
    assert math.isclose(metrics["miou"], mean_iou(cm))
    ce = torch.nn.functional.cross_entropy(logits, mask)
    assert math.isclose(metrics["loss"], float(ce), rel_tol=1e-5)
    assert set(task.eval_sum_keys) == {"loss", "pixels", *(f"cm_{i}_{j}" for i in range(3) for j in range(3))}


def test_recipe_rules_for_segmentation():
    assert isinstance(task_from_config(TrainConfig(task="segment", monitor="val_miou")), SegmentationTask)
    assert resolve_config(None, {"task": "segment", "data": "scenes"}).monitor == "val_miou"
    assert resolve_config(None, {"task": "segment", "data": "scenes", "ema": True}).monitor == "ema_miou"
    assert resolve_config(None, {"task": "segment", "data": "scenes", "monitor": "val_loss"}).monitor == "val_loss"
    with pytest.raises(ValueError, match=r"seg_head='fcn' is not allowed; choose one of 'linear', 'segmenter'"):
        TrainConfig(task="segment", seg_head="fcn")
    with pytest.raises(ValueError, match=r"distillation='hard' is for task='classify'; drop it for segmentation"):
        task_from_config(TrainConfig(task="segment", distillation="hard", teacher="runs/cnn"))


# --- whole runs ----------------------------------------------------------------------------------------------------
TINY_SEG = {
    "task": "segment",
    "data": "scenes:40",
    "shapes_size": 16,
    "model": "vit_nano_patch4_32",
    "model_args": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "seg_args": {"decoder_channels": 4},
    "seg_head": "unetr",
    "img_size": 16,
    "batch_size": 8,
    "epochs": 2,
    "lr": 2e-3,
    "warmup_epochs": 0.5,
    "scale": [0.5, 1.0],
    "label_smoothing": 0.0,
    "dice_weight": 0.5,
    "progress": False,
    "threads": 1,
}


def test_cli_train_eval_predict_end_to_end(tmp_path):
    import yaml

    recipe = tmp_path / "seg.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in TINY_SEG.items() if k not in ("task", "seg_head", "data")}))
    run = tmp_path / "run"
    r = run_vitkit("train", "--config", str(recipe), "--task", "segment", "--seg-head", "unetr", "--data",
                   "scenes:40", "--out", str(run))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "test mIoU" in r.stdout and "ViTUNet(vit_nano_patch4_32, head=unetr)" in r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["task"] == "segment" and summary["monitor"] == "val_miou"
    assert 0 <= summary["test_miou"] <= 1 and 0 <= summary["test_dice"] <= 1 and 0 <= summary["test_fg_iou"] <= 1
    assert set(summary["test_per_class"]) == {"background", "circle", "square", "triangle", "star"}
    assert summary["split_sizes"] == {"train": 32, "val": 4, "test": 4}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"val_miou", "val_fg_iou", "val_dice", "train_pixel_acc"} <= set(rows[0])

    # eval re-creates the run's own test split: the same numbers as the summary's.
    r = run_vitkit("eval", "--checkpoint", str(run), "--json", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["n"] == 4 and math.isclose(ev["miou"], summary["test_miou"], rel_tol=1e-6)
    assert ev["per_class"] == summary["test_per_class"]
    assert (tmp_path / "ev" / "eval.json").is_file()

    # predict: an overlay PNG and per-class pixel shares that sum to 1.
    from PIL import Image

    from vitkit.data.shapes import make_scenes

    images, _, _ = make_scenes(1, 16, 16, seed=5)
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "scene.png")
    r = run_vitkit("predict", "--checkpoint", str(run), str(tmp_path / "scene.png"), "--json",
                   "--out", str(tmp_path / "pred"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    assert set(res["shares"]) == set(summary["class_names"]) and math.isclose(sum(res["shares"].values()), 1.0)
    overlay = Image.open(res["overlay"])
    assert overlay.size[0] >= 16 and overlay.mode == "RGB"


def test_a_run_stopped_mid_epoch_and_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    cfg = {**TINY_SEG, "seg_head": "segmenter", "seg_args": {}, "ema": True, "ema_decay": 0.9, "ckpt_every_steps": 3,
           "epochs": 2, "hflip": 0.5}  # fmt: skip
    ref = train(cfg | {"out": str(tmp_path / "ref")}, log=lambda m: None)

    # The same run, stopped by SIGTERM at its 6th training batch (epoch 2 of 2, 4 batches per epoch) and resumed.
    calls = {"n": 0}
    original = SegmentationTask.train_batch

    def stop_at_6(self, raw):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, raw)

    monkeypatch.setattr(SegmentationTask, "train_batch", stop_at_6)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(cfg | {"out": str(run)}, log=lambda m: None)
    monkeypatch.setattr(SegmentationTask, "train_batch", original)
    resumed = train(resume=run, log=lambda m: None)

    assert_same_bits(weights(tmp_path / "ref" / "last"), weights(run / "last"))
    assert_same_bits(weights(tmp_path / "ref" / "best"), weights(run / "best"))
    assert resumed["test_miou"] == ref["test_miou"] and resumed["best_epoch"] == ref["best_epoch"]


def test_pretrained_classifier_run_gives_the_backbone_and_a_segmentation_checkpoint_continues(tmp_path):
    import vitkit
    from vitkit.train.seg_run import build_segmentation_model

    torch.manual_seed(0)
    classifier = vitkit.create_model(
        "vit_nano_patch4_32", num_classes=4, img_size=16, depth=1, embed_dim=32, num_heads=2
    )
    classifier.save_pretrained(tmp_path / "cls")
    cfg = TrainConfig(task="segment", monitor="val_miou", pretrained=str(tmp_path / "cls"), seg_head="segmenter")
    model = build_segmentation_model(cfg, 5, log=lambda m: None)
    assert type(model).__name__ == "ViTSegmentation" and model.num_classes == 5 and model.cfg.head == "segmenter"
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in classifier.state_dict().items() if not k.startswith("head"))

    model.save_pretrained(tmp_path / "seg")  # a segmentation checkpoint is taken whole when the classes agree
    again = build_segmentation_model(cfg.replace(pretrained=str(tmp_path / "seg")), 5, log=lambda m: None)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"segments 5 classes but the data has 3"):
        build_segmentation_model(cfg.replace(pretrained=str(tmp_path / "seg")), 3, log=lambda m: None)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.train.conftest import SUBPROCESS_ENV

    # No randomness in the step (full-image crops, no flips, no dropout) and no BatchNorm (the Segmenter head): the
    # only difference between 1 and 2 processes is the order of floating-point sums in the gradient all-reduce.
    cfg = {**TINY_SEG, "seg_head": "segmenter", "seg_args": {}, "epochs": 1, "scale": [1.0, 1.0], "ratio": [1.0, 1.0],
           "hflip": 0.0, "model_args": {**TINY_SEG["model_args"], "qkv_bias": False}, "device": "cpu"}  # fmt: skip
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitkit",
           "train", "--config", str(recipe), "--out", str(tmp_path / "ddp")]  # fmt: skip
    r = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = train({**cfg, "out": str(tmp_path / "one")}, log=lambda m: None)
    two, one = weights(tmp_path / "ddp" / "last"), weights(tmp_path / "one" / "last")
    # Adam turns rounding noise in near-zero gradients into parts of an lr-sized step (lr 2e-3): 1e-4 is 5% of one
    # step, far below what a wrong sharding (a missing or doubled half-batch) moves the weights.
    for k in one:
        a, b = two[k], one[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias shifts every score of a query by the same amount, which softmax removes: its gradient is
            # zero up to rounding, and Adam scales that noise to steps of the size of lr (the backbone drops its qkv
            # bias for this reason; the Segmenter head's blocks keep theirs). Compare the query and value parts.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["test_images"] == single["test_images"] == 4
    # The confusion matrix is summed over both processes: the same pixel counts as one process.
    assert {k: v["pixels"] for k, v in ddp["test_per_class"].items()} == {
        k: v["pixels"] for k, v in single["test_per_class"].items()
    }
    assert ddp["test_miou"] == pytest.approx(single["test_miou"], abs=1e-3)


def test_bf16_autocast_and_ema_train_a_segmenter(tmp_path):
    cfg = {**TINY_SEG, "seg_head": "linear", "seg_args": {}, "epochs": 1, "amp": "bf16", "ema": True}
    summary = train(cfg | {"out": str(tmp_path / "run")}, log=lambda m: None)
    assert summary["monitor"] == "ema_miou" and summary["best_is_ema"] and summary["amp"] == "bf16"
    assert 0 <= summary["test_miou"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[0]["train_loss"]) and "ema_miou" in rows[0]


def test_an_mae_run_gives_its_encoder_as_the_backbone(tmp_path):
    # Fine-tuning an MAE encoder for segmentation (the paper's ADE20K transfer) used to fail: the MAE module itself
    # was handed to the head, and it has no feature_info.
    from vitkit.models.mae import mae_from_vit
    from vitkit.train.seg_run import build_segmentation_model

    torch.manual_seed(0)
    mae = mae_from_vit("vit_nano_patch4_32", img_size=16, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                       decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    mae.save_pretrained(tmp_path / "mae")
    logs: list[str] = []
    cfg = TrainConfig(task="segment", pretrained=str(tmp_path / "mae"), seg_head="linear")
    model = build_segmentation_model(cfg, 5, logs.append)
    assert any("its decoder is dropped" in line for line in logs)
    encoder = mae.encoder.state_dict()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, encoder[k], rtol=0, atol=0)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5, 16, 16)
    model.save_pretrained(tmp_path / "seg")  # config.json can describe the encoder (a zoo ViT)
    from vitkit.weights import load_model

    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(load_model(tmp_path / "seg").eval()(x), model.eval()(x))


def test_a_folder_trained_model_evaluates_on_scenes(tmp_path):
    # A model trained on a mask folder records a decode size (load_size); evaluating it on scenes used to fail with
    # "load_size=24 does not apply to scenes", an option the user never gave.
    from vitkit.data.shapes import SCENE_CLASSES
    from vitkit.models.segmentation import ViTSegmentation
    from vitkit.train.seg_run import evaluate_segmentation

    torch.manual_seed(0)
    model = ViTSegmentation("vit_nano_patch4_32", len(SCENE_CLASSES), backbone_args={"img_size": 16})
    model.preprocess.load_size, model.preprocess.class_names = 24, list(SCENE_CLASSES)
    model.save_pretrained(tmp_path / "seg")
    r = evaluate_segmentation(tmp_path / "seg", "scenes:10", threads=None, device="cpu")
    assert r["n"] == 1 and sum(c["pixels"] for c in r["per_class"].values()) == 64 * 64


def test_predict_out_with_a_missing_checkpoint_names_the_checkpoint(tmp_path, capsys):
    # It used to say "--out is for segmentation checkpoints", as if the (mistyped) run were a classifier.
    from vitkit.cli import main

    args = ["predict", "--checkpoint", str(tmp_path / "nope"), str(tmp_path / "x.png"), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope" in err and "--out is for" not in err


def test_an_evaluation_without_counted_pixels_leaves_no_confusion_matrix_behind():
    # The run's per-class test IoU reads `last_confusion`: a test split whose pixels are all ignored (255) used to
    # leave the validation split's matrix there.
    task = SegmentationTask()

    class M(torch.nn.Module):
        num_classes = 2

    task.check_model(M())
    task.device = torch.device("cpu")
    logits, mask = torch.randn(1, 2, 4, 4), torch.randint(0, 2, (1, 4, 4))
    task.eval_metrics(task.eval_sums(logits, {"mask": mask}) | {"n": 1})
    assert task.last_confusion is not None
    ignored = task.eval_sums(logits, {"mask": torch.full((1, 4, 4), 255)}) | {"n": 1}
    assert math.isnan(task.eval_metrics(ignored)["miou"]) and task.last_confusion is None


def test_predict_json_without_out_writes_no_file_and_gives_the_masks_as_coco_rle(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from pycocotools import mask as mask_utils

    from vitkit.cli import main
    from vitkit.models.segmentation import ViTSegmentation
    from vitkit.train.seg_run import predict_masks

    torch.manual_seed(0)
    model = ViTSegmentation("vit_nano_patch4_32", 3, backbone_args={"depth": 1, "embed_dim": 16, "num_heads": 2})
    torch.nn.init.normal_(model.head.proj.weight, std=1.0)  # several classes in one image
    model.preprocess.class_names = ["background", "a", "b"]
    model.save_pretrained(tmp_path / "seg")
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 36, 3), dtype=np.uint8)).save(image)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["predict", "--checkpoint", str(tmp_path / "seg"), str(image), "--threads", "1"]
    assert main([*argv, "--json"]) == 0
    assert list(work.iterdir()) == []  # the JSON is the output: no ./predictions
    (res,) = json.loads(capsys.readouterr().out)
    assert "overlay" not in res and "mask" not in res
    mask = predict_masks(tmp_path / "seg", [image], threads=None)[0]["mask"]  # (20, 36)
    assert len(res["segments"]) == len(np.unique(mask)) >= 2
    for seg in res["segments"]:
        rle = {"size": seg["segmentation"]["size"], "counts": seg["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle), (mask == seg["category_id"]).astype(np.uint8))
        assert seg["area"] == int((mask == seg["category_id"]).sum())
    assert sum(s["area"] for s in res["segments"]) == 20 * 36
    # With --out the files are written (and named in the JSON); without --json, into ./predictions by default.
    assert main([*argv, "--json", "--out", str(tmp_path / "pred")]) == 0
    assert Path(json.loads(capsys.readouterr().out)[0]["overlay"]).is_file()
    assert main(argv) == 0
    assert (work / "predictions" / "wide.overlay.png").is_file()


def test_train_and_eval_on_coco_json(tmp_path, capsys):
    """`--data coco:FILE.json` for --task segment: COCO polygons become the run's masks, eval re-reads the same."""
    from PIL import Image

    from vitkit.cli import main

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        x = 2 + i
        annotations.append({"id": i, "image_id": i, "category_id": 5 + i % 2,
                            "segmentation": [[x, 4, x + 10, 4, x + 10, 14, x, 14]]})  # fmt: skip
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 5, "name": "a"}, {"id": 6, "name": "b"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    run = tmp_path / "run"
    argv = ["train", "--task", "segment", "--data", f"coco:{tmp_path / 'instances.json'}", "--model",
            "vit_nano_patch4_32", "--img-size", "16", "--set", "load_size=16", "--set",
            "model_args={depth: 1, embed_dim: 16, num_heads: 2}", "--epochs", "1", "--batch-size", "4",
            "--threads", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["class_names"] == ["background", "a", "b"] and summary["split_sizes"]["train"] == 6
    assert "test mIoU" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run), "--json", "--threads", "1"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n"] == 1 and ev["miou"] == pytest.approx(summary["test_miou"])


def test_eval_of_an_empty_split_is_refused_by_name(tmp_path):
    # scenes:3 holds round(0.3) = 0 test images: eval crashed with "unsupported format string passed to
    # NoneType.__format__" instead of saying that the split is empty.
    from vitkit.data.shapes import SCENE_CLASSES
    from vitkit.models.segmentation import ViTSegmentation
    from vitkit.train.seg_run import evaluate_segmentation

    model = ViTSegmentation("vit_nano_patch4_32", len(SCENE_CLASSES), backbone_args={"img_size": 16, "depth": 1})
    model.preprocess.class_names = list(SCENE_CLASSES)
    model.save_pretrained(tmp_path / "seg")
    with pytest.raises(ValueError, match=r"the test split of 'scenes:3' is empty \(test_fraction=0.1\); choose"):
        evaluate_segmentation(tmp_path / "seg", "scenes:3", threads=None, device="cpu")
    assert evaluate_segmentation(tmp_path / "seg", "scenes:3", split="train", threads=None, device="cpu")["n"] == 3


def _strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _folder_with_an_unlabelled_split(tmp_path: Path, split: str, seed: int, n: int = 10) -> Path:
    """A 2-class mask folder of n 16 px images whose `split` (one image of the seeded folder split) is all 255."""
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    (data / "classes.txt").write_text("background\nobject\n")
    order = np.random.default_rng(seed).permutation(n)  # load_mask_folder's split: train, then val, then test
    unlabelled = {"val": order[n - 2], "test": order[n - 1]}[split]
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        mask = np.full((16, 16), 255, np.uint8)
        if i != unlabelled:
            mask[:8], mask[8:] = 1, 0
        Image.fromarray(mask).save(data / "masks" / f"{i}.png")
    return data


def test_a_test_split_without_counted_pixels_gives_null_metrics_not_nan_or_a_crash(tmp_path, capsys):
    # Masks of 255 only (unlabelled) in the test split: summary.json held NaN (not JSON), `vitkit eval` crashed on
    # "unsupported format string passed to NoneType.__format__" and its --json printed "loss": NaN.

    from vitkit.cli import main

    seed = 3
    data = _folder_with_an_unlabelled_split(tmp_path, "test", seed)
    cfg = {**TINY_SEG, "data": str(data), "load_size": 16, "seed": seed, "epochs": 1, "monitor": "val_miou",
           "out": str(tmp_path / "run")}  # fmt: skip
    cfg.pop("shapes_size")
    summary = train(TrainConfig(**cfg), log=lambda m: None)
    assert summary["split_sizes"]["test"] == 1 and summary["test_images"] == 1
    written = _strict_json((tmp_path / "run" / "summary.json").read_text())
    assert written["test_miou"] is None and written["test_loss"] is None and written["test_per_class"] == {}
    assert summary["best_val_miou"] is not None  # the validation split has labels

    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--threads", "1"]) == 0
    assert "no labelled pixel" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--threads", "1", "--json"]) == 0
    ev = _strict_json(capsys.readouterr().out)
    assert ev["n"] == 1 and ev["miou"] is None and ev["loss"] is None


@pytest.mark.parametrize("kind", ["segmentation", "detection"])
def test_an_undecodable_image_is_named_by_predict_and_explain(tmp_path, capsys, kind):
    # predict and explain of dense models printed PIL's traceback for a file that is not an image.
    from vitkit.cli import main
    from vitkit.models import ViTDETR
    from vitkit.models.segmentation import ViTSegmentation

    args = {"img_size": 16, "depth": 1, "embed_dim": 16, "num_heads": 2}
    if kind == "segmentation":
        model = ViTSegmentation("vit_nano_patch4_32", 3, backbone_args=args)
    else:
        model = ViTDETR("vit_nano_patch4_32", 2, backbone_args=args, hidden_dim=16, dec_layers=1, dec_heads=2,
                        dec_ffn_dim=16, num_queries=3)  # fmt: skip
    model.save_pretrained(tmp_path / "m")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    for argv in (["predict", "--checkpoint", str(tmp_path / "m"), str(bad), "--json"],
                 ["explain", str(bad), "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "why")]):  # fmt: skip
        assert main([*argv, "--threads", "1"]) == 2
        err = capsys.readouterr().err
        assert f"error: cannot decode image {bad}: UnidentifiedImageError" in err and "Traceback" not in err, err


def test_a_validation_split_without_counted_pixels_is_refused(tmp_path):
    # val_miou was NaN every epoch, so "best" stayed at epoch 1 whatever the run learned, without a word.
    data = _folder_with_an_unlabelled_split(tmp_path, "val", seed=0)
    cfg = {**TINY_SEG, "data": str(data), "load_size": 16, "seed": 0, "epochs": 1, "monitor": "val_miou",
           "out": str(tmp_path / "run")}  # fmt: skip
    cfg.pop("shapes_size")
    with pytest.raises(ValueError, match=r"the validation split of .*data \(1 images\) has no labelled pixel"):
        train(TrainConfig(**cfg), log=lambda m: None)


def test_a_dense_pretrained_model_gives_its_backbone_at_its_own_size(tmp_path):
    # --task segment --pretrained DETECTION_RUN failed with "unknown DETRConfig fields ['img_size']"; an --img-size
    # other than the pretrained segmentation model's or detector's was an unclear error or silently dropped.
    from vitkit.models import ViTDETR, ViTUNet
    from vitkit.train.detection_run import build_detector
    from vitkit.train.seg_run import build_segmentation_model

    args = {"img_size": 16, "depth": 1, "embed_dim": 16, "num_heads": 2}
    det = ViTDETR("vit_nano_patch4_32", 2, backbone_args=args, hidden_dim=16, dec_layers=1, dec_heads=2,
                  dec_ffn_dim=16, num_queries=3)  # fmt: skip
    det.save_pretrained(tmp_path / "det")
    ViTUNet("vit_nano_patch4_32", 3, backbone_args=args).save_pretrained(tmp_path / "seg")
    logs = []
    for size in (None, 16):
        cfg = TrainConfig(task="segment", data="scenes:8", pretrained=str(tmp_path / "det"), img_size=size)
        seg = build_segmentation_model(cfg, 5, logs.append)
        want, got = det.backbone.state_dict(), seg.backbone.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert tuple(seg.preprocess.input_size) == (16, 16) and seg.num_classes == 5
    assert any("detection head is dropped" in m for m in logs)
    for pretrained, build, task in ((tmp_path / "det", build_segmentation_model, "segment"),
                                    (tmp_path / "seg", build_segmentation_model, "segment"),
                                    (tmp_path / "seg", lambda c, k, log: build_detector(c, k, [1, 2], log), "detect")):  # fmt: skip
        cfg = TrainConfig(task=task, data="scenes:8", pretrained=str(pretrained), img_size=32)
        with pytest.raises(ValueError, match=r"trained at 16x16; img_size=32 cannot resize it: drop img_size= or set"):
            build(cfg, 3 if "seg" in str(pretrained) else 2, logs.append)
