"""Whole runs in-process: run-directory files, summary fields, checkpoints' preprocessing, eval/predict, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vitkit
from tests.train.conftest import TINY, assert_same_bits, weights
from vitkit.cli import main
from vitkit.train import TrainConfig, evaluate, predict, train
from vitkit.train.checkpoint import has_checkpoint, read_training_state


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "digits"
    summary = train({**TINY, "out": str(out), "epochs": 3, "ckpt_every_steps": 20})
    torch.set_num_threads(threads)
    return out, summary


def test_run_directory_files_and_summary(digits_run):
    out, summary = digits_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["test_acc"] == pytest.approx(summary["test_acc"])
    for key in ("best_val_acc", "test_acc", "test_top5"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["test_acc"] > 0.3  # 3 epochs of a 2-block ViT on 8x8 digits: far above chance (0.1)
    assert summary["status"] == "finished" and summary["epochs_run"] == 3 and summary["steps"] == 3 * (1439 // 32)
    assert summary["wall_time_s"] > 0 and summary["images_per_s"] > 0 and summary["skipped_files"] == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss,train_acc,val_loss,val_acc") and len(csv_lines) == 4
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert saved == TrainConfig.from_dict({**TINY, "out": str(out), "epochs": 3, "ckpt_every_steps": 20})
    assert has_checkpoint(out / "last") and has_checkpoint(out / "best")
    assert read_training_state(out / "last")["finished"]


def test_checkpoint_carries_preprocessing_and_reproduces_test_acc(digits_run):
    out, summary = digits_run
    model = vitkit.load_model(str(out / "best"))
    pre = model.preprocess
    assert pre.class_names == [str(i) for i in range(10)]
    assert pre.input_size == (8, 8) and pre.crop_fraction == 1.0
    assert 0.2 < pre.mean[0] < 0.4  # digits' own statistics (mostly dark pixels), not ImageNet's 0.485
    result = evaluate(out, device="cpu")
    assert result["top1"] == pytest.approx(summary["test_acc"]) and result["n"] == summary["test_images"]
    assert sum(pc["n"] for pc in result["per_class"].values()) == result["n"]
    conf = torch.tensor(result["confusion"])
    assert conf.sum() == result["n"] and conf.trace() / conf.sum() == pytest.approx(result["top1"])


def test_eval_and_predict_cli_json(digits_run, tmp_path, capsys):
    from PIL import Image

    out, summary = digits_run
    assert main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev"), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["test_acc"]) and set(result["per_class"]) == set("0123456789")
    assert (tmp_path / "ev" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["top5"] == pytest.approx(result["top5"])

    from vitkit.data import load_data

    test = load_data("digits", seed=0).test
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    assert (
        main(["predict", "--checkpoint", str(out), *map(str, paths), "--topk", "3", "--json", "--device", "cpu"]) == 0
    )
    preds = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in preds] == [str(p) for p in paths]
    for p in preds:
        probs = [t["prob"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] in "0123456789" for t in p["top"])
    # A PNG round trip is lossless, so predict must agree with evaluating the same images in memory.
    model = vitkit.load_model(str(out / "best")).eval()
    from vitkit.data.transforms import EvalTransform

    pre = model.preprocess
    with torch.no_grad():
        logits = model(
            EvalTransform(pre.input_size, pre.mean, pre.std, pre.crop_fraction, pre.interpolation)(test.images[:3])
        )
    assert [p["top"][0]["index"] for p in preds] == logits.argmax(-1).tolist()
    assert predict(out, [paths[0]], topk=1, device="cpu")[0]["top"][0]["prob"] == pytest.approx(
        logits.softmax(-1)[0].max().item(), abs=1e-5
    )


def test_bad_inputs_name_the_value(tmp_path, capsys):
    assert main(["train", "--epochs", "0"]) == 2
    assert "epochs must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert f"checkpoint '{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["train", "--device", "cpu", "--amp", "fp16", "--out", str(tmp_path / "fp16")]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "fp16").exists()  # refused before creating anything
    assert main(["train", "--set", "hflip"]) == 2
    assert "--set expects KEY=VALUE, got 'hflip'" in capsys.readouterr().err
    assert main(["train", "--set", "learning_rate=0.1"]) == 2
    assert "unknown training setting 'learning_rate'" in capsys.readouterr().err


def test_out_dir_holding_a_run_is_refused(digits_run):
    out, _ = digits_run
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        train({**TINY, "out": str(out)})


# A second process that holds the run-directory locks of the paths it is given until it is killed. With --fork it
# first forks a child that outlives it (as a DataLoader worker can for a few seconds) and prints the child's PID.
LOCK_HOLDER = """
import os, sys, time
from pathlib import Path
from vitkit.train.setup import lock_run_dir
for path in sys.argv[2:]:
    lock_run_dir(Path(path))
