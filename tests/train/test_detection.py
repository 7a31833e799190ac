"""Detection training: Hungarian matching against brute force, the set criterion, COCO mAP on hand-made cases with
known answers, the Task seam's collected metrics, and tiny end-to-end runs (train + eval + predict, exact resume)."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from tests.train.conftest import assert_same_bits, weights
from vitkit.data.boxes import xyxy_to_cxcywh
from vitkit.data.shapes import make_scenes
from vitkit.train.det_metrics import coco_map
from vitkit.train.tasks.detection import SetCriterion, hungarian_match, match_cost, postprocess

# --- matching ---------------------------------------------------------------------------------------------------


def _random_case(seed: int, q: int, m: int, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, q, k + 1, generator=g)
    boxes = torch.rand(1, q, 4, generator=g) * 0.4 + 0.2
    target = {"labels": torch.randint(0, k, (m,), generator=g), "boxes": torch.rand(m, 4, generator=g) * 0.4 + 0.2}
    return logits, boxes, target


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_the_brute_force_optimum(seed):
    q, m = 5, 1 + seed % 4
    logits, boxes, target = _random_case(seed, q, m)
    cost = match_cost(logits[0], boxes[0], target["labels"], target["boxes"], 1.0, 5.0, 2.0)  # (Q, m)
    rows, cols = hungarian_match(logits, boxes, [target])[0]
    assert sorted(cols.tolist()) == list(range(m)) and len(set(rows.tolist())) == m  # one-to-one, every target
    found = float(cost[rows, cols].sum())
    best = min(sum(float(cost[p, j]) for j, p in enumerate(perm)) for perm in itertools.permutations(range(q), m))
    assert found == pytest.approx(best, abs=1e-5)


def test_matching_pairs_each_target_with_its_own_prediction():
    # Query 2 sits on target 0, query 0 on target 1; the class scores agree: the assignment must find that.
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.2, 0.3, 0.1, 0.2]]])
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]])
    target = {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.7, 0.2, 0.2]])}
    rows, cols = hungarian_match(logits, boxes, [target])[0]
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 2, 1: 0}


def test_matching_refuses_more_targets_than_queries():
    logits, boxes, target = _random_case(0, 2, 3)
    with pytest.raises(ValueError, match="3 objects but the model has only 2 queries"):
        hungarian_match(logits, boxes, [target])


# --- the set criterion ---------------------------------------------------------------------------------------------


def test_criterion_by_hand():
    # One image, one target, two queries: query 0 predicts the box shifted by 0.1 in x (L1 0.1), query 1 is empty.
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    out = {
        "pred_logits": torch.tensor([[[0.0, 10.0, 0.0], [0.0, 0.0, 10.0]]]),
        "pred_boxes": torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
        "aux_outputs": [],
    }
    crit = SetCriterion(num_classes=2, eos_coef=0.1)
    losses = crit(out, [target], num_boxes=1.0)
    assert float(losses["l1"]) == pytest.approx(0.1, abs=1e-6)
    # Two 0.2-boxes offset by 0.1: intersection 0.1 x 0.2, union 0.06, enclosing 0.3 x 0.2 = union -> GIoU = 1/3.
    assert float(losses["giou"]) == pytest.approx(1 - 1 / 3, abs=1e-5)
    ce_each = -torch.log_softmax(torch.tensor([0.0, 10.0, 0.0]), 0)[1]  # both queries are right, equally sure
    assert float(losses["ce"]) == pytest.approx(float(ce_each), rel=1e-4)  # weighted mean of two equal terms
    assert float(losses["loss"]) == pytest.approx(float(ce_each) + 5 * 0.1 + 2 * (2 / 3), rel=1e-4)
    # An auxiliary layer with the same output doubles the loss; num_boxes divides only the box terms.
    doubled = crit({**out, "aux_outputs": [dict(out)]}, [target], num_boxes=1.0)["loss"]
    assert float(doubled) == pytest.approx(2 * float(losses["loss"]), rel=1e-5)
    halved = crit(out, [target], num_boxes=2.0)
    assert float(halved["l1"]) == pytest.approx(0.05, abs=1e-6) and float(halved["ce"]) == float(losses["ce"])


def test_criterion_no_object_weight_and_empty_images():
    out = {"pred_logits": torch.zeros(2, 3, 3), "pred_boxes": torch.full((2, 3, 4), 0.5), "aux_outputs": []}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = SetCriterion(num_classes=2)(out, [empty, empty], num_boxes=1.0)
    assert float(losses["ce"]) == pytest.approx(math.log(3), rel=1e-5)  # uniform logits, every query "no object"
    assert float(losses["l1"]) == 0.0 and float(losses["giou"]) == 0.0


def test_postprocess_scales_sorts_and_skips_no_object():
    out = {
        "pred_logits": torch.tensor([[[0.0, 3.0, 0.0], [2.0, 0.0, 9.0]]]),  # query 1 is "no object" but its best
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.1, 0.25, 0.5, 0.5]]]),  # real class is 0
    }
    det = postprocess(out, [(40, 80)])[0]  # (H, W)
    assert det["labels"].tolist() == [1, 0]
    torch.testing.assert_close(det["boxes"][0], torch.tensor([20.0, 15.0, 60.0, 25.0]))
    assert det["scores"][0] > det["scores"][1]
    torch.testing.assert_close(det["boxes"][1], torch.tensor([0.0, 0.0, 28.0, 20.0]))  # -12 clipped to the edge


# --- mAP -------------------------------------------------------------------------------------------------------


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def _p(boxes, labels, scores):
    return {**_t(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


GT = [_t([[10, 10, 30, 30], [40, 40, 60, 50]], [0, 1]), _t([[0, 0, 20, 40]], [2])]


def test_map_perfect_is_one():
    preds = [_p([[10, 10, 30, 30], [40, 40, 60, 50]], [0, 1], [0.9, 0.8]), _p([[0, 0, 20, 40]], [2], [0.7])]
    r = coco_map(preds, GT, 3)
    assert r["map"] == pytest.approx(1.0) and r["map50"] == pytest.approx(1.0) and r["n_boxes"] == 3


def test_map_shifted_boxes():
    gt = [_t([[0, 0, 20, 20]], [0])]
    # Shifted by 8 px: intersection 12 x 20 = 240, union 560, IoU 0.43 < 0.5 -> a miss at every threshold.
    assert coco_map([_p([[8, 0, 28, 20]], [0], [0.9])], gt)["map50"] == 0.0
    # Shifted by 4 px: IoU 320 / 480 = 0.67: a hit at 0.5 (and up to 0.65), a miss at 0.75.
    r = coco_map([_p([[4, 0, 24, 20]], [0], [0.9])], gt)
    assert r["map50"] == pytest.approx(1.0) and r["map75"] == 0.0
    assert r["map"] == pytest.approx(4 / 10)  # hits at IoU 0.50, 0.55, 0.60, 0.65 of the ten thresholds


def test_map_wrong_class_missed_object_and_false_positive():
    gt = [_t([[0, 0, 20, 20]], [0])]
    assert coco_map([_p([[0, 0, 20, 20]], [1], [0.9])], gt, 2)["map50"] == 0.0  # right box, wrong class
    # A false positive scored above the true one: precision 1/2 at full recall -> AP 0.5.
    fp_first = coco_map([_p([[50, 50, 70, 70], [0, 0, 20, 20]], [0, 0], [0.9, 0.8])], gt)
    assert fp_first["map50"] == pytest.approx(0.5)
    # One of two objects found: precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points.
    two = [_t([[0, 0, 20, 20], [40, 40, 60, 60]], [0, 0])]
    assert coco_map([_p([[0, 0, 20, 20]], [0], [0.9])], two)["map50"] == pytest.approx(51 / 101)


def test_map_empty_cases():
    assert coco_map([_p([], [], [])], [_t([[0, 0, 5, 5]], [0])])["map50"] == 0.0  # nothing predicted
    r = coco_map([_p([[0, 0, 5, 5]], [0], [0.5])], [_t([], [])], 1)  # nothing to find: undefined
    assert math.isnan(r["map"]) and math.isnan(r["map50"])
    with pytest.raises(ValueError, match="outside the classes"):
        coco_map([_p([[0, 0, 5, 5]], [3], [0.5])], [_t([[0, 0, 5, 5]], [0])], 2)
    with pytest.raises(ValueError, match="2 predictions for 1 images"):
        coco_map([_p([], [], []), _p([], [], [])], [_t([], [])])


# --- the task seam --------------------------------------------------------------------------------------------------


def test_task_evaluates_map_from_collected_results():
    from vitkit import create_model
    from vitkit.data.detection import scenes_splits
    from vitkit.models.detr import ViTDETR
    from vitkit.train import Trainer
    from vitkit.train.config import TrainConfig
    from vitkit.train.tasks.detection import DetectionLoader, DetectionTask

    splits = scenes_splits(20, 32, seed=0)
    backbone = create_model("vit_nano_patch4_32", num_classes=0, img_size=32, patch_size=8, depth=1, embed_dim=16,
                            num_heads=2)  # fmt: skip
    model = ViTDETR(backbone, 4, num_queries=6, hidden_dim=16, dec_layers=1, dec_heads=2, dec_ffn_dim=32)

    # A stand-in model output that reproduces the val targets exactly: the metrics must say 1.0.
    class Oracle(DetectionTask):
        def forward(self, model, batch):
            logits = torch.full((len(batch["image"]), 6, 5), -20.0)
            logits[..., 4] = 20.0
            boxes = torch.full((len(batch["image"]), 6, 4), 0.5)
            for b, t in enumerate(batch["targets"]):
                k = len(t["labels"])
                logits[b, :k, 4], logits[b, torch.arange(k), t["labels"]] = -20.0, 20.0
                boxes[b, :k] = t["boxes"]
            return {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}

    trainer = Trainer(model, "cpu", TrainConfig(task="detect", monitor="val_map50", progress=False), task=Oracle())
    r = trainer.evaluate(DetectionLoader(splits.val, 1))  # one image per batch: results collected across batches
    assert r["n"] == 2 and r["map50"] == pytest.approx(1.0) and r["map"] == pytest.approx(1.0)


def test_task_refuses_a_classifier():
    from vitkit.train.tasks.detection import DetectionTask

    with pytest.raises(ValueError, match="ViTDETR"):
        DetectionTask().check_model(torch.nn.Linear(2, 2))


# --- end to end -------------------------------------------------------------------------------------------------

TINY_DET = [
    "--task", "detect", "--data", "scenes:20", "--model", "vit_nano_patch4_32", "--img-size", "32",
    "--set", "shapes_size=32", "--num-queries", "6", "--batch-size", "8", "--threads", "1", "--no-progress",
    "--set", "model_args={patch_size: 8, depth: 1, embed_dim: 16, num_heads: 2, hidden_dim: 16, dec_layers: 2, "
    "dec_heads: 2, dec_ffn_dim: 32}",
]  # fmt: skip


def test_train_eval_predict_end_to_end(tmp_path, capsys):
    from PIL import Image

    from vitkit.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY_DET, "--epochs", "2", "--out", str(run)]) == 0
    assert "test mAP@0.5" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["task"] == "detect" and summary["monitor"] == "val_map50"
    assert 0.0 <= summary["test_map50"] <= 1.0 and summary["test_images"] == 2
    assert summary["class_names"] == ["circle", "square", "triangle", "star"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"val_map50", "val_map", "train_giou"} <= set(rows[0])

    assert main(["eval", "--checkpoint", str(run), "--json", "--threads", "1"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n"] == 2 and ev["test_map50"] == pytest.approx(summary["test_map50"])  # the run's own test split

    images, _, _ = make_scenes(1, 40, 56, seed=7)  # another size than the model's: boxes come back in its pixels
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "scene.png")
    out = tmp_path / "drawn"
    assert main(["predict", "--checkpoint", str(run), str(tmp_path / "scene.png"), "--threshold", "0", "--out",
                 str(out), "--json", "--threads", "1"]) == 0  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 6  # threshold 0: every query
    for d in results:
        assert d["image_id"] == 0 and d["category_id"] in (1, 2, 3, 4) and 0 <= d["score"] <= 1
        x, y, w, h = d["bbox"]
        assert -0.01 <= x and x + w <= 56.01 and -0.01 <= y and y + h <= 40.01  # pixels of the 40 x 56 file
    png = Image.open(out / "scene_detections.png")
    assert png.size[0] / png.size[1] == pytest.approx(56 / 40)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from vitkit.train import TrainingInterrupted, train
    from vitkit.train.trainer import Trainer

    recipe = dict(
        task="detect", data="scenes:30", model="vit_nano_patch4_32", img_size=32, shapes_size=32, batch_size=8,
        threads=1, progress=False, epochs=3, ckpt_every_steps=1, hflip=0.5, lr=2e-3,
        model_args={"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_dim": 16, "dec_layers": 2,
                    "dec_heads": 2, "dec_ffn_dim": 32, "num_queries": 6},
    )  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"
    train({**recipe, "out": str(ref)}, log=lambda m: None)

    real_save = Trainer.save

    def save_then_signal(self, name="last", weights=None):
        path = real_save(self, name, weights)
        if name == "last" and self.step == 4:  # the first step of epoch 2 (3 steps per epoch) was just saved
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes the next step, saves last/ and stops
        return path

    monkeypatch.setattr(Trainer, "save", save_then_signal)
    with pytest.raises(TrainingInterrupted) as stopped:
        train({**recipe, "out": str(run)}, log=lambda m: None)
    monkeypatch.undo()
    assert stopped.value.step == 5  # mid-epoch: 2 of the 3 batches of epoch 2 done
    messages: list[str] = []
    train(resume=run, log=messages.append)
    assert any(m.startswith("resuming") for m in messages)
    assert_same_bits(weights(ref / "last"), weights(run / "last"))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert a["test_map50"] == b["test_map50"] and a["test_loss"] == b["test_loss"]


def test_xyxy_targets_become_normalised_cxcywh():
    from vitkit.train.config import TrainConfig
    from vitkit.train.tasks.detection import DetectionTask

    class _Model(torch.nn.Module):
        family = "detr"
        num_classes = 4

        def __init__(self):
            super().__init__()
            from vitkit.models.base import Preprocess

            self.preprocess = Preprocess(mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 64))

    task = DetectionTask()
    task.setup(_Model(), TrainConfig(task="detect"), torch.device("cpu"))
    images = torch.zeros(1, 3, 16, 32, dtype=torch.uint8)  # half the input size: boxes double
    batch = task.eval_batch((images, [{"boxes": torch.tensor([[4.0, 2.0, 12.0, 10.0]]), "labels": torch.tensor([1])}]))
    assert batch["image"].shape == (1, 3, 32, 64)
    torch.testing.assert_close(batch["targets"][0]["boxes_xyxy"], torch.tensor([[8.0, 4.0, 24.0, 20.0]]))
    expected = xyxy_to_cxcywh(torch.tensor([[8 / 64, 4 / 32, 24 / 64, 20 / 32]]))
    torch.testing.assert_close(batch["targets"][0]["boxes"], expected)


@pytest.mark.slow
def test_ddp_gathers_every_process_detections(tmp_path):
    # Two gloo processes each evaluate half of the validation images; the mAP they agree on must be the one a
    # single process computes over all of them with the same weights.
    import subprocess
    import sys

    from tests.train.conftest import SUBPROCESS_ENV
    from vitkit.train.detection_run import evaluate_detection

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitkit",
           "train", *TINY_DET, "--set", "data=scenes:40", "--epochs", "2", "--device", "cpu", "--out", str(run)]  # fmt: skip
    r = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda row: row["val_map50"])
    single = evaluate_detection(run, split="val", device="cpu", threads=None)
    assert single["n"] == 4 and single["map50"] == pytest.approx(best["val_map50"], abs=1e-9)
    assert single["map"] == pytest.approx(best["val_map"], abs=1e-9)


def test_predict_json_without_out_writes_no_file(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from vitkit.cli import main
    from vitkit.models.detr import ViTDETR

    torch.manual_seed(0)
    model = ViTDETR("vit_nano_patch4_32", 2, backbone_args={"depth": 1, "embed_dim": 16, "num_heads": 2},
                    hidden_dim=16, dec_layers=1, dec_heads=2, dec_ffn_dim=32, num_queries=3)  # fmt: skip
    model.preprocess.class_names = ["a", "b"]
    model.save_pretrained(tmp_path / "det")
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 36, 3), dtype=np.uint8)).save(image)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["predict", "--checkpoint", str(tmp_path / "det"), str(image), "--threshold", "0", "--threads", "1"]
    assert main([*argv, "--json"]) == 0
    assert list(work.iterdir()) == []  # the COCO results are the output: no ./detections
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 3 and {r["category_id"] for r in results} <= {1, 2}
    assert main([*argv, "--json", "--out", str(tmp_path / "drawn")]) == 0
    assert (tmp_path / "drawn" / "wide_detections.png").is_file()
    assert main(argv) == 0
    assert (work / "detections" / "wide_detections.png").is_file()


def test_detector_starts_from_a_segmentation_models_backbone(tmp_path):
    """--pretrained SEG_RUN: the detector's backbone is the segmentation model's, weight for weight; its head is
    dropped, and model_args cannot reshape the loaded backbone."""
    from vitkit.models import ViTUNet
    from vitkit.train.config import TrainConfig
    from vitkit.train.detection_run import build_detector

    torch.manual_seed(0)
    seg = ViTUNet("vit_nano_patch4_32", 3, backbone_args={"depth": 2, "embed_dim": 16, "num_heads": 2})
    seg.save_pretrained(tmp_path / "seg")
    logs = []
    cfg = TrainConfig(task="detect", data="scenes:8", pretrained=str(tmp_path / "seg"),
                      model_args={"hidden_dim": 16, "dec_layers": 1, "num_queries": 4})  # fmt: skip
    det = build_detector(cfg, 4, [1, 2, 3, 4], logs.append)
    want = seg.backbone.state_dict()
    got = det.backbone.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any("segmentation head is dropped" in m for m in logs)
    with pytest.raises(ValueError, match="cannot change the architecture"):
        build_detector(cfg.replace(model_args={"depth": 1}), 4, [1, 2, 3, 4], logs.append)


def test_eval_of_an_empty_split_is_refused_by_name(tmp_path):
    # A run trained with test_fraction: 0 has no test split; eval printed mAP nan (and --json wrote NaN, which is
    # not JSON) instead of saying so.
    from vitkit.models import ViTDETR
    from vitkit.train.detection_run import evaluate_detection

    det = ViTDETR("vit_nano_patch4_32", 4, backbone_args={"img_size": 16, "depth": 1, "embed_dim": 16, "num_heads": 2},
                  hidden_dim=16, dec_layers=1, dec_heads=2, dec_ffn_dim=16, num_queries=8)  # fmt: skip
    det.save_pretrained(tmp_path / "det")
    config = json.loads((tmp_path / "det" / "config.json").read_text())
    config["training"] = {"data": "scenes:10", "shapes_size": 16, "val_fraction": 0.2, "test_fraction": 0.0}
    (tmp_path / "det" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the test split of 'scenes:10' is empty \(test_fraction=0.0\); choose"):
        evaluate_detection(tmp_path / "det", threads=None, device="cpu")
    assert evaluate_detection(tmp_path / "det", split="val", threads=None, device="cpu")["n"] == 2


def test_predict_names_the_threshold_flag_and_json_help_says_what_it_prints(tmp_path, capsys):
    from PIL import Image

    from vitkit.cli import main
    from vitkit.models import ViTDETR

    ViTDETR("vit_nano_patch4_32", 2, backbone_args={"img_size": 16, "depth": 1, "embed_dim": 16, "num_heads": 2},
            hidden_dim=16, dec_layers=1, dec_heads=2, dec_ffn_dim=16, num_queries=3).save_pretrained(tmp_path / "det")  # fmt: skip
    Image.new("RGB", (20, 16)).save(tmp_path / "a.png")
    argv = ["predict", "--checkpoint", str(tmp_path / "det"), str(tmp_path / "a.png"), "--threads", "1"]
    assert main([*argv, "--threshold", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--threshold 1.5 is outside [0, 1]" in err and "score_threshold" not in err, err
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "detectors: a list of COCO results" in " ".join(capsys.readouterr().out.split())


def test_a_split_without_boxes_gives_null_map_not_nan(tmp_path, capsys):
    # COCO images without annotations (negatives only): mAP is undefined. eval --json printed NaN (not JSON).
    from PIL import Image

    from vitkit.cli import main
    from vitkit.models import ViTDETR

    ViTDETR("vit_nano_patch4_32", 1, backbone_args={"img_size": 16, "depth": 1, "embed_dim": 16, "num_heads": 2},
            hidden_dim=16, dec_layers=1, dec_heads=2, dec_ffn_dim=16, num_queries=3).save_pretrained(tmp_path / "det")  # fmt: skip
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 16), (40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(3)], "annotations": [],
            "categories": [{"id": 1, "name": "0"}]}  # fmt: skip
    (tmp_path / "empty.json").write_text(json.dumps(coco))
    argv = ["eval", "--checkpoint", str(tmp_path / "det"), "--data", f"coco:{tmp_path / 'empty.json'}", "--split",
            "all", "--threads", "1"]  # fmt: skip

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert main([*argv, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert ev["n"] == 3 and ev["n_boxes"] == 0 and ev["map50"] is None and ev["map"] is None
    assert main(argv) == 0
    assert "mAP@0.5 -" in capsys.readouterr().out


def test_more_objects_than_queries_is_refused_before_training(tmp_path, capsys):
    # The Hungarian matching needs a query per object; the run used to stop mid-epoch (or, for a crowded test image,
    # after the whole training) with "raise num_queries", a name the command line does not have.
    from vitkit.cli import main
    from vitkit.data.detection import load_detection_data

    splits = load_detection_data("scenes:20", shapes_size=32)
    most = max(len(t["labels"]) for ds in (splits.train, splits.val, splits.test) for t in ds.targets)
    argv = [a if a != "6" else str(most - 1) for a in TINY_DET]
    assert main(["train", *argv, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"has {most} objects but --num-queries {most - 1}" in err and f"at least {most}" in err, err
    assert not (tmp_path / "run" / "last").exists()


def test_a_validation_split_without_boxes_is_refused(tmp_path):
    # val_map50 was NaN every epoch, so "best" stayed at epoch 1 whatever the run learned, without a word.
    from PIL import Image

    from vitkit.train import TrainConfig, train

    (tmp_path / "images").mkdir()
    n, seed = 10, 0
    val_image = int(np.random.default_rng(seed).permutation(n)[0])  # coco_splits: the first n_val of the permutation
    for i in range(n):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    annotations = [
        {"id": i + 1, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8]} for i in range(n) if i != val_image
    ]
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(n)], "annotations": annotations,
            "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    cfg = TrainConfig(task="detect", data=f"coco:{tmp_path / 'ann.json'}", load_size=16, img_size=16, seed=seed,
                      model_args={"depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_dim": 16, "dec_layers": 1,
                                  "num_queries": 3}, epochs=1, batch_size=4, threads=1, progress=False,
                      out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ValueError, match=r"the validation split of coco:.* \(1 images\) has no box"):
        train(cfg, log=lambda m: None)


def test_default_monitor_follows_ema_as_segmentation_does():
    from vitkit.train.config import resolve_config

    assert resolve_config(None, {"task": "detect", "data": "scenes"}).monitor == "val_map50"
    assert resolve_config(None, {"task": "detect", "data": "scenes", "ema": True}).monitor == "ema_map50"
    assert resolve_config(None, {"task": "detect", "data": "scenes", "monitor": "val_map"}).monitor == "val_map"
