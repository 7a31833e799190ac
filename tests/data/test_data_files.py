"""Folders of images and CSV lists: every PIL mode to RGB, EXIF, bad files, split layouts, lazy loading."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit.data.files as files_module
from vitkit.data import IMAGENET_MEAN, BadImageWarning, get_data_loaders, load_data

SIZE = 16


def _pixel(splits, name: str) -> np.ndarray:
    """The decoded image (H, W, 3) of the file called `name`, wherever it landed."""
    for ds in (splits.train, splits.val, splits.test):
        for i, path in enumerate(ds.paths):
            if Path(path).name == name:
                return ds[i][0].permute(1, 2, 0).numpy().astype(int)
    raise AssertionError(f"{name} not loaded")


@pytest.fixture
def mixed_folder(tmp_path: Path, writers) -> Path:
    root = tmp_path / "mixed"
    a, b = root / "a", root / "b"
    writers.save_solid(a / "gray.png", 100, mode="L")
    rgb = Image.new("RGB", (24, 20), (10, 200, 30))
    a.mkdir(parents=True, exist_ok=True)
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(a / "palette.png")
    writers.save_solid(a / "rgba.PNG", (0, 0, 255, 128), mode="RGBA")  # upper-case extension on purpose
    Image.new("RGB", (24, 20), (200, 50, 50)).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((20, 24), 32768, dtype=np.uint16)).save(a / "deep.png")  # 16-bit, mode I;16
    # EXIF orientation 6 (stored sideways): displayed, the left half (red) is on top and the right half (blue) below.
    sideways = Image.new("RGB", (40, 20), (255, 0, 0))
    sideways.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    b.mkdir(parents=True, exist_ok=True)
    sideways.save(b / "exif.jpg", quality=95, exif=exif.tobytes())
    writers.save_solid(b / "img.webp", (0, 128, 255), lossless=True)
    writers.save_solid(b / "img.bmp", (1, 2, 3))
    writers.save_solid(b / "img.tiff", (250, 240, 5))
    # Bad files: corrupt, zero bytes, truncated, text with an image extension, a non-image extension.
    (a / "corrupt.jpg").write_bytes(bytes(range(256)) * 4)
    (a / "empty.png").write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(b / "whole.png")
    data = (b / "whole.png").read_bytes()
    (b / "whole.png").unlink()
    (b / "truncated.png").write_bytes(data[: len(data) // 2])
    (b / "text.png").write_text("hello, not a png")
    (b / "notes.txt").write_text("labelling notes")
    (b / ".DS_Store").write_bytes(b"\0\1")  # hidden files are ignored, not reported
    return root


def test_folder_decodes_every_mode_to_rgb(mixed_folder: Path) -> None:
    with pytest.warns(BadImageWarning):
        splits = load_data(str(mixed_folder), load_size=SIZE, val_fraction=0.0, test_fraction=0.0)
    assert splits.class_names == ["a", "b"]
    assert len(splits.train) == 9 and len(splits.val) == 0 and len(splits.test) == 0
    assert splits.train.images.shape == (9, 3, SIZE, SIZE) and splits.train.images.dtype == torch.uint8
    assert (splits.mean, splits.std)[0] == IMAGENET_MEAN
    exact = {"gray.png": (100, 100, 100), "palette.png": (10, 200, 30), "deep.png": (128, 128, 128)}
    exact |= {"img.webp": (0, 128, 255), "img.bmp": (1, 2, 3), "img.tiff": (250, 240, 5)}
    for name, color in exact.items():
        assert (_pixel(splits, name) == color).all(), name
    # Half-transparent blue over white: B stays 255, R and G become about half of 255.
    rgba = _pixel(splits, "rgba.PNG")
    assert np.abs(rgba - (127, 127, 255)).max() <= 1
    assert np.abs(_pixel(splits, "cmyk.jpg") - (200, 50, 50)).max() <= 6  # JPEG is lossy
    labels = {Path(p).name: int(lab) for p, lab in zip(splits.train.paths, splits.train.labels)}
    assert labels["gray.png"] == 0 and labels["img.bmp"] == 1


def test_exif_orientation_is_honoured(mixed_folder: Path) -> None:
    with pytest.warns(BadImageWarning):
        splits = load_data(str(mixed_folder), load_size=SIZE, val_fraction=0.0, test_fraction=0.0)
    img = _pixel(splits, "exif.jpg")  # (H, W, 3)
    top, bottom = img[:5].reshape(-1, 3).mean(0), img[-5:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, top  # red on top: rotated 90 degrees clockwise, as EXIF 6 says
    assert bottom[2] > 200 and bottom[0] < 50, bottom
    # Without the rotation the split would run left/right instead.
    assert np.abs(img[:, :5].mean((0, 1)) - img[:, -5:].mean((0, 1))).max() < 10


def test_bad_files_are_skipped_and_reported_once(mixed_folder: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(str(mixed_folder), load_size=SIZE)
    bad = [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(bad) == 1
    names = sorted(Path(p).name for p, _ in splits.skipped)
    assert names == ["corrupt.jpg", "empty.png", "notes.txt", "text.png", "truncated.png"]
    for path, _reason in splits.skipped:
        assert path in str(bad[0].message)
    reasons = dict((Path(p).name, r) for p, r in splits.skipped)
    assert "0 bytes" in reasons["empty.png"]
    assert "not an image file" in reasons["notes.txt"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 9


def test_strict_raises_naming_the_bad_file(two_class_folder: Path) -> None:
    bad = two_class_folder / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_data(str(two_class_folder), load_size=SIZE, strict=True)
    with pytest.warns(BadImageWarning, match="broken.jpg"):
        splits = load_data(f"folder:{two_class_folder}", load_size=SIZE)
    assert [Path(p).name for p, _ in splits.skipped] == ["broken.jpg"]
    assert splits.source == f"folder:{two_class_folder}"


def test_folder_split_is_stratified_disjoint_and_deterministic(tmp_path: Path, writers) -> None:
    root = tmp_path / "many"
    for c in range(3):
        for i in range(20):
            writers.save_solid(root / f"class{c}" / f"{i:02d}.png", (c * 80, i * 10, 0), size=(8, 8))
    a = load_data(str(root), load_size=8, seed=1, val_fraction=0.2, test_fraction=0.1)
    b = load_data(str(root), load_size=8, seed=1, val_fraction=0.2, test_fraction=0.1)
    c = load_data(str(root), load_size=8, seed=2, val_fraction=0.2, test_fraction=0.1)
    sets = [set(ds.paths) for ds in (a.train, a.val, a.test)]
    assert [len(s) for s in sets] == [42, 12, 6]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert torch.bincount(a.val.labels).tolist() == [4, 4, 4] and torch.bincount(a.test.labels).tolist() == [2, 2, 2]
    assert a.val.paths == b.val.paths and torch.equal(a.train.images, b.train.images)
    assert a.val.paths != c.val.paths
    # Pixels follow their paths: class c, image i is (c * 80, i * 10, 0).
    for img, label, path in zip(a.test.images, a.test.labels, a.test.paths):
        assert img[0, 0, 0] == int(label) * 80 and img[1, 0, 0] == int(Path(path).stem) * 10


def test_train_val_test_subfolders_are_used(tmp_path: Path, writers) -> None:
    root = tmp_path / "presplit"
    counts = {"train": 5, "valid": 2, "test": 3}
    for split, n in counts.items():
        for cls in ("ant", "bee"):
            for i in range(n):
                writers.save_solid(root / split / cls / f"{i}.png", (10, 20, 30), size=(8, 8))
    splits = load_data(str(root), load_size=8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 6)
    assert splits.class_names == ["ant", "bee"]
    assert all("/valid/" in p for p in splits.val.paths) and all("/test/" in p for p in splits.test.paths)
    # Without a val/ folder, val is carved from train/ by seed.
    (root / "valid").rename(tmp_path / "elsewhere")
    splits = load_data(str(root), load_size=8, val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 6)
    assert all("/train/" in p for p in splits.val.paths)
    # Split folders without train/ are an error, not two classes named "test" and "valid".
    (tmp_path / "elsewhere").rename(root / "valid")
    (root / "train").rename(tmp_path / "train_elsewhere")
    with pytest.raises(ValueError, match=r"split folders \['test', 'valid'\] but no train/"):
        load_data(str(root), load_size=8)


def test_lazy_dataset_matches_in_memory(mixed_folder: Path, monkeypatch) -> None:
    with pytest.warns(BadImageWarning):
        eager = load_data(str(mixed_folder), load_size=SIZE, seed=3)
    monkeypatch.setattr(files_module, "IN_MEMORY_BYTES", 0)
    with pytest.warns(BadImageWarning):
        lazy = load_data(str(mixed_folder), load_size=SIZE, seed=3)
    assert lazy.train.images is None and lazy.train.paths == eager.train.paths
    assert len(lazy.skipped) == len(eager.skipped) == 5
    for i in range(len(lazy.train)):
        assert torch.equal(lazy.train[i][0], eager.train[i][0]) and lazy.train[i][1] == eager.train[i][1]
    batch, labels = next(iter(torch.utils.data.DataLoader(lazy.train, batch_size=4)))
    assert batch.shape == (4, 3, SIZE, SIZE) and batch.dtype == torch.uint8 and labels.dtype == torch.long
    # A file that breaks after validation gives a warning and a black image, not a crashed epoch.
    Path(lazy.train.paths[0]).write_bytes(b"gone bad")
    with pytest.warns(BadImageWarning, match=Path(lazy.train.paths[0]).name):
        img, _ = lazy.train[0]
    assert img.shape == (3, SIZE, SIZE) and int(img.max()) == 0


def test_csv_with_header_relative_paths_and_missing_file(tmp_path: Path, writers) -> None:
    for i in range(4):
        writers.save_solid(tmp_path / "imgs" / f"r{i}.png", (255, 0, 0), size=(10, 10))
        writers.save_solid(tmp_path / "imgs" / f"g{i}.png", (0, 255, 0), size=(10, 10))
    rows = ["path,label,comment"]
    rows += [f"imgs/r{i}.png,red,x" for i in range(4)]
    rows += [f"{tmp_path}/imgs/g{i}.png,green,y" for i in range(4)]
    rows += ["imgs/missing.png,green,z"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(BadImageWarning, match="missing.png"):
        splits = load_data(str(tmp_path / "list.csv"), load_size=8, val_fraction=0.25, test_fraction=0.25)
    assert splits.class_names == ["green", "red"]
    assert [(Path(p).name, r) for p, r in splits.skipped] == [("missing.png", "file not found")]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 2)
    for ds in (splits.train, splits.val, splits.test):
        for img, label in zip(ds.images, ds.labels):  # green is class 0, red class 1
            assert img[int(label), 0, 0] == 0 and img[1 - int(label), 0, 0] == 255
    with pytest.raises(ValueError, match="missing.png"):
        load_data(f"csv:{tmp_path / 'list.csv'}", load_size=8, strict=True)


def test_csv_integer_labels_sort_numerically(tmp_path: Path, writers) -> None:
    lines = []
    for label in ("2", "10", "1"):
        for i in range(3):
            writers.save_solid(tmp_path / f"{label}_{i}.png", (int(label), 0, 0), size=(8, 8))
            lines.append(f"{label}_{i}.png,{label}")
    (tmp_path / "nums.csv").write_text("\n".join(lines))  # no header: the first row's path is a file
    splits = load_data(f"csv:{tmp_path / 'nums.csv'}", load_size=8, val_fraction=0.0, test_fraction=0.0)
    assert splits.class_names == ["1", "2", "10"] and len(splits.train) == 9
    for img, label in zip(splits.train.images, splits.train.labels):
        assert int(img[0, 0, 0]) == int(splits.class_names[int(label)])


def test_folder_errors(tmp_path: Path, writers) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty dataset"):
        load_data(str(tmp_path / "empty"))
    writers.save_solid(tmp_path / "one" / "only" / "x.png", (1, 1, 1))
    with pytest.raises(ValueError, match="need at least 2 classes"):
        load_data(str(tmp_path / "one"))
    writers.save_solid(tmp_path / "hole" / "full" / "x.png", (1, 1, 1))
    (tmp_path / "hole" / "vacant").mkdir()
    with pytest.raises(ValueError, match="vacant"):
        load_data(str(tmp_path / "hole"))
    # A class whose every file is bad is as empty as one with no files.
    writers.save_solid(tmp_path / "rotten" / "good" / "x.png", (1, 1, 1))
    (tmp_path / "rotten" / "bad").mkdir()
    (tmp_path / "rotten" / "bad" / "y.png").write_bytes(b"junk")
    with pytest.warns(BadImageWarning), pytest.raises(ValueError, match="bad"):
        load_data(str(tmp_path / "rotten"))
    with pytest.raises(ValueError, match="does not exist"):
        load_data(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "list.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="empty dataset"):
        load_data(str(tmp_path / "list.csv"))


def test_get_data_loaders_on_a_folder(two_class_folder: Path) -> None:
    train, val = get_data_loaders(str(two_class_folder), batch_size=4, img_size=12, seed=0)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 12, 12) and images.dtype == torch.uint8
    assert set(labels.tolist()) <= {0, 1}
    assert sum(len(b[1]) for b in val) == 2
