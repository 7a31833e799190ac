"""One image path: every entry point that feeds a file to a model (training data + eval transform, `evaluate`,
`predict`, explain's `prepare_image`, `save_explanations`, `save_visualization`, the explorer) gives the model
bit-identical inputs, for 8-bit, 16-bit, grayscale, palette, RGBA and EXIF-rotated files of non-square sizes.

The inputs are captured with a forward pre-hook on the patch embedding of the model that a patched
`vitkit.weights.load_model` returns, so whichever function an entry point calls, the tensor the model really saw is
compared with the training pipeline's (`load_data` decode, then the `EvalTransform` the trainer builds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vitkit.weights
from vitkit.data import EvalTransform, load_data
from vitkit.models.vit import VisionTransformer, ViTConfig
from vitkit.weights import save_pretrained

LOAD_SIZE = 24  # the run's decode size (folders default to 224; small keeps the test fast)


def _gradient(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (h + w - 2)], axis=2)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def write_images(folder) -> dict[str, str]:
    """Files of every kind the decoder must handle, in two class folders; returns {kind: path}."""
    a, b = folder / "a", folder / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    files = {}
    rgb = _gradient(451, 300, 0)  # (H, W) = (451, 300): 300 wide, 451 tall
    files["rgb8"] = str(a / "rgb8.png")
    Image.fromarray(rgb).save(files["rgb8"])
    sixteen = (np.linspace(0, 65535, 40 * 70).reshape(40, 70)).astype(np.uint16)  # spans the whole 16-bit range
    files["gray16"] = str(a / "gray16.png")
    Image.fromarray(sixteen).save(files["gray16"])
    assert Image.open(files["gray16"]).mode.startswith("I")
    files["gray8"] = str(a / "gray8.png")
    Image.fromarray(_gradient(33, 57, 1)[:, :, 0]).save(files["gray8"])
    files["palette"] = str(b / "palette.png")
    Image.fromarray(_gradient(50, 31, 2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(files["palette"])
    rgba = np.concatenate([_gradient(45, 64, 3), np.full((45, 64, 1), 255, np.uint8)], axis=2)
    rgba[:, :20, 3] = 0  # a transparent left band: must come out white, not black
    rgba[:, 20:30, 3] = 128
    files["rgba"] = str(b / "rgba.png")
    Image.fromarray(rgba).save(files["rgba"])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    files["exif"] = str(b / "exif.jpg")
    Image.fromarray(_gradient(30, 80, 4)).save(files["exif"], exif=exif, quality=95)
    return files


def tiny_model() -> VisionTransformer:
    cfg = ViTConfig(img_size=(16, 16), patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    model = VisionTransformer(cfg).eval()
    model.preprocess.input_size = (16, 16)
    model.preprocess.crop_fraction = 0.875
    model.preprocess.mean = (0.4, 0.5, 0.6)
    model.preprocess.std = (0.2, 0.25, 0.3)
    model.preprocess.class_names = ["a", "b"]
    return model


class Capture:
    """Patches `vitkit.weights.load_model` so every loaded model records the images its patch embedding sees."""

    def __init__(self, monkeypatch) -> None:
        self.inputs: list[torch.Tensor] = []
        real = vitkit.weights.load_model

        def load_model(*args, **kwargs):
            model = real(*args, **kwargs)
            model.patch_embed.register_forward_pre_hook(lambda _m, inp: self.inputs.append(inp[0].detach().clone()))
            return model

        monkeypatch.setattr(vitkit.weights, "load_model", load_model)

    def take(self) -> list[torch.Tensor]:
        rows = [row for batch in self.inputs for row in batch]  # one (3, H, W) per image
        self.inputs.clear()
        return rows


def _assert_rows_equal(got: list[torch.Tensor], want: list[torch.Tensor], where: str) -> None:
    """Every input the model saw is bit-identical to one expected input, and every expected input was seen.

    Entry points may run an image more than once (attention pass, gradient pass, prediction), so a seen input
    may repeat; one that matches no expected input means that entry point preprocessed differently.
    """
    assert got, f"{where}: the model saw no input"
    seen = set()
    for i, g in enumerate(got):
        match = [j for j, w in enumerate(want) if g.shape == w.shape and torch.equal(g, w)]
        if not match:
            closest = min(
                ((g.float() - w.float()).abs().max().item() for w in want if w.shape == g.shape), default=None
            )
            raise AssertionError(
                f"{where}: model input {i} {tuple(g.shape)} matches no training input (closest max |diff| {closest})"
            )
        seen.update(match)
    assert seen == set(range(len(want))), f"{where}: inputs {sorted(set(range(len(want))) - seen)} never reached it"


@pytest.fixture
def files(tmp_path):
    return write_images(tmp_path / "data")


def _model_dir(tmp_path, record: dict) -> str:
    path = tmp_path / "model"
    save_pretrained(tiny_model(), path, training=record)
    return str(path)


def _entry_point_inputs(capture: Capture, checkpoint: str, paths: list[str], out) -> dict[str, list[torch.Tensor]]:
    """The model inputs every inference entry point produces for `paths` (each must see every image)."""
    from vitkit.explain import load_checkpoint, prepare_image
    from vitkit.train.evaluate import predict
    from vitkit.viz import write_explorer
    from vitkit.viz.outputs import save_explanations, save_visualization

    seen = {}
    predict(checkpoint, paths, device="cpu")
    seen["predict"] = capture.take()
    model = load_checkpoint(checkpoint)
    capture.take()
    seen["explain prepare_image"] = [prepare_image(p, model)[1][0] for p in paths]
    save_explanations(model, paths, out / "overlays", method="attention")
    seen["save_explanations"] = capture.take()
    for p in paths:
        save_visualization("attention-grid", model, out / "viz", image=p)
    seen["save_visualization"] = capture.take()
    write_explorer(out / "page.html", model, paths, top_k=1)
    seen["explorer"] = capture.take()
    return seen


def test_files_decode_to_upright_rescaled_composited_rgb(files):
    from vitkit.data.images import decode_image

    g16 = decode_image(files["gray16"])
    assert g16.shape == (40, 70, 3) and g16.dtype == np.uint8
    assert g16.min() == 0 and g16.max() == 255 and (g16 == 255).mean() < 0.01  # rescaled, not clipped at 255
    rgba = decode_image(files["rgba"])
    assert (rgba[:, :20] == 255).all()  # transparent -> white
    assert 100 < rgba[:, 20:30].astype(int).mean() < 255  # half transparent -> blended towards white
    assert decode_image(files["exif"]).shape == (80, 30, 3)  # stored 80 wide, 30 tall; shown upright
    assert decode_image(files["rgb8"]).shape == (451, 300, 3)
    # Every other form of the same picture decodes to the same pixels.
    pil = Image.open(files["rgba"])
    assert np.array_equal(decode_image(pil), rgba)
    assert np.array_equal(decode_image(np.asarray(pil)), rgba)
    assert np.array_equal(decode_image(torch.from_numpy(np.array(pil)).permute(2, 0, 1)), rgba)
    sixteen = np.asarray(Image.open(files["gray16"])).astype(np.uint16)
    assert np.array_equal(decode_image(sixteen), g16)
    assert np.array_equal(decode_image(np.asarray(pil)[:, :, :3].astype(np.float32) / 255), np.asarray(pil)[:, :, :3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        decode_image(np.full((4, 4, 3), 2.0, np.float32))
    with pytest.raises(TypeError, match="int64"):
        decode_image(np.zeros((4, 4, 3), np.int64))


def test_every_entry_point_feeds_the_model_the_training_pipelines_input(files, tmp_path, monkeypatch):
    """A run trained on a folder: decode size step, then EvalTransform, the same bits everywhere."""
    from vitkit.train.evaluate import evaluate

    folder = str(tmp_path / "data")
    record = {"data": folder, "seed": 0, "val_fraction": 0.0, "test_fraction": 0.0, "load_size": LOAD_SIZE}
    checkpoint = _model_dir(tmp_path, record)
    capture = Capture(monkeypatch)

    # The training pipeline: load_data's decode (what the trainer's batches hold) + the trainer's EvalTransform.
    splits = load_data(folder, seed=0, val_fraction=0.0, test_fraction=0.0, load_size=LOAD_SIZE)
    pre = tiny_model().preprocess
    tf = EvalTransform(pre.input_size, pre.mean, pre.std, pre.crop_fraction, pre.interpolation)
    paths = list(splits.train.paths)
    assert sorted(paths) == sorted(files.values())
    training = list(tf(splits.train.images))

    result = evaluate(checkpoint, split="all", device="cpu", batch_size=64)
    assert result["n"] == len(paths)
    _assert_rows_equal(capture.take(), training, "evaluate")
    # The same files in another folder: the model's saved decode size still applies (not the folder default).
    import shutil

    shutil.copytree(folder, tmp_path / "copy")
    evaluate(checkpoint, str(tmp_path / "copy"), split="all", device="cpu", batch_size=64)
    _assert_rows_equal(capture.take(), training, "evaluate on a copy of the folder")
    for where, rows in _entry_point_inputs(capture, checkpoint, paths, tmp_path / "out").items():
        _assert_rows_equal(rows, training, where)


def test_without_a_decode_size_every_entry_point_matches_eval_transform(files, tmp_path, monkeypatch):
    """A run on in-memory data (digits): files go full size into EvalTransform, which floors 451 * 18 / 300."""
    from vitkit.data.images import to_rgb

    checkpoint = _model_dir(tmp_path, {"data": "digits", "seed": 0})
    capture = Capture(monkeypatch)
    pre = tiny_model().preprocess
    tf = EvalTransform(pre.input_size, pre.mean, pre.std, pre.crop_fraction, pre.interpolation)
    assert tf.resized_shape(451, 300) == (27, 18)
    paths = list(files.values())
    decoded = [np.array(to_rgb(ImageOps.exif_transpose(Image.open(p)))) for p in paths]  # the training decoder
    want = [tf(torch.from_numpy(a).permute(2, 0, 1)[None])[0] for a in decoded]
    for where, rows in _entry_point_inputs(capture, checkpoint, paths, tmp_path / "out").items():
        _assert_rows_equal(rows, want, where)


@pytest.mark.parametrize(
    "error", [OSError("truncated"), SyntaxError("broken PNG file"), Image.DecompressionBombError("too many pixels")]
)
def test_naming_the_file_names_every_decoder_failure(tmp_path, error):
    from vitkit.data.images import naming_the_file

    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=rf"cannot decode image {path}: {type(error).__name__}: "):
        with naming_the_file(path):
            raise error
    with pytest.raises(FileNotFoundError):  # a missing file says so itself
        with naming_the_file(path):
            raise FileNotFoundError(path)
