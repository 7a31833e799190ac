"""`extract_features`: the contract's pooled pre-logits embedding for every family, from folders, lists, CSVs and
datasets, with paths or dataset indices and labels where the source has them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.explain.test_families import FAMILIES, SIDE, tiny_model
from tests.features.conftest import tiny_vit, write_png
from vitkit.data import load_data
from vitkit.data.inference import prepare_images
from vitkit.features import extract_features, list_images


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_its_pooled_features(family, image_folder):
    model = tiny_model(family)
    paths = [str(p) for p in sorted(image_folder.rglob("*.png"))][:3]
    feats = extract_features(model, paths, batch_size=2)  # 2 batches: batching must not change the rows
    assert feats.features.shape == (3, model.num_features) and feats.features.dtype == torch.float32
    torch.testing.assert_close(feats.features.norm(dim=1), torch.ones(3))
    _crops, x = prepare_images(paths, model)  # the eval preprocessing `predict` uses
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats.features, F.normalize(expected, dim=1), atol=1e-5, rtol=1e-4)
    raw = extract_features(model, paths, normalize=False)
    torch.testing.assert_close(raw.features, expected, atol=1e-5, rtol=1e-4)
    assert feats.paths == paths and feats.labels is None and feats.model["family"] == family
    assert model.preprocess.input_size == (SIDE, SIDE)


def test_a_model_without_a_pooled_embedding_is_refused(image_folder):
    model = tiny_vit()
    model.cfg.pool = "none"
    with pytest.raises(ValueError, match=r"shape \(1, 17, 16\), not \(B, num_features\).*pool='none'"):
        extract_features(model, [str(image_folder / "dark" / "0.png")])


def test_folder_layouts_and_lists(tmp_path, image_folder):
    paths, labels, names, source = list_images(image_folder)
    assert names == ["dark", "light"] and labels == [0, 0, 0, 0, 1, 1, 1, 1]
    assert source["labelled"] is True

    flat = tmp_path / "flat"
    for i in range(3):
        write_png(flat / f"{i}.png", seed=i)
    paths, labels, names, source = list_images(flat)
    assert len(paths) == 3 and labels is None and names is None and source["labelled"] is False

    split = tmp_path / "split"
    for s, cls in (("train", "cat"), ("train", "dog"), ("test", "dog")):
        write_png(split / s / cls / "0.png", seed=1)
    paths, labels, names, _ = list_images(split)
    assert names == ["cat", "dog"]  # classes are the folders under train/ and test/, not the split names
    assert [(p.split("/")[-3], labels[i]) for i, p in enumerate(paths)] == [("test", 1), ("train", 0), ("train", 1)]

    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nflat/0.png\n\nflat/2.png\n")
    paths, labels, _, source = list_images(listing)
    assert paths == [str(tmp_path / "flat/0.png"), str(tmp_path / "flat/2.png")] and labels is None

    table = tmp_path / "table.csv"
    table.write_text("path,label\nflat/0.png,b\nflat/1.png,a\n")
    paths, labels, names, _ = list_images(table)
    assert names == ["a", "b"] and labels == [1, 0]

    listing.write_text("flat/9.png\n")
    with pytest.raises(FileNotFoundError, match=r"list.txt line 1: image .*flat/9.png' does not exist"):
        list_images(listing)


def test_dataset_spec_records_indices_and_labels():
    model = tiny_vit()
    feats = extract_features(model, "digits", split="val", batch_size=64)
    val = load_data("digits").val
    assert len(feats) == len(val) and torch.equal(feats.labels, val.labels)
    assert feats.paths is None and feats.indices == list(range(len(val)))
    assert feats.describe(3) == "digits[val][3]" and feats.label_name(3) == str(int(val.labels[3]))
    with pytest.raises(ValueError, match="split='dev' is not allowed"):
        extract_features(model, "digits", split="dev")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        extract_features(model, "digits", batch_size=0)


def test_an_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(ValueError, match=r"cannot read image '.*bad\.png'"):
        extract_features(tiny_vit(), [str(bad)])


def test_embed_splits_a_dataset_as_the_run_did(tmp_path):
    # A run trained on digits with seed 3 and a 20% test split: embedding its "test" split must give exactly the
    # run's held-out images, not the default (seed 0, 10%) split, which overlaps the run's training images.
    from vitkit.features.store import embed
    from vitkit.weights import save_pretrained

    save_pretrained(tiny_vit(), tmp_path / "m", training={"data": "digits", "seed": 3, "test_fraction": 0.2})
    feats, _, _ = embed("digits", tmp_path / "m", tmp_path / "f", split="test")
    run_test = load_data("digits", seed=3, test_fraction=0.2).test
    assert len(feats) == len(run_test) and feats.source["seed"] == 3 and feats.source["test_fraction"] == 0.2
    assert torch.equal(feats.labels, run_test.labels)
    # an explicit seed wins (the run's fractions stay); split settings are refused for files and unknown keys
    other, _, _ = embed("digits", tmp_path / "m", tmp_path / "g", split="test", seed=0)
    assert other.source["seed"] == 0 and len(other) == len(run_test)
    with pytest.raises(ValueError, match="shapes_size=32 applies to a dataset spec"):
        extract_features(tiny_vit(), ["x.png"], split_settings={"shapes_size": 32})
    with pytest.raises(ValueError, match=r"unknown split setting\(s\) \['seed'\]"):
        extract_features(tiny_vit(), "digits", split_settings={"seed": 1})
