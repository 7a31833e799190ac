"""ONNX and torch.export with dynamic batch, height and width: parity with eager at four sizes, metadata, atomic
writes, refusals, the CLI.

One tiny model per registry family and per attention variant; each is traced once and saved in both formats. The
ViT case runs by default; the other families and the attention variants are marked slow (a trace and an ONNX
conversion cost several seconds each).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from vitkit.deploy.export import (
    ExportCheckError,
    SizeRule,
    check_export,
    default_check_sizes,
    export_metadata,
    export_model,
    read_metadata,
    refusal,
    save_program,
    size_rule,
    trace,
)
from vitkit.layers.pos_embed import resample_pos_embed, resample_pos_embed_traced
from vitkit.models.registry import create_model, list_models, model_family

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4  # fp32 max |exported - eager|, the bound
VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
# family -> (registered name, overrides): each as small as the family allows, at the size its rule starts from.
FAMILIES = {
    "vit": ("vit_nano_patch4_32", dict(VIT, img_size=32, reg_tokens=1)),
    "deit": ("deit_tiny_distilled_patch16_224", dict(VIT, img_size=32)),
    # Window 4 at 32 px: stage 0 (5 to 8 per side) shifted windows with padding, stage 1 (3 or 4) one window, as the
    # last stage of every registered Swin at its native size; the rule is then 20 to 32 px.
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
    ),
    "convnext": ("convnext_tiny", dict(img_size=32, depths=(1, 1), dims=(8, 16))),
    "resnet": ("resnet18", dict(img_size=32, depths=(1, 1), widths=(8, 16), stem_width=8)),
    "resnetv2": (
        "resnetv2_r50_s16",
        dict(img_size=32, depths=(1, 1, 1), widths=(16, 16, 32), stem_width=8, gn_groups=4),
    ),
    "vit_hybrid": (
        "vit_base_r50_s16_224",
        dict(
            img_size=32,
            embed_dim=32,
            depth=2,
            num_heads=2,
            backbone_args={"depths": (1, 1, 1), "widths": (16, 16, 32), "stem_width": 8, "gn_groups": 4},
        ),
    ),
    "vit_hybrid_cnn": ("vit_hybrid_cnn_tiny_s4_32", dict(img_size=32, embed_dim=32, depth=2, num_heads=2)),
}
# attention variant -> attn_args, on the ViT case's model (without registers)
ATTENTION = {
    "local": {"window": 2},
    "local_neighborhood": {"window": 3, "mode": "neighborhood"},
    "axial": {},
    "sparse": {},
    "sparse_fixed": {"pattern": "fixed", "stride": 2},
    "linear": {},
    "relpos": {},
    "relpos_decomposed": {},
}
# ONNX conversion costs 5-40 s per model on 2 cores (torch-export files cost a fraction of a second once traced), so
# every family is checked in both formats, and the attention variants in torch-export plus ONNX for `relpos` (a
# float bias on the explicit softmax, the path every masked variant takes while exporting) and for the one ONNX
# refuses. The ONNX files of the other variants passed the same check when the exporter was written (see
# docs/deploy.md); add a name here to check it again.
ONNX_VARIANTS = {"relpos", "local_neighborhood"}
# patch-embedding variant (+ attention variant) -> embed_args, on the same model. `overlap+local` once left a guard
# on the batch and size in the traced program (the convolution's padded output side and the model's grid were two
# expressions the exporter could not prove equal); it is the case that caught it.
EMBEDDING = {"overlap": {}, "conv_stem": {}, "overlap+local": {}}
CASES = [pytest.param("vit", fmt, id=f"{fmt}-vit") for fmt in ("onnx", "torch-export")]
CASES += [
    pytest.param(f, fmt, id=f"{fmt}-{f}", marks=pytest.mark.slow)
    for f in FAMILIES
    if f != "vit"
    for fmt in ("onnx", "torch-export")
]
CASES += [
    pytest.param(f"attn:{a}", fmt, id=f"{fmt}-attn-{a}", marks=pytest.mark.slow)
    for a in ATTENTION
    for fmt in ("onnx", "torch-export")
    if fmt == "torch-export" or a in ONNX_VARIANTS
]
CASES += [
    pytest.param(f"embed:{e}", "torch-export", id=f"torch-export-embed-{e}", marks=pytest.mark.slow) for e in EMBEDDING
]


def _formats(case: str) -> tuple[str, ...]:
    return tuple(c.values[1] for c in CASES if c.values[0] == case)


def tiny(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if case.startswith("attn:"):
        variant = case.split(":", 1)[1]
        layer = variant.split("_")[0] if variant.startswith(("local", "sparse")) else variant
        name, kw = FAMILIES["vit"]
        kw = {**kw, "reg_tokens": 0, "attn_layer": layer, "attn_args": ATTENTION[variant]}
    elif case.startswith("embed:"):
        variant = case.split(":", 1)[1]
        embed, _, attn = variant.partition("+")
        name, kw = FAMILIES["vit"]
        kw = {**kw, "reg_tokens": 0, "embed_layer": embed, "embed_args": EMBEDDING[variant]}
        if attn:
            kw.update(attn_layer=attn, attn_args=ATTENTION[attn])
    else:
        name, kw = FAMILIES[case]
    model = create_model(name, num_classes=3, **kw).eval()
    model.preprocess.class_names = ["ant", "bee", "cat"]
    with torch.no_grad():  # random but not tiny logits, so a wrong table or mask shows in the delta
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_every_family_has_a_case():
    families = {model_family(n) for n in list_models()}
    assert families <= set(FAMILIES), f"families without an export case: {sorted(families - set(FAMILIES))}"


_EXPORTS: dict[str, tuple] = {}


@pytest.fixture
def exported(request, tmp_path_factory):
    """(model, {format: path}) for a case, traced once and saved in both formats."""
    case = request.param
    if case not in _EXPORTS:
        model = tiny(case)
        rule = size_rule(model)
        size = (rule.min_size, rule.min_size)
        program = trace(model, size)
        out = tmp_path_factory.mktemp(case.replace(":", "-"))
        paths = {}
        for fmt, ext in (("onnx", "onnx"), ("torch-export", "pt2")):
            if fmt in _formats(case) and refusal(model, fmt, True) is None:  # refused ones must refuse instead
                paths[fmt] = out / f"model.{ext}"
                save_program(program, paths[fmt], fmt, export_metadata(model, fmt, size, None, True))
        _EXPORTS[case] = (model, paths, program)
    return _EXPORTS[case]


@pytest.mark.parametrize(("exported", "fmt"), CASES, indirect=["exported"])
def test_parity_at_four_sizes_and_two_batches(exported, fmt, tmp_path):
    model, paths, _ = exported
    why = refusal(model, fmt, True)
    if why is not None:  # a variant that cannot be dynamic in this format says so by name, and writes nothing
        layer = model.cfg.attn_layer
        with pytest.raises(ValueError, match=rf"\({layer}\) cannot be exported to {fmt} with dynamic.*{layer}"):
            export_model(model, tmp_path / "m", format=fmt)
        assert not (tmp_path / "m").exists()
        return
    sizes = default_check_sizes(model, read_metadata(paths[fmt])["example_size"])
    assert len(set(sizes)) == 4 and any(h != w for h, w in sizes)
    results = check_export(paths[fmt], model, sizes, batches=(1, 3), tol=TOL)
    assert list(results) == sizes
    assert all(0.0 <= d <= TOL for d in results.values()), results


@pytest.mark.parametrize(
    ("name", "size", "rule"),
    [
        ("swin_tiny_patch4_window7_224", 224, (116, 224)),  # last stage 7 x 7: one window; stage 2 14 x 14: shifted
        ("swin_base_patch4_window12_384", 384, (196, 384)),
        ("swin_tiny_patch4_window7_224", 448, (228, None)),  # every stage shifted windows: no largest side
        ("swin_tiny_patch4_window7_224", 112, (60, 112)),  # stages 2 and 3 one window
    ],
)
def test_swin_size_rule_keeps_every_stage_on_the_example_branch(name, size, rule):
    from vitkit.models.swin import window_and_shift

    # The rule reads the patch, the window and the stage count only.
    model = create_model(name, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    got = size_rule(model, example_size=size)
    assert (got.min_size, got.max_size) == rule
    p, w = model.cfg.patch_size, model.cfg.window_size

    def branches(side):
        s = -(-side // p)
        out = []
        for _ in model.cfg.depths:
            out.append(window_and_shift(s, s, w, w // 2)[1] > 0)
            s = -(-s // 2)
        return out

    inside = range(got.min_size, (got.max_size or 2 * size) + 1, p)
    assert all(branches(s) == branches(size) for s in inside)  # the rule is sufficient ...
    assert branches(got.min_size - p) != branches(size) or got.min_size == 2 * p  # ... and as wide as it can be
    assert got.max_size is None or branches(got.max_size + p) != branches(size)


@pytest.mark.slow
def test_swin_exports_one_size_with_any_batch(tmp_path):
    # dynamic=False (--static) still gives a file of the example size with a dynamic batch, which fails elsewhere.
    model = tiny("swin")
    program = trace(model, (32, 32), dynamic=False)
    for fmt, ext in (("onnx", "onnx"), ("torch-export", "pt2")):
        path = tmp_path / f"swin.{ext}"
        save_program(program, path, fmt, export_metadata(model, fmt, (32, 32), None, False))
        results = check_export(path, model, [(32, 32)], batches=(1, 3))
        assert results[(32, 32)] <= TOL
        with pytest.raises(ExportCheckError, match="failed to run"):
            check_export(path, model, [(24, 24)], batches=(1,))


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["swin"], indirect=True)
def test_swin_runner_refuses_a_size_outside_the_recorded_rule(exported):
    # The graph cannot tell a size whose stages take the other window branch: it would run and give wrong logits.
    model, paths, _ = exported
    path = paths["torch-export"]
    meta = read_metadata(path)
    assert meta["size_rule"]["min"] == 20 and meta["size_rule"]["max"] == 32 and meta["max_size"] == 32
    with pytest.raises(ExportCheckError, match="failed to run") as err:  # one load of the file: the runner's errors
        check_export(path, model, [(24, 24), (24, 36), (16, 24)], batches=(1,))
    results = err.value.results
    assert results[(24, 24)] <= TOL
    assert re.match(
        r"failed to run .*ValueError: image width 36 is outside what model.pt2 takes: .*20 to 32", results[(24, 36)]
    )
    assert re.match(r"failed to run .*ValueError: image height 16 is outside .*from 20 to 32", results[(16, 24)])


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_metadata_round_trip(exported, fmt):
    model, paths, _ = exported
    meta = read_metadata(paths[fmt])
    pre = model.preprocess
    assert meta["format"] == fmt
    assert meta["model_name"] == "vit_nano_patch4_32"
    assert meta["mean"] == list(pre.mean) and meta["std"] == list(pre.std)
    assert meta["img_size"] == [32, 32] and meta["interpolation"] == pre.interpolation
    assert meta["crop_fraction"] == pre.crop_fraction
    assert meta["class_names"] == ["ant", "bee", "cat"]
    assert meta["patch_multiple"] == 8 and meta["min_size"] == 16 and meta["dynamic_size"] is True
    assert meta["batch"] is None and meta["input_name"] == "images"
    from vitkit import __version__

    assert meta["vitkit_version"] == __version__


def test_a_one_size_file_fails_the_parity_check(tmp_path):
    model = tiny("vit")
    program = trace(model, (32, 32), dynamic=False)  # the shapes of the example only
    for fmt, ext in (("torch-export", "pt2"), ("onnx", "onnx")):
        path = tmp_path / f"static.{ext}"
        save_program(program, path, fmt, export_metadata(model, fmt, (32, 32), None, False))
        assert check_export(path, model, [(32, 32)], batches=(2,)) == {(32, 32): pytest.approx(0.0, abs=TOL)}
        with pytest.raises(ExportCheckError, match="failed to run") as err:
            check_export(path, model, [(32, 32), (40, 24)], batches=(2,))
        assert isinstance(err.value.results[(40, 24)], str)


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
def test_parity_check_catches_wrong_numbers(exported):
    model, paths, _ = exported
    other = tiny("vit")
    with torch.no_grad():
        other.head.bias.add_(1e-3)  # the file now disagrees with `other` by 1e-3 everywhere
    with pytest.raises(ExportCheckError, match="tolerance") as err:
        check_export(paths["torch-export"], other, [(16, 16)], batches=(1,))
    assert err.value.results[(16, 16)] == pytest.approx(1e-3, rel=1e-2)


def test_export_refuses_a_model_that_freezes_the_size(tmp_path):
    # The position lookup as it was before export support: a Python branch on the grid, which the tracer freezes
    # at the example size. export_model must refuse instead of writing a file that claims dynamic sizes.
    model = tiny("vit")

    def branching_lookup(grid, dtype, device):
        if grid == model.native_grid:
            return model.pos_embed
        return resample_pos_embed(model.pos_embed, grid, model.native_grid, model.num_pos_prefix)

    model._pos_embed_for = branching_lookup
    out = tmp_path / "m.pt2"
    with pytest.raises(ValueError, match=r"vit_nano_patch4_32 \(attn_layer='mha'\) cannot be exported with dynamic"):
        export_model(model, out, format="torch-export", example_size=(32, 32))
    assert not out.exists()


def test_a_refusal_names_the_patch_embedding_and_the_static_flag(tmp_path):
    # A refusal names every layer variant the model uses (a guard may come from any of them, or from how they
    # meet), and says how to get a one-size file from the command line too. The model is made to branch on the
    # grid in Python, as in the test above.
    name, kw = FAMILIES["vit"]
    kw = {**kw, "reg_tokens": 0, "attn_layer": "local", "attn_args": ATTENTION["local"], "embed_layer": "overlap"}
    model = create_model(name, num_classes=3, **kw).eval()

    def branching_lookup(grid, dtype, device):
        if grid == model.native_grid:
            return model.pos_embed
        return resample_pos_embed(model.pos_embed, grid, model.native_grid, model.num_pos_prefix)

    model._pos_embed_for = branching_lookup
    with pytest.raises(ValueError, match=r"embed_layer='overlap'\) cannot be exported with dynamic") as err:
        export_model(model, tmp_path / "m.pt2", format="torch-export")
    assert "attn_layer='local'" in str(err.value) and "--static" in str(err.value)
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("rule", [SizeRule(4, 29, "swin", 56), SizeRule(16, 2, "patch"), SizeRule(8, 1, "one size", 1)])
def test_size_rule_round_trips_through_the_metadata(rule):
    back = SizeRule.from_dict(json.loads(json.dumps(rule.as_dict())))
    assert back == rule and (back.min_size, back.max_size) == (rule.min_size, rule.max_size)


def test_traced_resample_equals_eager_at_every_grid():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 4 * 6, 8)
    for grid in [(4, 6), (2, 3), (4, 4), (8, 12), (3, 9), (6, 2)]:
        want = resample_pos_embed(table, grid, (4, 6), 1)
        got = resample_pos_embed_traced(table, grid, (4, 6), 1)
        assert torch.equal(got, want), grid


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
def test_export_is_atomic(exported, tmp_path, monkeypatch):
    model, _, program = exported
    meta = export_metadata(model, "torch-export", (16, 16), None, True)
    out = tmp_path / "model.pt2"
    out.write_bytes(b"the old file")

    def broken_save(program, f, extra_files=None):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_program(program, out, "torch-export", meta)
    assert out.read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # no temporary left behind
    fresh = tmp_path / "new.pt2"
    with pytest.raises(RuntimeError, match="disk full"):
        save_program(program, fresh, "torch-export", meta)
    assert not fresh.exists()
    monkeypatch.undo()
    save_program(program, out, "torch-export", meta)  # and a good export replaces the old file
    assert read_metadata(out)["format"] == "torch-export"


def test_refusals_name_the_value(tmp_path):
    model = tiny("vit")
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"format='tflite'.*'onnx', 'torch-export'"):
        export_model(model, out, format="tflite")
    with pytest.raises(ValueError, match=r"height 30 .*multiples of 8 from 16.*try 24 or 32"):
        export_model(model, out, example_size=(30, 32))
    with pytest.raises(ValueError, match=r"width 8 .*from 16.*try 16"):
        export_model(model, out, example_size=(16, 8))
    with pytest.raises(ValueError, match=r"batch=0"):
        export_model(model, out, batch=0)
    with pytest.raises(ValueError, match=r"opset=17 .*>= 18"):
        export_model(model, out, opset=17)
    with pytest.raises(ValueError, match=r"opset=18 applies to format='onnx' only"):
        export_model(model, tmp_path / "m.pt2", format="torch-export", opset=18)
    with pytest.raises(TypeError, match=r"size must be"):
        export_model(model, out, example_size=(32.0, 32))
    model.set_tome(1)
    with pytest.raises(ValueError, match=r"token merging"):
        export_model(model, out)
    with pytest.raises(ValueError, match=r"width 36 .*multiples of 4 from 20 to 32 \(patch size 4; stage 1.*try 32"):
        export_model(tiny("swin"), out, example_size=(32, 36))  # stage 1 9 x 9: not one window as at 32 x 32
    with pytest.raises(ValueError, match=r"height 30 .*multiples of 4 from 4 \(patch size 4\); try 28 or 32"):
        export_model(tiny("swin"), out, example_size=(30, 32), dynamic=False)
    assert not out.exists()


def test_cli_exports_and_checks(tmp_path, capsys):
    from vitkit.cli import main

    model = tiny("vit")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "vit.pt2"
    assert main(["export", str(tmp_path / "model"), "--format", "torch-export", "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "sides multiples of 8 from 16" in printed
    table = [line for line in printed.splitlines() if " x " in line]
    assert [line.split()[0:3] for line in table] == [["32", "x", "32"], ["48", "x", "48"], ["24", "x", "24"],
                                                     ["40", "x", "56"]]  # fmt: skip
    assert all(float(line.split()[3]) <= TOL for line in table)
    assert read_metadata(out)["class_names"] == ["ant", "bee", "cat"]
    assert main(["export", str(tmp_path / "model"), "--format", "onnx", "--out", str(tmp_path / "x.onnx"),
                 "--img-size", "20"]) == 2  # fmt: skip
    assert "image height 20 cannot be exported" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert json.loads(json.dumps(read_metadata(out)))["model_name"] == "vit_nano_patch4_32"


def test_the_export_command_prints_no_third_party_noise(tmp_path):
    """A fresh process (the exporters' one-time registrations print there): `vitkit export` to ONNX writes its line
    and nothing from torch's exporters (torchvision ops skipped, the .tmp name, a pytree FutureWarning)."""
    import subprocess
    import sys

    tiny("vit").save_pretrained(tmp_path / "model")
    for fmt, name in (("onnx", "m.onnx"), ("torch-export", "m.pt2")):
        done = subprocess.run(
            [sys.executable, "-m", "vitkit", "export", str(tmp_path / "model"), "--format", fmt, "--out",
             str(tmp_path / name)], capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "wrote" in done.stdout
        assert done.stderr.strip() == "", done.stderr  # nothing from torch's exporters (torchvision ops, .tmp name)
