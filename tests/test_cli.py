"""CLI papercuts: predict on folders, --target refused where it does nothing, flags (not Python arguments) in
messages, clean bad-image warnings, human-readable sizes and no top-5 for 5 classes or fewer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import cli_message, human_size, main
from vitkit.models.vit import VisionTransformer, ViTConfig
from vitkit.weights import save_pretrained

CLASSES = ["dark", "mid", "light"]


def _png(path, level: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(level)
    Image.fromarray((rng.integers(0, 40, (size, size, 3)) + level).astype(np.uint8)).save(path)


@pytest.fixture
def model_dir(tmp_path):
    """A 3-class tiny ViT saved as a model directory that records a folder of 3 classes as its data."""
    data = tmp_path / "data"
    for k, name in enumerate(CLASSES):
        for i in range(4):
            _png(data / name / f"{i}.png", 90 * k)
    cfg = ViTConfig(img_size=(16, 16), patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    model = VisionTransformer(cfg).eval()
    model.preprocess.input_size = (16, 16)
    model.preprocess.class_names = list(CLASSES)
    record = {"data": str(data), "seed": 0, "val_fraction": 0.25, "test_fraction": 0.25, "load_size": 16}
    save_pretrained(model, tmp_path / "model", training=record)
    return tmp_path / "model"


def test_predict_takes_a_folder_recursively_sorted_skipping_non_images(model_dir, tmp_path, capsys):
    from vitkit.train import predict

    folder = tmp_path / "photos"
    for rel in ("b.png", "a.jpg", "sub/c.png", "sub/deeper/d.PNG"):
        _png(folder / rel, 50)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"ignored")
    single = tmp_path / "single.png"
    _png(single, 10)
    want = [str(folder / p) for p in ("a.jpg", "b.png", "sub/c.png", "sub/deeper/d.PNG")] + [str(single)]
    results = predict(model_dir, [folder, single], topk=2, device="cpu")
    assert [r["path"] for r in results] == want
    assert main(["predict", "--checkpoint", str(model_dir), str(folder), "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in printed] == want[:4]
    for r in printed:
        assert len(r["top"]) == 3 and sum(t["prob"] for t in r["top"]) == pytest.approx(1.0, abs=1e-5)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("x")
    assert main(["predict", "--checkpoint", str(model_dir), str(empty), "--device", "cpu"]) == 2
    assert f"folder '{empty}' has no image files (supported: .jpg" in capsys.readouterr().err


def test_target_is_refused_by_class_agnostic_methods(model_dir, tmp_path, capsys):
    from vitkit.explain import load_checkpoint
    from vitkit.viz.outputs import save_explanations

    image = tmp_path / "x.png"
    _png(image, 100)
    for method in ("attention", "rollout"):
        args = ["explain", str(image), "--checkpoint", str(model_dir), "--method", method, "--target", "light"]
        assert main([*args, "--out", str(tmp_path / method)]) == 2
        err = capsys.readouterr().err
        assert f"--target 2 has no effect on --method {method}" in err, err
        assert "grad-rollout, relevance" in err and "target=" not in err
        assert not (tmp_path / method).exists()
    model = load_checkpoint(model_dir)
    with pytest.raises(ValueError, match=r"target=1 has no effect on method='rollout'.*grad-rollout, relevance"):
        save_explanations(model, [image], tmp_path / "lib", method="rollout", target=1)
    written = save_explanations(model, [image], tmp_path / "lib", method="relevance", target=1)
    assert "explaining mid" in written[0][1]


def test_errors_reaching_the_cli_name_flags_not_python_arguments(tmp_path, capsys):
    # A 48-wide timm ViT: 48 is not a multiple of 64, so the head count cannot be read off the weights.
    src = VisionTransformer(ViTConfig(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3, num_classes=2))
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    assert main(["convert", str(tmp_path / "vit.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the number of attention heads" in err
    assert "pass --model (a registered name, see `vitkit models`)" in err, err
    assert "model_name=" not in err and "list_models()" not in err
    assert not (tmp_path / "out").exists()


def test_cli_message_translation_table():
    assert cli_message("pass img_size=(16, 24) or model_name=", "convert") == "pass --img-size 16 24 or --model"
    assert (
        cli_message("bad file (pass strict=False to skip bad files)", "train")
        == "bad file (pass --no-strict to skip bad files)"
    )
    assert cli_message("pass data=... to choose", "eval") == "pass --data to choose"
    assert cli_message("load_size=8 does not apply", "train") == "--set load_size=8 does not apply"
    assert cli_message("method='rollout' and num_heads=2", "explain") == "--method rollout and num_heads=2"
    assert cli_message("model_name= is unknown here", "models") == "model_name= is unknown here"
    # A spelled-out Python call stays Python; the text around it is still translated.
    text = "load it back with vitkit.load_model(path, model_name='vit_nano', img_size=(16, 16)) or pass model_name="
    assert cli_message(text, "convert") == text.replace("pass model_name=", "pass --model")


def test_bad_image_warning_is_one_clean_line_and_top5_is_left_out_for_3_classes(model_dir, tmp_path, capsys):
    from vitkit.data import BadImageWarning
    from vitkit.train import evaluate

    data = tmp_path / "data"
    (data / "light" / "broken.png").write_bytes(b"not a png")
    assert main(["eval", "--checkpoint", str(model_dir), "--split", "all", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    warning_lines = [line for line in captured.err.splitlines() if "broken.png" in line or "warning" in line]
    assert warning_lines[0] == f"vitkit eval: warning: skipped 1 bad file(s) in {data}:", captured.err
    assert "warnings.warn" not in captured.err and ".py:" not in captured.err
    assert "top-1" in captured.out and "top-5" not in captured.out
    with pytest.warns(BadImageWarning, match="broken.png"):  # library users still get the category
        result = evaluate(model_dir, split="all", device="cpu")
    assert result["top5"] is None and result["n"] == 12


def test_explorer_size_is_human_readable(model_dir, tmp_path, capsys):
    image = tmp_path / "x.png"
    _png(image, 100)
    page = tmp_path / "page.html"
    assert main(["explain", str(image), "--checkpoint", str(model_dir), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    size = page.stat().st_size
    assert 1000 < size < 1_000_000
    assert f"wrote {page} ({human_size(size)}, self-contained)" in out
    assert re.search(r"\(\d+(\.\d)? KB, self-contained\)", out) and "MiB" not in out
    assert [human_size(n) for n in (512, 39_400, 4_250_000, 2_000_000_000)] == ["512 B", "39 KB", "4.2 MB", "2.0 GB"]


def test_predict_takes_one_path_as_a_string_not_as_letters(model_dir, tmp_path):
    from vitkit.data.images import list_image_files
    from vitkit.train import predict

    folder = tmp_path / "photos"
    for rel in ("a.png", "sub/b.png"):
        _png(folder / rel, 50)
    assert (
        list_image_files(str(folder))
        == list_image_files([folder])
        == [str(folder / "a.png"), str(folder / "sub/b.png")]
    )
    assert [r["path"] for r in predict(model_dir, str(folder), device="cpu")] == list_image_files(folder)


def test_target_without_overlays_is_refused(model_dir, tmp_path, capsys):
    image = tmp_path / "x.png"
    _png(image, 100)
    args = ["explain", str(image), "--checkpoint", str(model_dir), "--method", "relevance", "--target", "light"]
    assert main([*args, "--html", str(tmp_path / "e.html")]) == 2
    assert "--target light applies to the --out overlays" in capsys.readouterr().err
    assert not (tmp_path / "e.html").exists()


def test_train_messages_name_every_setting_as_a_flag():
    assert cli_message("device='foo' is not allowed", "train") == "--device foo is not allowed"
    assert cli_message("freeze_layers=5 must be an integer", "train") == "--freeze-layers 5 must be an integer"
    assert cli_message("monitor='ema_acc' needs ema: true", "train") == "--monitor ema_acc needs ema: true"
    assert cli_message("set load_size=48", "train") == "set --set load_size=48"
    # not a training setting: left alone rather than turned into a `--set num_classes` that does not exist
    assert cli_message("the head has num_classes=0", "train") == "the head has num_classes=0"


def test_an_empty_split_says_which_splits_to_choose(model_dir, tmp_path, capsys):
    """`vitkit eval --data FOLDER` on a folder too small for a test split names --split, as detection's eval does."""
    small = tmp_path / "small"
    for name in CLASSES:
        _png(small / name / "0.png", 0)
    assert main(["eval", "--checkpoint", str(model_dir), "--data", str(small), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the test split of" in err and "is empty" in err and "--split" in err, err
