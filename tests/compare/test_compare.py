"""`compare` and `sweep` end to end at tiny sizes: results, report files, resume after a kill, refused settings."""

import json

import pytest
import torch

import vitkit
from tests.compare.conftest import SETTINGS, TINY_CNN, TINY_VIT
from vitkit.compare import compare
from vitkit.compare.sweep import sweep, sweep_points
from vitkit.compare.units import (
    EPOCH_OVERHEAD_S,
    UNIT_OVERHEAD_S,
    ModelSpec,
    base_config,
    epochs_for_budget,
    load_splits,
    run_training,
    train_subset,
    training_seconds,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_killed_compare_resumes_without_redoing_finished_units(compared):
    out, _results, first, second, mtimes = compared
    done_first = list(first)
    assert done_first[-1].startswith("train-") and sum(u.startswith("train-") for u in done_first) == 1
    # The re-run wrote every other unit, and none of those the first run had finished.
    assert not set(done_first) & set(second)
    assert sum(u.startswith("train-") for u in second) == 3 and sum(u.startswith("probe-") for u in second) == 2
    for name, ns in mtimes.items():
        assert (out / "units" / name).stat().st_mtime_ns == ns, f"{name} was rewritten"


def test_results_hold_every_measurement(compared):
    out, results, *_ = compared
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["models"]) == {TINY_VIT.label, TINY_CNN.label}
    vit, cnn = saved["models"][TINY_VIT.label], saved["models"][TINY_CNN.label]
    for r in (vit, cnn):
        assert set(r["train"]) == {"0.25", "1.0"}
        assert all(0 <= t["test_acc"] <= 1 for t in r["train"].values())
        assert r["train"]["0.25"]["n_train"] < r["train"]["1.0"]["n_train"] == saved["split_sizes"]["train"]
        c = r["cost"]
        assert c["params"] > 0 and c["gmacs"] > 0 and c["infer_img_s"] > 0 and c["train_step_s"] > 0
        assert c["cost_vs_size"]["side_px"] == [16, 32] and c["gmacs_slope"] > 1
        p = r["probe"]
        assert len(p["shift"]["consistency"]) == 1 and 0 <= p["shift"]["consistency"][0] <= 1
        assert p["occlusion"]["k"] == [0, 1, 2, 4] and p["rotation"]["angle_deg"][0] == 0
        assert p["occlusion"]["accuracy"][0] == pytest.approx(p["clean_acc"])  # k = 0 is the clean image
        assert all(d["r50_px"] <= d["r90_px"] for d in p["erf"])
        assert len(p["explain"]["maps"]) == 2
    # One entry per block for the ViT, per stage for the ResNet; attention distances only where there is attention.
    assert len(vit["probe"]["erf"]) == 2 and len(cnn["probe"]["erf"]) == 4
    assert torch.tensor(vit["probe"]["attention_distance_px"]).shape == (2, 2)
    assert cnn["probe"]["attention_distance_px"] is None
    from vitkit.viz.attention import uniform_attention_distance

    # 16 px images in 4 px patches: a 4x4 grid.
    assert vit["probe"]["attention_distance_uniform_px"] == pytest.approx(uniform_attention_distance((4, 4), 4))
    assert vit["probe"]["explain"]["method"] in ("relevance", "grad-rollout", "rollout")
    assert cnn["probe"]["explain"]["method"] == "gradcam"
    assert saved["recommendations"] and all(isinstance(s, str) for s in saved["recommendations"])


def test_report_files(compared):
    out, results, *_ = compared
    md = (out / "report.md").read_text()
    for heading in ("Size and cost", "Data efficiency", "Effective receptive fields", "Inductive-bias probes"):
        assert f"## {heading}" in md
    assert TINY_VIT.label in md and TINY_CNN.label in md
    for name in results["figures"].values():
        assert (out / name).read_bytes()[:8] == PNG
    assert "http://" not in (out / "report.html").read_text() and "https://" not in (out / "report.html").read_text()


def test_a_rerun_with_other_settings_is_refused(compared):
    out, *_ = compared
    with pytest.raises(ValueError, match="fractions: recorded"):
        compare([TINY_VIT, TINY_CNN], out=out, log=lambda m: None, **{**SETTINGS, "fractions": (0.5, 1.0)})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\]"):
        compare(["vit_nano_patch4_32"], out="unused", fractions=(0.0, 1.0))
    with pytest.raises(ValueError, match="either epochs or budget_minutes"):
        compare(["vit_nano_patch4_32"], out="unused", epochs=1, budget_minutes=1)
    with pytest.raises(ValueError, match="given twice"):
        compare(["resnet18", "resnet18"], out="unused")
    with pytest.raises(ValueError, match="vit_nano_patch4_3"):
        compare(["vit_nano_patch4_3"], out="unused")


def test_a_model_that_cannot_take_the_size_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"model convnext_tiny at img_size 16: .*smaller than ConvNeXt's total stride"):
        compare(["vit_nano_patch4_32", "convnext_tiny"], out=tmp_path / "c", img_size=16, log=lambda m: None)
    assert not (tmp_path / "c").exists()


