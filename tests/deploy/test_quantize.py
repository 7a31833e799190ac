"""int8 post-training quantization: agreement of a trained tiny ViT, calibration, refusals, families, the CLI.

PT2E runs with `compile=False` here (the converted graph computes in fp32 with int8 rounding simulated: the
predictions of the int8 kernels up to float rounding): inductor takes minutes per graph on 2 cores. The one test
that compiles, and checks that the int8 kernels appear, is marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.cli import main
from vitkit.cpu import has_vnni
from vitkit.data import load_data
from vitkit.data.inference import eval_transform
from vitkit.deploy import (
    Int8Model,
    calibration_batches,
    evaluate_int8,
    load_int8,
    predict_int8,
    quantize,
    save_int8,
)
from vitkit.models import create_model

SIZE = 16  # digits (8 px) upsampled to 16 px: a 4x4 grid of patch 4
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: parallel test jobs oversubscribe the 2 cores, and spinning OpenMP threads then make
    tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """A tiny ViT trained on digits for a few seconds, its eval transform, and the held-out test split."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = load_data("digits", seed=0)
    model = create_model("vit_nano_patch4_32", img_size=SIZE, num_classes=10, **TINY_VIT)
    pre = model.preprocess
    pre.mean, pre.std, pre.input_size, pre.crop_fraction = splits.mean, splits.std, (SIZE, SIZE), 1.0
    pre.class_names = splits.class_names
    tf = eval_transform(model)
    x, y = tf(splits.train.images), splits.train.labels
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = order[i : i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.set_num_threads(threads)
    test_x = tf(splits.test.images)
    with torch.no_grad():
        assert (model(test_x).argmax(1) == splits.test.labels).float().mean() > 0.5  # trained, not chance (0.1)
    return model, splits, test_x


@pytest.fixture(scope="module")
def model_dir(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "digits_vit"
    digits[0].save_pretrained(path)
    return path


def _compare(q: nn.Module, model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(share of equal top-1 predictions, mean cosine similarity of the logits)."""
    with torch.no_grad():
        a, b = q(x), model(x)
    return (a.argmax(1) == b.argmax(1)).float().mean().item(), F.cosine_similarity(a, b, dim=1).mean().item()


@pytest.mark.parametrize("method", ["pt2e", "dynamic"])
def test_int8_agrees_with_fp32_on_held_out_digits(digits, method):
    model, _, test_x = digits
    calibration = "digits" if method == "pt2e" else None  # drawn from the train split: the test split stays held out
    q = quantize(model, method, calibration, num_images=128 if method == "pt2e" else None, compile=False)
    assert isinstance(q, Int8Model) and q.method == method and not q.training
    assert q.calibration_images == (128 if method == "pt2e" else 0)
    agreement, cosine = _compare(q, model, test_x)
    assert agreement >= 0.95, agreement
    assert cosine >= 0.99, cosine
    # Quantized, not a copy of the fp32 model: the logits differ.
    with torch.no_grad():
        assert not torch.allclose(q(test_x), model(test_x), atol=1e-5)


def test_quantize_leaves_the_model_unchanged(digits):
    model, _, test_x = digits
    with torch.no_grad():
        before = model(test_x[:4])
    quantize(model, "pt2e", [test_x[:8]], compile=False)
    quantize(model, "dynamic")
    with torch.no_grad():
        assert torch.equal(model(test_x[:4]), before)
    assert type(model.blocks[0].attn.qkv).__name__ == "Linear" and not model.training


def _input_scale(q: Int8Model) -> float:
    """Scale of the first quantize step of the PT2E graph: the one that quantizes the image."""
    node = next(n for n in q.graph.graph.nodes if "quantize_per_tensor" in str(n.target))
    return float(node.args[1])


def test_calibration_sets_the_activation_ranges(digits):
    """The observers see the calibration images: images three times as large give a scale about three times as
    large. Skipping calibration would give both the observers' default scale."""
    model, _, test_x = digits
    x = test_x[:32]
    s1 = _input_scale(quantize(model, "pt2e", [x], compile=False))
    s3 = _input_scale(quantize(model, "pt2e", [3 * x], compile=False))
    assert s3 == pytest.approx(3 * s1, rel=0.15)
    # The scale covers the calibration range: (max - min) / levels, within the histogram observer's trimming of
    # outliers; 127 levels on CPUs without VNNI (reduce_range), else 255.
    levels = 255 if has_vnni() else 127
    assert s1 == pytest.approx(float(x.max() - x.min()) / levels, rel=0.3)


def test_calibration_batches_use_the_models_preprocessing(digits):
    model, splits, _ = digits
    raw, labels = splits.train.images[:12], splits.train.labels[:12]
    tf = eval_transform(model)
    batches = calibration_batches(model, [raw])
    assert len(batches) == 1 and torch.equal(batches[0], tf(raw))
    # (images, labels) tuples as loaders yield them; num_images cuts the last batch.
    batches = calibration_batches(model, [(raw, labels)] * 3, 20)
    assert [len(b) for b in batches] == [12, 8]
    # A data spec: its train split, preprocessed, at the model's input size.
    batches = calibration_batches(model, "digits", 40, batch_size=16)
    assert [tuple(b.shape) for b in batches] == [(16, 3, SIZE, SIZE), (16, 3, SIZE, SIZE), (8, 3, SIZE, SIZE)]
    train = tf(splits.train.images)
    first = batches[0][0]
    assert any(torch.equal(first, t) for t in train)  # one of the training images, as the model sees it
    assert quantize(model, "pt2e", batches, compile=False).calibration_images == 40


def test_calibration_from_a_flat_folder_of_images(digits, tmp_path):
    """Calibration ignores labels, so a folder of images without class subfolders is enough."""
    from PIL import Image

    model, splits, _ = digits
    for i in range(12):
        Image.fromarray(splits.train.images[i].permute(1, 2, 0).numpy()).save(tmp_path / f"img{i:02d}.png")
    batches = calibration_batches(model, str(tmp_path), 8, seed=0)
    assert sum(len(b) for b in batches) == 8 and batches[0].shape[1:] == (3, SIZE, SIZE)


def test_refusals_name_the_value_and_the_fix(digits):
    model, _, test_x = digits
    with pytest.raises(ValueError, match="method='int4' is not allowed"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(model, "pt2e")
    with pytest.raises(ValueError, match="takes no calibration data"):
        quantize(model, "dynamic", [test_x])
    with pytest.raises(ValueError, match=r"must be 16x16 .* got \(4, 3, 24, 24\)"):
        quantize(model, "pt2e", [torch.randn(4, 3, 24, 24)], compile=False)
    with pytest.raises(ValueError, match=r"train split of 'digits' has only \d+"):
        calibration_batches(model, "digits", 100_000)
    with pytest.raises(ValueError, match="gave no images"):
        quantize(model, "pt2e", [], compile=False)
    with pytest.raises(TypeError, match="got a single tensor"):
        quantize(model, "pt2e", test_x, compile=False)
    with pytest.raises(TypeError, match="uint8 .* or floating"):
        calibration_batches(model, [test_x.to(torch.int32)])
    with pytest.raises(ValueError, match=r"quantize takes an fp32 model, but .* torch.bfloat16"):
        quantize(create_model("vit_nano_patch4_32", img_size=SIZE, **TINY_VIT).to(torch.bfloat16), "dynamic")
    q = quantize(model, "pt2e", [test_x[:8]], compile=False)
    with pytest.raises(ValueError, match=r"calibrated at 16x16 and takes only that size.*method='dynamic'"):
        q(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="inference only"):
        q.train()
    # Dynamic quantization takes every size the fp32 model takes.
    d = quantize(model, "dynamic")
    x24 = torch.randn(2, 3, 24, 24)
    assert _compare(d, model, x24)[1] > 0.99


def test_pt2e_save_and_load_round_trip(digits, tmp_path):
    model, _, test_x = digits
    q = quantize(model, "pt2e", "digits", num_images=32, compile=False)
    path = save_int8(q, tmp_path / "digits_int8.pt2")
    assert [p.name for p in tmp_path.iterdir()] == ["digits_int8.pt2"]  # written atomically: no temporary left
    loaded = load_int8(path, compile=False)
    assert (loaded.method, loaded.calibration_images, loaded.input_size) == ("pt2e", 32, (SIZE, SIZE))
    assert loaded.preprocess == model.preprocess and loaded.model_name == q.model_name
    assert loaded.graph.meta["vitkit_reduce_range"] == (not has_vnni())
    with torch.no_grad():
        torch.testing.assert_close(loaded(test_x), q(test_x), rtol=0, atol=0)
        assert loaded(test_x[:1]).shape == (1, 10)  # any batch size
    with pytest.raises(ValueError, match="only method='pt2e' int8 models are saved"):
        save_int8(quantize(model, "dynamic"), tmp_path / "dyn.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(ValueError, match="is not a torch.export program"):
        load_int8(tmp_path / "junk.pt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_int8(tmp_path / "missing.pt2")


def test_mixed_bf16_by_default_only_where_the_cpu_has_native_bf16(digits, monkeypatch):
    """mixed_bf16=None (the default) is on for PT2E where the CPU computes bf16 natively and off elsewhere and for
    the dynamic method; an explicit True/False is kept."""
    import importlib

    qmod = importlib.import_module("vitkit.deploy.quantize")
    model, _, _ = digits
    batches = calibration_batches(model, "digits", 16)
    assert not quantize(model, "pt2e", batches, compile=False).mixed_bf16  # conftest: a CPU without bf16
    monkeypatch.setattr(importlib.import_module("vitkit.cpu"), "NATIVE_BF16", True)
    assert quantize(model, "pt2e", batches, compile=False).mixed_bf16
    assert not quantize(model, "pt2e", batches, compile=False, mixed_bf16=False).mixed_bf16
    assert not quantize(model, "dynamic").mixed_bf16
    assert qmod.resolve_mixed_bf16("pt2e", None) and not qmod.resolve_mixed_bf16("dynamic", None)
    monkeypatch.setattr(importlib.import_module("vitkit.cpu"), "NATIVE_BF16", False)
    with pytest.warns(UserWarning, match=r"mixed_bf16=True on a CPU without native bf16.*mixed_bf16=False is faster"):
        assert qmod.resolve_mixed_bf16("pt2e", True)  # forced: kept, with a warning


def test_mixed_bf16_runs_the_unquantized_ops_in_bf16_and_is_saved(digits, tmp_path):
    """int8-mixed-bf16: the graph under bf16 autocast agrees with fp32 as plain PT2E does, its logits are not the
    fp32 graph's (bf16 really ran), and the setting survives save/load."""
    model, _, test_x = digits
    batches = calibration_batches(model, "digits", 64)
    plain = quantize(model, "pt2e", batches, compile=False)
    mixed = quantize(model, "pt2e", batches, compile=False, mixed_bf16=True)
    assert mixed.mixed_bf16 and not plain.mixed_bf16 and "mixed_bf16=True" in repr(mixed)

    def fused_attention_ops(q) -> int:
        return sum("scaled_dot_product" in str(n.target) for n in q.graph.graph.nodes)

    # Mixed bf16 exports attention as its three ops (bf16 matmuls at run time); plain PT2E keeps the fused kernel.
    depth = len(model.blocks)
    assert fused_attention_ops(mixed) == 0 and fused_attention_ops(plain) == depth
    with torch.no_grad():
        a, b = mixed(test_x), plain(test_x)
    assert a.dtype == torch.float32 and a.shape == b.shape
    assert not torch.equal(a, b)  # bf16 rounding: another computation
    agreement, cosine = _compare(mixed, model, test_x)
    assert agreement >= 0.95 and cosine >= 0.99, (agreement, cosine)
    loaded = load_int8(save_int8(mixed, tmp_path / "mixed.pt2"), compile=False)
    assert loaded.mixed_bf16
    with torch.no_grad():
        torch.testing.assert_close(loaded(test_x), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"applies to method='pt2e' only, got method='dynamic'"):
        quantize(model, "dynamic", mixed_bf16=True)
    with pytest.raises(ValueError, match=r"mixed_bf16=True applies to method='pt2e' only"):
        evaluate_int8(tmp_path, "digits", method="dynamic", mixed_bf16=True, threads=None)


def test_dynamic_refuses_a_model_of_convolutions():
    model = create_model("resnet18", depths=(1, 1, 1, 1), widths=(4, 8, 8, 16), stem_width=8, num_classes=5).eval()
    with pytest.raises(ValueError, match=r"quantizes linear layers only, and in resnet18 they hold \d+% .*'pt2e'"):
        quantize(model, "dynamic")


VIT = dict(TINY_VIT, img_size=32, patch_size=8, num_classes=5)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", VIT),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", VIT),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                                                   img_size=32, window_size=2, num_classes=5)),
    "convnext": ("convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5)),
    "resnet": ("resnet18", dict(depths=(1, 1, 1, 1), widths=(4, 8, 8, 16), stem_width=8, num_classes=5)),
    "hybrid": ("vit_hybrid_cnn_tiny_s4_32", dict(TINY_VIT, num_classes=5)),
}  # fmt: skip
ATTENTION = ["axial", "sparse", "linear", "relpos", "relpos_decomposed", "local"]


def _family_case(name: str, kwargs: dict, method: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    model.preprocess.input_size = (32, 32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    q = quantize(model, method, [torch.randn(8, 3, 32, 32)] if method == "pt2e" else None, compile=False)
    cosine = _compare(q, model, x)[1]
    assert cosine > 0.98, cosine
    with torch.no_grad():
        assert torch.equal(model(x), before)  # export and quantization worked on copies


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pt2e_quantizes_every_family(family):
    _family_case(*FAMILIES[family], "pt2e")


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"resnet"}))  # resnet: refused, see above
def test_dynamic_quantizes_every_family_with_linear_layers(family):
    _family_case(*FAMILIES[family], "dynamic")


@pytest.mark.parametrize("attn", ATTENTION)
def test_dynamic_quantizes_every_attention_variant(attn):
    _family_case("vit_tiny_patch16_224", dict(VIT, attn_layer=attn), "dynamic")


@pytest.mark.slow
@pytest.mark.parametrize("attn", ATTENTION)
def test_pt2e_quantizes_every_attention_variant(attn):
    _family_case("vit_tiny_patch16_224", dict(VIT, attn_layer=attn), "pt2e")


@pytest.mark.slow
@pytest.mark.parametrize("mixed_bf16", [False, True], ids=["fp32", "mixed-bf16"])
def test_compiled_pt2e_runs_int8_kernels_and_matches_the_converted_graph(digits, mixed_bf16):
    from torch._dynamo.utils import counters

    model, _, test_x = digits
    counters.clear()
    q = quantize(model, "pt2e", "digits", num_images=64, compile=True, mixed_bf16=mixed_bf16)
    eager = quantize(model, "pt2e", "digits", num_images=64, compile=False, mixed_bf16=mixed_bf16)
    with torch.no_grad():
        a, b = q(test_x), eager(test_x)
        q(test_x[:3])  # another batch size: the graph has a dynamic batch
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] >= 2 * 4  # qkv, proj, fc1, fc2 per block
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    assert F.cosine_similarity(a, b, dim=1).mean() >= 0.99
    agreement, cosine = _compare(q, model, test_x)
    assert agreement >= 0.95 and cosine >= 0.99, (agreement, cosine)


def test_evaluate_and_predict_int8(digits, model_dir, tmp_path, monkeypatch):
    """The library functions behind `vitkit eval/predict --int8` (PT2E without inductor: see the module doc)."""
    model, splits, test_x = digits
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    r = evaluate_int8(model_dir, "digits", calibration="digits", num_images=64, out=tmp_path / "ev", threads=None)
    assert r["int8"] == {
        "method": "pt2e", "calibration": "digits", "calibration_images": 64, "compiled": True, "mixed_bf16": False
    }  # fmt: skip
    assert r["agreement"] >= 0.95 and r["n"] == len(test_x)
    with torch.no_grad():
        fp32_top1 = (model(test_x).argmax(1) == splits.test.labels).float().mean().item()
    assert r["top1_reference"] == pytest.approx(fp32_top1)
    assert abs(r["top1"] - fp32_top1) <= 0.05
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["int8"] == r["int8"] and saved["agreement"] == r["agreement"]
    with pytest.raises(ValueError, match="does not record its training data"):
        evaluate_int8(model_dir, "digits", threads=None)  # no calibration given, none recorded
    with pytest.raises(ValueError, match="takes no calibration data"):
        evaluate_int8(model_dir, "digits", method="dynamic", calibration="digits", threads=None)


def test_cli_eval_and_predict_int8(digits, model_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    model, splits, _ = digits
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    args = ["eval", "--checkpoint", str(model_dir), "--data", "digits", "--int8", "--calib", "digits"]
    assert main([*args, "--calib-images", "48", "--json", "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["int8"]["calibration_images"] == 48 and r["int8"]["method"] == "pt2e" and r["agreement"] >= 0.95
    assert main([*args, "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "int8 (pt2e, 256 calibration images from digits)" in text and "agreement with fp32" in text

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(splits.test.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    ck = ["--checkpoint", str(model_dir), *map(str, paths), "--topk", "2", "--json", "--threads", "1"]
    assert main(["predict", *ck, "--int8", "--int8-method", "dynamic"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert main(["predict", *ck]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert [p["top"][0]["class"] for p in int8] == [p["top"][0]["class"] for p in fp32]
    assert [p["top"][0]["prob"] for p in int8] != [p["top"][0]["prob"] for p in fp32]  # really another model
    assert (
        predict_int8(model_dir, [paths[0]], method="dynamic", topk=1, threads=None)[0]["top"][0]["class"]
        == (fp32[0]["top"][0]["class"])
    )

    assert main(["predict", *ck, "--calib", "digits"]) == 2
    assert "--calib needs --int8" in capsys.readouterr().err
    assert main(["predict", *ck[:-3], "--int8", "--int8-method", "dynamic", "--threads", "1"]) == 0  # not --json
    assert capsys.readouterr().out.startswith("int8 (dynamic): probabilities of the int8 model")
    assert main(["eval", "--checkpoint", str(model_dir), "--int8", "--tome", "2", "--threads", "1"]) == 2
    assert "--tome 2: int8 quantization takes unmerged models only" in capsys.readouterr().err
    assert main(["predict", *ck, "--int8-mixed-bf16"]) == 2
    assert "--int8-mixed-bf16 needs --int8" in capsys.readouterr().err
    assert main(["predict", *ck, "--no-int8-mixed-bf16"]) == 2
    assert "--no-int8-mixed-bf16 needs --int8" in capsys.readouterr().err
    assert main(["predict", *ck, "--int8", "--int8-method", "dynamic", "--int8-mixed-bf16"]) == 2
    assert "--int8-mixed-bf16 applies to --int8-method pt2e only" in capsys.readouterr().err
    assert main(["predict", *ck, "--int8", "--int8-method", "dynamic", "--calib", "digits"]) == 2
    assert "takes no calibration data" in capsys.readouterr().err
    assert main(["predict", *ck, "--int8", "--device", "cuda"]) == 2
    assert "--int8 runs on the CPU; got --device cuda" in capsys.readouterr().err
