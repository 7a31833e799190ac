"""In-memory sources: digits, shapes, CIFAR pickles (and the unpickler's refusals), MNIST IDX; spec errors."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit.data import SHAPE_CLASSES, ImageDataset, get_data_loaders, load_data
from vitkit.data.dataset import stratified_split
from vitkit.data.idx import FASHION_MNIST_CLASSES, read_idx
from vitkit.data.shapes import make_shapes


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def _image_multiset(*datasets: ImageDataset) -> Counter:
    return Counter(img.numpy().tobytes() for ds in datasets for img in ds.images)


def test_digits_shapes_sizes_and_stats(digits) -> None:
    assert digits.class_names == [str(i) for i in range(10)] and digits.source == "digits"
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert (len(digits.val), len(digits.test)) == (179, 179)
    img, label = digits.train[0]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and isinstance(label, int)
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])  # gray replicated to RGB
    assert int(digits.train.images.max()) == 255 and int(digits.train.images.min()) == 0  # 0..16 scaled
    x = digits.train.images.double() / 255
    assert digits.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()), abs=1e-6)
    assert digits.std == pytest.approx(tuple(x.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-6)
    assert digits.train.masks is None and digits.train.boxes is None and digits.train.paths is None


def test_digits_splits_are_disjoint_and_deterministic(digits) -> None:
    from sklearn.datasets import load_digits

    everything = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    expected = Counter(np.repeat(img[None], 3, 0).tobytes() for img in everything)
    assert _image_multiset(digits.train, digits.val, digits.test) == expected  # a partition of the 1797 images
    again = load_data("digits", seed=0)
    assert torch.equal(again.val.images, digits.val.images) and torch.equal(again.test.labels, digits.test.labels)
    other = load_data("digits", seed=1)
    assert not torch.equal(other.val.images, digits.val.images)
    assert torch.bincount(digits.val.labels, minlength=10).min() >= 17  # stratified: ~18 of each digit


def test_stratified_split_partitions_every_class() -> None:
    labels = np.array([0] * 50 + [1] * 7 + [2] * 3)
    train, val, test = stratified_split(labels, (0.2, 0.1), seed=0)
    allidx = np.concatenate([train, val, test])
    assert sorted(allidx.tolist()) == list(range(60))
    assert np.bincount(labels[val], minlength=3).tolist() == [10, 1, 1]
    assert np.bincount(labels[test], minlength=3).tolist() == [5, 1, 1]
    assert np.bincount(labels[train], minlength=3).min() >= 1


def test_load_size_resizes_in_memory_sources(digits) -> None:
    big = load_data("digits", load_size=16)
    assert big.train.images.shape[1:] == (3, 16, 16)
    assert torch.equal(big.train.labels, digits.train.labels)
    with pytest.raises(ValueError, match="shapes_size"):
        load_data("shapes:8", load_size=32)


def test_shapes_are_deterministic_balanced_and_masks_match_boxes() -> None:
    images, labels, masks, boxes = make_shapes(200, 48, 48, seed=3)
    again = make_shapes(200, 48, 48, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(masks, again[2])
    assert not torch.equal(images, make_shapes(200, 48, 48, seed=4)[0])
    assert images.shape == (200, 3, 48, 48) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=4).tolist() == [50, 50, 50, 50]
    for mask, box in zip(masks, boxes):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        side = max(box[2] - box[0], box[3] - box[1])
        assert 0.15 * 48 <= side <= 0.62 * 48  # inscribed in a 25-60% circle; squares/triangles come out smaller
    # The shape is visible: its colour stands apart from the background.
    for img, mask in zip(images[:20].float(), masks[:20]):
        inside, outside = img[:, mask].mean(1), img[:, ~mask].mean(1)
        assert (inside - outside).abs().max() > 40
    # Relative areas follow the geometry: circle > square > star, triangle.
    area = masks.flatten(1).float().sum(1) / ((boxes[:, 2] - boxes[:, 0]).float() ** 2)
    per_class = [float(area[labels == c].mean()) for c in range(4)]
    assert per_class[0] == pytest.approx(np.pi / 4, abs=0.08)
    assert per_class[1] > per_class[3]


def test_shapes_source_splits_and_non_square() -> None:
    splits = load_data("shapes:120", seed=5, shapes_size=32)
    assert splits.class_names == SHAPE_CLASSES == ["circle", "square", "triangle", "star"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (96, 12, 12)
    for ds in (splits.train, splits.val, splits.test):
        assert ds.masks.shape == (len(ds), 32, 32) and ds.boxes.shape == (len(ds), 4)
        for mask, box in zip(ds.masks, ds.boxes):
            x0, y0, x1, y1 = box.tolist()
            assert mask[y0:y1, x0:x1].sum() == mask.sum() > 0
    same = load_data("shapes:120", seed=5, shapes_size=32)
    assert torch.equal(same.test.images, splits.test.images) and torch.equal(same.test.boxes, splits.test.boxes)
    wide = load_data("shapes", shapes_count=8, shapes_hw=(24, 40), val_fraction=0.0, test_fraction=0.0)
    assert wide.train.images.shape == (8, 3, 24, 40) and wide.train.masks.shape == (8, 24, 40)
    assert int(wide.train.boxes[:, 2].max()) <= 40 and int(wide.train.boxes[:, 3].max()) <= 24
    with pytest.raises(ValueError, match="positive integer"):
        load_data("shapes:many")


def test_cifar10_protocol2_bytes_keys_and_parent_dir(tmp_path: Path, writers) -> None:
    batches = writers.write_cifar10(tmp_path / "cifar-10-batches-py", protocol=2)
    splits = load_data(f"cifar10:{tmp_path}", val_fraction=0.1)
    assert splits.class_names[:3] == ["airplane", "automobile", "bird"] and len(splits.class_names) == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    first = batches["test_batch"][b"data"][0].reshape(3, 32, 32)
    assert torch.equal(splits.test.images[0], torch.from_numpy(first))
    assert splits.test.labels.tolist() == batches["test_batch"][b"labels"]
    train_all = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    expected = Counter(img.tobytes() for img in train_all)
    assert _image_multiset(splits.train, splits.val) == expected
    x = splits.train.images.double() / 255
    assert splits.mean[0] == pytest.approx(float(x[:, 0].mean()), abs=1e-6)


def test_cifar100_protocol5_numpy_labels(tmp_path: Path, writers) -> None:
    data = writers.write_cifar100(tmp_path, protocol=5)
    splits = load_data(f"cifar100:{tmp_path}", val_fraction=0.0)
    assert len(splits.class_names) == 100 and splits.class_names[7] == "class_07"
    assert splits.train.labels.tolist() == data["train"]["fine_labels"].tolist()
    assert torch.equal(splits.test.images[3], torch.from_numpy(data["test"]["data"][3].reshape(3, 32, 32)))


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path, writers) -> None:
    folder = tmp_path / "cifar"
    writers.write_cifar10(folder)
    sentinel = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(sentinel), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3.*refusing to load global '(posix|os|nt)\.system'"):
        load_data(f"cifar10:{folder}")
    assert not sentinel.exists()


def test_cifar_label_out_of_range_and_missing_files(tmp_path: Path, writers) -> None:
    folder = tmp_path / "c10"
    batches = writers.write_cifar10(folder)
    bad = dict(batches["data_batch_2"])
    bad[b"labels"] = [*bad[b"labels"][:-1], 10]
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2: label 10 is outside the class range 0\.\.9"):
        load_data(f"cifar10:{folder}")
    (folder / "test_batch").unlink()
    with pytest.raises(ValueError, match="test_batch is missing"):
        load_data(f"cifar10:{folder}")
    with pytest.raises(ValueError, match="no CIFAR data"):
        load_data(f"cifar100:{folder}")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_raw_and_gz(tmp_path: Path, writers, gz: bool) -> None:
    arrays = writers.write_mnist(tmp_path, gz=gz)
    splits = load_data(f"mnist:{tmp_path}", val_fraction=0.0)
    assert splits.class_names == [str(i) for i in range(10)]
    assert (len(splits.train), len(splits.test)) == (12, 6)
    assert splits.train.images.shape == (12, 3, 28, 28)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][2])
    assert all(torch.equal(splits.test.images[2, c], expected) for c in range(3))
    assert splits.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    fashion = load_data(f"fashion-mnist:{tmp_path}", val_fraction=0.0)
    assert fashion.class_names == FASHION_MNIST_CLASSES and fashion.class_names[0] == "T-shirt/top"


def test_idx_header_validation(tmp_path: Path, writers) -> None:
    writers.write_idx(tmp_path / "floats", np.arange(6, dtype=np.float32).reshape(2, 3), code=0x0D)
    assert read_idx(tmp_path / "floats").tolist() == [[0, 1, 2], [3, 4, 5]]
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="bad_magic has bad magic number 0x12340801"):
        read_idx(bad_magic)
    bad_code = tmp_path / "bad_code"
    bad_code.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="bad_code has unknown dtype code 0x07"):
        read_idx(bad_code)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x02" + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match=r"short: header says shape \(3, 4\) \(12 bytes of data\)"):
        read_idx(short)
    (tmp_path / "notgz.gz").write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="notgz.gz"):
        read_idx(tmp_path / "notgz.gz")


def test_mnist_corrupt_header_and_label_range(tmp_path: Path, writers) -> None:
    arrays = writers.write_mnist(tmp_path)
    writers.write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0] * 11 + [10], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: label 10 is outside the class range 0\.\.9"):
        load_data(f"mnist:{tmp_path}")
    writers.write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"])
    data = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x01" + data[1:])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte has bad magic number"):
        load_data(f"mnist:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(ValueError, match="no IDX file t10k-images-idx3-ubyte"):
        load_data(f"mnist:{tmp_path}")


def test_spec_and_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data spec 'imagenet'") as err:
        load_data("imagenet")
    for form in ("digits", "shapes:N", "folder:PATH", "csv:FILE", "cifar10:DIR", "fashion-mnist:DIR"):
        assert form in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_data(f"cifar10:{tmp_path / 'absent'}")
    with pytest.raises(ValueError, match="missing the path"):
        load_data("mnist:")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .csv"):
        load_data(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_data("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="must be < 1"):
        load_data("digits", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="load_size"):
        load_data("digits", load_size=0)
    with pytest.raises(TypeError, match="data spec must be a string"):
        load_data(3)
    with pytest.raises(ValueError, match="at least 16"):
        load_data("shapes:8", shapes_size=8)


def test_image_dataset_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="label 3 is outside the class range 0..1"):
        ImageDataset(labels=[0, 3], class_names=["a", "b"], images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset(labels=[0], class_names=["a", "b"], images=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="needs `images`"):
        ImageDataset(labels=[0], class_names=["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        ImageDataset(labels=[0], class_names=["a", "b"], images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_get_data_loaders_digits_are_seeded() -> None:
    train, val = get_data_loaders("digits", batch_size=64, seed=0)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.long
    train2, _ = get_data_loaders("digits", batch_size=64, seed=0)
    assert torch.equal(next(iter(train2))[1], y)
    train3, _ = get_data_loaders("digits", batch_size=64, seed=1)
    assert not torch.equal(next(iter(train3))[1], y)
    assert sum(len(b[1]) for b in val) == 179