def test_budget_arithmetic():
    # 600 s budget, 100 s kept back, 50 s per epoch of all runs together: 10 epochs; never fewer than 1.
    assert epochs_for_budget(600, 50, 100) == 10
    assert epochs_for_budget(10, 50, 100) == 1
    # 100 images, batch 32 -> 3 steps of 0.5 s, 20 validation images at 10 img/s, plus the fixed allowances.
    expected = 2 * (3 * 0.5 + 2.0 + EPOCH_OVERHEAD_S) + UNIT_OVERHEAD_S
    assert training_seconds(0.5, 10.0, 100, 20, 32, 2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="budget_minutes must be positive"):
        compare(["vit_nano_patch4_32"], out="unused", budget_minutes=0)


def test_a_killed_training_continues_from_its_checkpoint(tmp_path):
    cfg = base_config("digits", {"img_size": 16, "epochs": 2, "seed": 0})
    splits = load_splits(cfg)
    ds = train_subset(splits.train, 0.25, 0)

    def kill_after_epoch_1(msg: str) -> None:
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt  # after RUN_DIR/last of epoch 1 is written, as a kill there would leave it

    with pytest.raises(KeyboardInterrupt):
        run_training(TINY_VIT, cfg, splits, ds, tmp_path / "run", kill_after_epoch_1)
    messages: list[str] = []
    _, result = run_training(TINY_VIT, cfg, splits, ds, tmp_path / "run", messages.append)
    assert result["resumed"]
    assert any("resuming" in m and "from epoch 2" in m for m in messages)
    assert not any(m.startswith("epoch 1/2") for m in messages)  # epoch 1 was not trained again
    assert result["steps"] == 2 * (len(ds) // result["batch_size"]) and len(result["val_acc_curve"]) == 2


def test_training_fractions_are_stratified_and_nested():
    splits = load_splits(base_config("digits", {}))
    subsets = [train_subset(splits.train, f, 0) for f in (0.1, 0.25, 0.5)]
    assert [len(s) for s in subsets] == [143, 359, 719]
    for s in subsets:  # every class keeps its share
        assert torch.bincount(s.labels, minlength=10).min() >= 0.8 * len(s) / 10
    content = [{x.numpy().tobytes() for x in s.images} for s in subsets]
    assert content[0] <= content[1] <= content[2]  # a smaller fraction is part of every larger one
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        train_subset(splits.train, 1.5, 0)


def test_sweep_points_one_at_a_time_and_grid():
    vary = {"img_size": [16, 32], "pool": ["token", "avg"], "depth": [1, 2, 3]}
    one = sweep_points(vary)
    assert one[0] == {"img_size": 16, "pool": "token", "depth": 1}
    assert len(one) == 1 + 1 + 1 + 2
    assert {"img_size": 16, "pool": "token", "depth": 3} in one
    assert len(sweep_points(vary, grid=True)) == 12
    with pytest.raises(ValueError, match="given twice"):
        sweep_points({"depth": [2, 2]})


def test_sweep_end_to_end_and_resume(tmp_path):
    kw = dict(data="digits", out=tmp_path, epochs=1, img_size=8, log=lambda m: None)
    kw["model_args"] = {"embed_dim": 16, "num_heads": 2}
    units: list[str] = []
    res = sweep("vit_nano_patch4_32", {"depth": [1, 2], "pool": ["token", "avg"]}, on_unit=units.append, **kw)
    names = [p["name"] for p in res["points"]]
    assert names == ["base", "depth=2", "pool=avg"]
    assert len(units) == 6  # a cost and a training unit per point
    params = {p["name"]: p["cost"]["params"] for p in res["points"]}
    assert params["depth=2"] > params["base"]  # one more block
    width16 = vitkit.create_model("vit_nano_patch4_32", img_size=8, embed_dim=16, num_heads=2, depth=1, num_classes=10)
    assert params["base"] == sum(p.numel() for p in width16.parameters())  # the fixed model_args reach every point
    assert all(0 <= p["train"]["test_acc"] <= 1 for p in res["points"])
    assert (tmp_path / "figures" / "sweep.png").read_bytes()[:8] == PNG
    assert "Most accurate point" in (tmp_path / "report.md").read_text()
    again: list[str] = []
    sweep("vit_nano_patch4_32", {"depth": [1, 2], "pool": ["token", "avg"]}, on_unit=again.append, **kw)
    assert again == []


def test_sweep_refuses_bad_settings_before_training(tmp_path):
    with pytest.raises(ValueError, match="cannot be varied"):
        sweep("vit_nano_patch4_32", {"epochs": [1, 2]}, out=tmp_path)
    with pytest.raises(ValueError, match="depth is both fixed"):
        sweep("vit_nano_patch4_32", {"depth": [1, 2]}, out=tmp_path, model_args={"depth": 3})
    with pytest.raises(ValueError, match="sweep point dpeth=2"):
        sweep("vit_nano_patch4_32", {"dpeth": [2]}, out=tmp_path, log=lambda m: None)
    assert not (tmp_path / "plan.json").exists()


def test_model_spec_label_and_slug():
    spec = ModelSpec("resnet18", {"widths": [4, 8]})
    assert spec.label == "resnet18(widths=4-8)"
    assert spec.slug == "resnet18_widths_4-8"
