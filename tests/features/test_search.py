"""Retrieval: exact torch search equals FAISS's IndexFlatIP, embed -> search finds the query itself, errors name
their values, and an index written by `embed` round-trips through its two files."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.features.conftest import tiny_vit
from vitkit.features import embed, faiss_topk, load_features, nearest, search, topk_cosine
from vitkit.weights import save_pretrained


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_torch_and_faiss_give_the_same_neighbours():
    pytest.importorskip("faiss")
    index, queries = _unit(3000, 48, 0), _unit(40, 48, 1)
    s_torch, i_torch = topk_cosine(queries, index, k=10, chunk=512)  # 6 chunks: the merge across chunks is exercised
    s_faiss, i_faiss = faiss_topk(queries, index, k=10)
    assert torch.equal(i_torch, i_faiss)
    torch.testing.assert_close(s_torch, s_faiss, atol=1e-5, rtol=0)
    # And both are the brute-force answer.
    s_ref, i_ref = (queries @ index.T).topk(10, dim=1)
    assert torch.equal(i_torch, i_ref)
    s, i, used = nearest(queries, index, 10, backend="faiss")
    assert used == "faiss" and torch.equal(i, i_ref)


def test_auto_backend_is_torch():
    _s, _i, used = nearest(_unit(3, 8, 0), _unit(100, 8, 1), 5, backend="auto")
    assert used == "torch"
    with pytest.raises(ValueError, match="backend='annoy' is not allowed; choose one of 'auto', 'torch', 'faiss'"):
        nearest(_unit(3, 8, 0), _unit(100, 8, 1), 5, backend="annoy")


def test_missing_faiss_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"vitkit\[faiss\]"):
        faiss_topk(_unit(2, 8, 0), _unit(10, 8, 1), 3)


def test_embed_then_search_finds_the_query_first(model_dir, image_folder, tmp_path):
    feats, st_path, json_path = embed(str(image_folder), model_dir, tmp_path / "index", device="cpu")
    assert (st_path.name, json_path.name) == ("index.safetensors", "index.json")
    assert feats.features.shape == (8, 16)
    torch.testing.assert_close(feats.features.norm(dim=1), torch.ones(8))
    assert feats.class_names == ["dark", "light"] and feats.labels.tolist() == [0] * 4 + [1] * 4
    record = json.loads(json_path.read_text())
    assert record["normalised"] is True and record["dim"] == 16 and record["count"] == 8
    assert record["labels"] == feats.labels.tolist() and record["paths"] == feats.paths
    assert record["model"]["checkpoint"] == str(model_dir.resolve())
    assert record["preprocessing"]["input_size"] == [16, 16]

    query = image_folder / "light" / "2.png"
    result = search(query, tmp_path / "index", k=3, device="cpu", sheet=tmp_path / "sheet.png")
    top = result["queries"][0]["neighbours"]
    assert top[0]["item"] == str(query) and top[0]["label"] == "light"
    assert top[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [n["rank"] for n in top] == [1, 2, 3] and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert top[1]["score"] < 0.99999  # the other images are different images
    assert result["checkpoint"] == str(model_dir.resolve())  # the index's own checkpoint was used
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.width > 3 * sheet.height  # one row: the query and 3 neighbours


def test_round_trip_through_the_files(model_dir, image_folder, tmp_path):
    feats, _, _ = embed(str(image_folder), model_dir, tmp_path / "index.safetensors", device="cpu")
    back = load_features(tmp_path / "index.json")  # any of the three spellings names the pair
    assert torch.equal(back.features, feats.features) and torch.equal(back.labels, feats.labels)
    assert back.paths == feats.paths and back.class_names == feats.class_names


def test_an_index_of_a_relative_folder_is_searchable_from_another_directory(model_dir, image_folder, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    monkeypatch.chdir(image_folder.parent)
    embed("images", model_dir, tmp_path / "index", device="cpu")  # DATA given relative to the working directory
    monkeypatch.chdir(model_dir)  # elsewhere: the recorded paths must still name the images
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in load_features(tmp_path / "index").paths)
    query = image_folder / "light" / "2.png"
    result = search(query, tmp_path / "index", k=2, device="cpu", sheet=tmp_path / "sheet.png")
    assert result["queries"][0]["neighbours"][0]["item"] == str(query)
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_dataset_rows_record_their_index_and_show_in_the_sheet(model_dir, image_folder, tmp_path):
    feats, _, json_path = embed("digits", model_dir, tmp_path / "digits", split="test", device="cpu")
    record = json.loads(json_path.read_text())
    assert record["paths"] is None and record["indices"] == list(range(len(feats)))
    assert record["source"] == {
        "kind": "dataset", "spec": "digits", "split": "test", "seed": 0, "load_size": None,
        "val_fraction": 0.1, "test_fraction": 0.1, "shapes_size": 64,
    }  # fmt: skip
    result = search(image_folder / "dark" / "0.png", tmp_path / "digits", k=2, device="cpu", sheet=tmp_path / "s.png")
    assert result["queries"][0]["neighbours"][0]["item"].startswith("digits[test][")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_errors_name_their_values(model_dir, image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing .*nowhere\.safetensors and .*nowhere\.json"):
        search(image_folder / "dark" / "0.png", tmp_path / "nowhere", device="cpu")
    embed(str(image_folder), model_dir, tmp_path / "index", device="cpu")
    query = image_folder / "dark" / "0.png"
    for k in (0, 9):
        with pytest.raises(ValueError, match=rf"k={k} neighbours is not allowed for an index of 8 rows"):
            search(query, tmp_path / "index", k=k, device="cpu")
    import shutil

    moved = tmp_path / "moved"
    shutil.move(model_dir, moved)
    with pytest.raises(FileNotFoundError, match=r"embedded with checkpoint .*model', which no longer exists"):
        search(query, tmp_path / "index", k=2, device="cpu")
    assert search(query, tmp_path / "index", k=1, checkpoint=moved, device="cpu")["checkpoint"] == str(moved)
    wide = tmp_path / "wide"
    save_pretrained(tiny_vit(embed_dim=24), wide)
    with pytest.raises(ValueError, match="gives 24-dimensional features but index .* holds 16-dimensional ones"):
        search(query, tmp_path / "index", k=2, checkpoint=wide, device="cpu")


def test_a_stale_pair_is_refused(model_dir, image_folder, tmp_path):
    embed(str(image_folder), model_dir, tmp_path / "a", device="cpu")
    embed(str(image_folder / "dark"), model_dir, tmp_path / "b", device="cpu")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match .*a.json"):
        load_features(tmp_path / "a")


def test_auto_switches_at_the_configured_size(monkeypatch):
    pytest.importorskip("faiss")
    import vitkit.features.retrieval as retrieval

    monkeypatch.setattr(retrieval, "FAISS_AUTO_MIN", 50)
    assert retrieval.choose_backend("auto", 49) == "torch"
    assert retrieval.choose_backend("auto", 50) == "faiss"
