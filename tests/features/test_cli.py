"""The feature commands end to end on tiny data: embed -> search, probe -> predict/eval, eval --knn."""

from __future__ import annotations

import json

import pytest

from vitkit.cli import main
from vitkit.data import load_data
from vitkit.features import extract_features, knn_predict
from vitkit.weights import load_model


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_embed_and_search(model_dir, image_folder, tmp_path, capsys):
    index = tmp_path / "feats"
    assert (
        main(["embed", str(image_folder), "--checkpoint", str(model_dir), "--out", str(index), "--threads", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "embedded 8 images into 16-dimensional unit-norm features, 2 classes" in out
    assert (tmp_path / "feats.safetensors").is_file() and (tmp_path / "feats.json").is_file()

    query = image_folder / "dark" / "1.png"
    sheet = tmp_path / "sheet.png"
    args = ["search", str(query), "--index", str(index), "-k", "4", "--out", str(sheet), "--threads", "1"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{query}: 4 nearest of {index} (cosine, torch)"
    assert lines[1].split() == ["1", "1.0000", str(query), "[dark]"] and len(lines) == 6
    assert lines[-1] == f"wrote {sheet}" and sheet.stat().st_size > 0
    assert main([*args[:-2], "--json", "--backend", "torch"]) == 0
    hits = _json(capsys)["queries"][0]["neighbours"]
    assert hits[0]["item"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(hits) == 4


def test_search_errors_name_flags(model_dir, image_folder, tmp_path, capsys):
    main(["embed", str(image_folder), "--checkpoint", str(model_dir), "--out", str(tmp_path / "f"), "--threads", "1"])
    capsys.readouterr()
    query = str(image_folder / "dark" / "1.png")
    assert main(["search", query, "--index", str(tmp_path / "f"), "-k", "0", "--threads", "1"]) == 2
    assert "vitkit search: error: -k 0 neighbours is not allowed for an index of 8 rows" in capsys.readouterr().err
    assert main(["search", query, "--index", str(tmp_path / "g"), "--threads", "1"]) == 2
    assert "g.safetensors and" in capsys.readouterr().err


def test_probe_then_predict_and_eval_use_it(model_dir, tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", "--checkpoint", str(model_dir), "--out", str(out), "--weight-decays", "1e-3", "1e-1"]
    assert main([*args, "--json", "--threads", "1"]) == 0
    r = _json(capsys)
    assert r["data"] == "digits" and r["dim"] == 16 and [g["weight_decay"] for g in r["grid"]] == [1e-3, 1e-1]
    assert r["test_acc"] > 0.3  # random 16-dim features of digits are far above chance (0.1) under a probe
    saved = json.loads((out / "config.json").read_text())
    assert saved["probe"]["test_acc"] == r["test_acc"] and saved["training"]["data"] == "digits"
    # `vitkit eval` on the saved probe recreates the same test split and gets the probe's test accuracy.
    assert main(["eval", "--checkpoint", str(out), "--json", "--threads", "1"]) == 0
    ev = _json(capsys)
    assert ev["n"] == r["n_test"] and ev["top1"] == pytest.approx(r["test_acc"], abs=1e-6)
    assert load_model(out).preprocess.class_names == [str(i) for i in range(10)]


def test_eval_knn_matches_the_library(model_dir, capsys):
    assert main(["eval", "--knn", "--checkpoint", str(model_dir), "--knn-k", "5", "--json", "--threads", "1"]) == 0
    r = _json(capsys)
    assert (r["k"], r["temperature"], r["split"], r["data"]) == (5, 0.07, "test", "digits")
    splits = load_data("digits")
    model = load_model(model_dir).eval()
    train, test = extract_features(model, splits.train), extract_features(model, splits.test)
    pred = knn_predict(train.features, train.labels, test.features, 10, k=5)
    assert r["top1"] == pytest.approx(float((pred == test.labels).float().mean()), abs=1e-6)
    assert r["n_train"] == len(splits.train) and r["n"] == len(splits.test)
    assert main(["eval", "--knn", "--checkpoint", str(model_dir), "--knn-k", "0", "--threads", "1"]) == 2
    assert "--knn-k 0 neighbours is not allowed for a train split of" in capsys.readouterr().err
    assert main(["eval", "--knn", "--checkpoint", str(model_dir), "--split", "train", "--threads", "1"]) == 2
    assert "--split train is not allowed for k-NN" in capsys.readouterr().err
    # The k-NN settings without --knn would silently run the ordinary evaluation.
    assert main(["eval", "--checkpoint", str(model_dir), "--knn-k", "5", "--threads", "1"]) == 2
    assert "--knn-k and --knn-temperature set the k-NN evaluation: add --knn" in capsys.readouterr().err


def test_probe_refuses_to_overwrite_its_checkpoint(model_dir, capsys):
    args = ["probe", "--checkpoint", str(model_dir), "--out", str(model_dir), "--threads", "1"]
    assert main(args) == 2
    assert f"--out {model_dir} is the checkpoint or a training run" in capsys.readouterr().err


def test_probe_refuses_to_write_into_another_run(model_dir, tmp_path, capsys):
    from vitkit.train.checkpoint import write_checkpoint

    run = tmp_path / "run"
    write_checkpoint(run / "last", load_model(model_dir), {"step": 3})  # a resumable checkpoint of another run
    before = (run / "last" / "model.safetensors").read_bytes()
    args = ["probe", "--checkpoint", str(model_dir), "--out", str(run / "last"), "--threads", "1"]
    assert main(args) == 2
    assert f"--out {run / 'last'} is the checkpoint or a training run, or lies inside one" in capsys.readouterr().err
    assert (run / "last" / "model.safetensors").read_bytes() == before  # its weights were left alone


def test_embed_refuses_a_split_for_a_folder(model_dir, image_folder, tmp_path, capsys):
    # A folder has no splits to choose from: --split/--seed used to be ignored, embedding every image regardless.
    for flag in (["--split", "test"], ["--seed", "3"]):
        args = ["embed", str(image_folder), "--checkpoint", str(model_dir), "--out", str(tmp_path / "f"), *flag]
        assert main([*args, "--threads", "1"]) == 2
        assert f"{' '.join(flag)} applies to a dataset spec such as 'digits'" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()
