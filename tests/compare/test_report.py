"""The "when to use which" rules on hand-made results: each sentence follows the numbers."""

from vitkit.compare.report import recommendations


def _model(accs, gmacs, slope, shift, rot, occ, img_s=100.0):
    return {
        "train": {f: {"test_acc": a} for f, a in accs.items()},
        "cost": {"gmacs": gmacs, "infer_img_s": img_s, "device": "cpu", "gmacs_slope": slope},
        "probe": {
            "shift": {"shift_px": [1, 2], "consistency": [1.0, shift]},
            "rotation": {"angle_deg": [0, 90], "accuracy": [0.9, rot]},
            "occlusion": {"k": [0, 4], "accuracy": [0.9, occ]},
        },
    }


def _results(vit_accs, cnn_accs):
    return {
        "fractions": [0.1, 1.0],
        "subset_sizes": {"0.1": 143, "1.0": 1439},
        "models": {
            "vit": _model(vit_accs, 0.02, 3.1, 0.70, 0.2, 0.6),
            "cnn": _model(cnn_accs, 0.01, 2.0, 0.90, 0.3, 0.5, img_s=900.0),
        },
    }


def test_scarce_and_plentiful_winners_differ():
    text = " ".join(recommendations(_results({"0.1": 0.60, "1.0": 0.97}, {"0.1": 0.80, "1.0": 0.93})))
    assert "With 143 training images (10%), cnn is the most accurate (80.0%, vs 60.0% for vit)" in text
    assert "With 1439 training images (100%), vit is the most accurate (97.0%" in text
    assert "cnn when labelled data is scarce, vit when all of it is available" in text
    assert "Cheapest per image: cnn (10.0 MMACs); fastest measured inference: cnn (900 img/s" in text
    assert "vit costs 2.0x the compute of cnn for +4.0 points" in text
    assert "fastest with image size for vit (~side^3.10)" in text and "prefer cnn" in text
    assert (
        "Most shift-consistent over shifts of 1-2 px: cnn (95.0% of predictions unchanged on average, vs 85.0%" in text
    )
    assert "Caution" not in text


def test_ties_and_undertrained_models():
    text = " ".join(recommendations(_results({"0.1": 0.300, "1.0": 0.405}, {"0.1": 0.295, "1.0": 0.40})))
    assert text.startswith("Caution: the best test accuracy is only 40.5%")
    assert "vit, cnn are within 1 point" in text
    assert "when labelled data is scarce" not in text
    assert "shift-consistent" not in text  # robustness is not compared between models that learned nothing


def test_robustness_is_compared_only_between_models_that_learned():
    res = _results({"0.1": 0.60, "1.0": 0.97}, {"0.1": 0.80, "1.0": 0.93})
    res["models"]["weak"] = _model({"0.1": 0.1, "1.0": 0.2}, 0.03, 2.0, 1.0, 0.9, 0.9)  # constant predictor
    text = " ".join(recommendations(res))
    assert "weak is left out" in text
    assert "Most shift-consistent over shifts of 1-2 px: cnn" in text  # not the weak model's trivial 100%


def test_shift_rule_uses_every_shift_not_only_the_largest():
    # A ViT whose largest shift equals its patch size: consistent there, worst everywhere else.
    res = _results({"0.1": 0.60, "1.0": 0.97}, {"0.1": 0.80, "1.0": 0.93})
    res["models"]["vit"]["probe"]["shift"] = {"shift_px": [1, 2, 3, 4], "consistency": [0.53, 0.51, 0.26, 0.52]}
    res["models"]["cnn"]["probe"]["shift"] = {"shift_px": [1, 2, 3, 4], "consistency": [0.95, 0.75, 0.39, 0.20]}
    text = " ".join(recommendations(res))
    assert "Most shift-consistent over shifts of 1-4 px: cnn (57.2%" in text and "vs 45.5% for vit" in text


def test_one_fraction_states_its_winner_once():
    """With a single --fractions value the smallest and the largest fraction are the same one: one sentence."""
    res = _results({"1.0": 0.97}, {"1.0": 0.93})
    res["fractions"], res["subset_sizes"] = [1.0], {"1.0": 1439}
    lines = recommendations(res)
    assert sum("training images" in line for line in lines) == 1, lines