child = os.fork() if sys.argv[1] == "--fork" else None
if child == 0:
    time.sleep(300)
    os._exit(0)
print("locked", child, flush=True)
time.sleep(300)
"""


def hold(*paths: Path, fork: bool = False) -> tuple[subprocess.Popen, int | None]:
    """Start LOCK_HOLDER on `paths`; returns the process and its forked child's PID (None without fork)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, "--fork" if fork else "--no-fork", *map(str, paths)],
        stdout=subprocess.PIPE,
        text=True,
    )
    word, child = holder.stdout.readline().split()
    assert word == "locked"
    return holder, None if child == "None" else int(child)


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: run directories are not locked there")
def test_a_run_directory_in_use_by_another_process_is_refused(digits_run, tmp_path):
    from vitkit.train.distributed import DistInfo
    from vitkit.train.setup import LOCK_FILE, _held_locks, create_run_dir, lock_run_dir, release_run_dirs

    out, _ = digits_run
    assert not (out / LOCK_FILE).exists()  # a finished run leaves no lock file behind
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    holder, _ = hold(out, fresh)
    try:
        in_use = rf"is in use by another running vitkit process \(pid {holder.pid}\)"
        with pytest.raises(ValueError, match=in_use):  # two resumes of one run
            train(resume=str(out))
        with pytest.raises(ValueError, match=in_use):  # a new run given the --out of a live one
            train({**TINY, "out": str(out)})
        with pytest.raises(ValueError, match=in_use):  # two new runs given the same --out, at the same moment
            create_run_dir(fresh, TrainConfig(), DistInfo())
        assert not (fresh / "config.yaml").exists()
        assert main(["train", "--resume", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert not _held_locks  # train() released what it held
    lock_run_dir(out)  # the OS dropped the killed process's lock: its file is no stale lock
    lock_run_dir(out)  # and the holder may lock again
    release_run_dirs()
    assert not _held_locks and not (out / LOCK_FILE).exists()


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: run directories are not locked there")
def test_a_forked_child_does_not_keep_the_lock_after_its_parent(tmp_path):
    from vitkit.train.setup import lock_run_dir, release_run_dirs

    holder, child = hold(tmp_path, fork=True)
    try:
        holder.kill()  # the parent dies; its forked child (a DataLoader worker, say) lives on
        holder.wait()
        lock_run_dir(tmp_path)  # free: the child closed its copy of the lock file at fork
        release_run_dirs()
    finally:
        os.kill(child, signal.SIGKILL)


def test_resume_before_first_checkpoint_starts_over(tmp_path, monkeypatch):
    from vitkit.train.setup import LOCK_FILE, _held_locks
    from vitkit.train.trainer import Trainer

    cfg = {**TINY, "epochs": 1}

    def killed(self, *a, **k):
        raise RuntimeError("killed before the first checkpoint")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_loop", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train({**cfg, "out": str(tmp_path / "a")})
    assert (tmp_path / "a" / "config.yaml").is_file() and not (tmp_path / "a" / "last").exists()
    assert not _held_locks and not (tmp_path / "a" / LOCK_FILE).exists()  # a failed run released its lock too
    resumed = train(resume=tmp_path / "a")
    fresh = train({**cfg, "out": str(tmp_path / "b")})  # the same seed on the same machine: the same weights
    assert_same_bits(weights(tmp_path / "a" / "last"), weights(tmp_path / "b" / "last"))
    assert resumed["test_acc"] == fresh["test_acc"]


def test_resume_refuses_changed_settings(digits_run):
    out, _ = digits_run
    with pytest.raises(ValueError, match="cannot change lr when resuming"):
        train(resume=out, overrides={"lr": 0.5})


def test_skipped_files_are_listed_in_the_summary(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(["dark", "light"]):
        (root / name).mkdir(parents=True)
        for i in range(12):
            px = (torch.randint(0, 40, (8, 8, 3), generator=g) + 200 * k).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / name / f"{i}.png")
    (root / "light" / "broken.png").write_bytes(b"not a png")
    from vitkit.data import BadImageWarning

    with pytest.warns(BadImageWarning, match="broken.png"):
        summary = train(
            {**TINY, "data": str(root), "load_size": 8, "batch_size": 8, "epochs": 1, "out": str(tmp_path / "r")}
        )
    assert summary["skipped_files"] == [
        {"path": str(root / "light" / "broken.png"), "reason": summary["skipped_files"][0]["reason"]}
    ]
    assert summary["skipped_files"][0]["reason"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["skipped_files"] == summary["skipped_files"]


def test_unknown_model_fails_before_any_run_directory_is_written(tmp_path):
    from vitkit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "vit_smal_patch16_224", "--epochs", "1", "--out", str(out)]) == 2
    assert not out.exists()


def _small_folder(root, per_class: int = 32, classes=("dark", "mid", "light")):
    """A folder of 8x8 PNGs, `per_class` per class, each class its own brightness level."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            px = (torch.randint(0, 40, (8, 8, 3), generator=g) + 100 * k).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


def test_a_folder_smaller_than_one_batch_trains_with_a_fitted_batch_size(tmp_path):
    root = _small_folder(tmp_path / "imgs")  # 96 images: 78 train / 9 val / 9 test, fewer than the default 128
    cfg = {k: v for k, v in TINY.items() if k != "batch_size"}
    assert TrainConfig().batch_size == 128
    messages = []
    out = tmp_path / "run"
    summary = train({**cfg, "data": str(root), "load_size": 8, "epochs": 1, "out": str(out)}, log=messages.append)
    assert summary["status"] == "finished" and summary["steps"] == 1
    assert summary["split_sizes"] == {"train": 78, "val": 9, "test": 9}
    assert summary["batch_size"] == 78 and summary["batch_size_requested"] == 128
    assert any("batch_size lowered from 128 to 78" in m for m in messages), messages
    config_text = (out / "config.yaml").read_text()
    assert "# batch_size lowered from 128 to 78" in config_text
    assert yaml.safe_load(config_text)["batch_size"] == 78


def test_tiny_classes_leave_validation_empty_and_say_so(tmp_path):
    root = _small_folder(tmp_path / "imgs", per_class=2, classes=("a", "b"))  # too few to hold any out
    messages = []
    summary = train(
        {**TINY, "data": str(root), "load_size": 8, "epochs": 1, "out": str(tmp_path / "run")}, log=messages.append
    )
    assert summary["split_sizes"] == {"train": 4, "val": 0, "test": 0} and summary["batch_size"] == 4
    assert summary["test_acc"] is None and summary["best_val_acc"] is None
    text = "\n".join(messages)
    assert "validation split is empty" in text and "best/ holds the final weights" in text
    assert "test split is empty" in text


@pytest.mark.filterwarnings("ignore::vitkit.data.BadImageWarning")
@pytest.mark.parametrize(
    "layout, error",
    [
        ({"a": 3, "b": 0}, "class folder .*b has no images"),
        ({"only": 3}, "need at least 2 classes"),
        ({"a": 3, "b": -2}, r"class\(es\) \['b'\] .* have no readable images"),
    ],
)
def test_a_bad_data_spec_leaves_no_run_directory(tmp_path, monkeypatch, layout, error):
    from PIL import Image

    root = tmp_path / "imgs"
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(abs(count)):
            if count > 0:
                Image.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(root / name / f"{i}.png")
            else:
                (root / name / f"{i}.png").write_bytes(b"not a png")  # unreadable
    monkeypatch.chdir(tmp_path)  # the default run directory would be ./runs/...
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=error):
        train({**TINY, "data": str(root), "load_size": 8, "epochs": 1, "out": str(out)})
    assert not out.exists()
    with pytest.raises(ValueError, match="does not exist"):
        train({**TINY, "data": f"folder:{tmp_path / 'missing'}", "epochs": 1})
    assert not (tmp_path / "runs").exists()


def test_resuming_a_finished_run_says_so(digits_run):
    out, summary = digits_run
    messages = []
    again = train(resume=out, log=messages.append)
    text = "\n".join(messages)
    assert f"{out} is already finished (3 of 3 epochs, all epochs done): nothing left to train" in text
    assert "re-testing best/ and rewriting summary.json" in text
    assert "epoch 4" not in text and "resuming" not in text
    assert again["epochs_run"] == 3 and again["test_acc"] == pytest.approx(summary["test_acc"])
