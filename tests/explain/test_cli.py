"""`vitkit explain`, `vitkit visualize` and `vitkit explain-eval` end to end on a tiny saved model."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.explain.conftest import make_model
from vitkit.cli import main
from vitkit.explain import EVAL_METHODS, resolve_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake training run: RUN/best holds a 32 x 32 model with class names; RUN/last another one."""
    root = tmp_path_factory.mktemp("run")
    model = make_model("registers", img_size=32)
    model.preprocess.class_names = ["circle", "square", "triangle", "star", "<b>x</b>"]
    model.save_pretrained(root / "best")
    make_model("registers", img_size=32).save_pretrained(root / "last")
    return root


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_resolve_checkpoint(run_dir, tmp_path):
    assert resolve_checkpoint(run_dir) == run_dir / "best"
    assert resolve_checkpoint(run_dir / "last") == run_dir / "last"
    with pytest.raises(ValueError, match="is neither a vitkit model directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")


def test_explain_writes_overlays_and_html(run_dir, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    html = tmp_path / "page.html"
    rc = main(["explain", str(image_file), "--checkpoint", str(run_dir), "--method", "relevance", "--target", "star",
               "--out", str(out), "--html", str(html)])  # fmt: skip
    assert rc == 0
    assert (out / "photo_relevance.png").stat().st_size > 2000
    printed = capsys.readouterr().out
    assert "explaining star" in printed and "self-contained" in printed
    assert "https://" not in html.read_text() and "<b>x</b>" not in html.read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "attention", "--head", "7"], "head 7 is out of range for 2 heads"),
        (["--method", "attention", "--layer", "5"], "layer 5 is out of range"),
        (["--discard-ratio", "1.5"], r"discard_ratio must be in \[0, 1\)"),
        (["--target", "dog"], "target 'dog' is neither a class index"),
    ],
)
def test_explain_errors(run_dir, image_file, tmp_path, capsys, argv, message):
    rc = main(["explain", str(image_file), "--checkpoint", str(run_dir), "--out", str(tmp_path), *argv])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)


def test_explain_needs_an_output(run_dir, image_file, capsys):
    assert main(["explain", str(image_file), "--checkpoint", str(run_dir)]) == 2
    assert "nothing to write" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["patches", "filters", "pos-embed", "augment", "attention-distance"])
def test_visualize(run_dir, image_file, tmp_path, kind, capsys):
    assert main(["visualize", kind, str(image_file), "--checkpoint", str(run_dir), "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{kind}.png").stat().st_size > 2000
    assert f"{kind}.png" in capsys.readouterr().out


def test_visualize_needs_an_image(run_dir, tmp_path, capsys):
    assert main(["visualize", "patches", "--checkpoint", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "needs an IMAGE" in capsys.readouterr().err


def test_explain_eval(run_dir, tmp_path, capsys):
    rc = main(["explain-eval", "--checkpoint", str(run_dir), "--count", "6", "--max-steps", "4",
               "--methods", "rollout", "random", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["count"] == 6 and set(results["methods"]) == {"rollout", "random"}
    assert results["image_size"] == 32 and results["grid"] == [4, 4]
    assert "| rollout |" in (tmp_path / "results.md").read_text()
    assert "| random |" in capsys.readouterr().out


def test_explain_eval_default_methods_run_on_a_classifier(run_dir, tmp_path):
    """Without --methods, explain-eval compares every method the library evaluates. Its default once also held
    explain's "cross-attention" (DETR only), so `vitkit explain-eval --checkpoint RUN --out DIR` always failed."""
    rc = main(["explain-eval", "--checkpoint", str(run_dir), "--count", "2", "--max-steps", "2",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    assert set(json.loads((tmp_path / "results.json").read_text())["methods"]) == set(EVAL_METHODS)


def test_explain_eval_gradcam_uses_its_default_stage(run_dir, tmp_path):
    """explain-eval's --layer defaulted to -1, which Grad-CAM took as its stage: the last block of a class-token ViT,
    whose patch tokens get no gradient, so every map was zero (energy 0, pointing game 0%). Without --layer each
    method uses its own default (gradcam: the second to last block)."""
    rc = main(["explain-eval", "--checkpoint", str(run_dir), "--count", "4", "--max-steps", "4",
               "--methods", "gradcam", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    gradcam = json.loads((tmp_path / "results.json").read_text())["methods"]["gradcam"]
    assert gradcam["energy"] > 0


def test_explain_eval_refuses_data_without_masks(run_dir, tmp_path, capsys):
    assert main(["explain-eval", "--checkpoint", str(run_dir), "--data", "digits", "--out", str(tmp_path)]) == 2
    assert "only the shapes data has" in capsys.readouterr().err
