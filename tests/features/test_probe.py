"""Linear probe: it learns linearly separable features (and cannot learn shuffled labels), the weight decay is the
val split's choice, and the probe folds exactly into every family's head."""

from __future__ import annotations

import pytest
import torch

from tests.explain.test_families import FAMILIES, SIDE, tiny_model
from vitkit.features import LinearProbe, fit_linear_probe, fold_into_model, pooled_features


def _blobs(n_per_class: int, seed: int, d: int = 12, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around well-separated centres, on an offset and scale a probe must standardise away."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, d) * 6.0
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + torch.randn(len(labels), d, generator=g)
    return x * 40.0 + 100.0, labels


def test_separable_features_are_learned_and_shuffled_labels_are_not():
    train_x, train_y = _blobs(40, seed=0)
    val_x, val_y = _blobs(20, seed=1)
    probe = fit_linear_probe(train_x, train_y, val_x, val_y, num_classes=3)
    assert [r["weight_decay"] for r in probe.grid] == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    best = max(probe.grid, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert probe.weight_decay == best["weight_decay"]
    test_x, test_y = _blobs(20, seed=2)
    assert (probe.logits(test_x).argmax(1) == test_y).float().mean() >= 0.98

    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    chance = fit_linear_probe(train_x, shuffled, val_x, val_y, num_classes=3)
    assert (chance.logits(test_x).argmax(1) == test_y).float().mean() < 0.7  # 1/3 expected


def test_the_weight_decay_is_chosen_on_val():
    # A huge L2 keeps the weights near 0, so the (unpenalised) bias predicts train's majority class everywhere: 50%
    # on a balanced val split. A small L2 separates the blobs. With val labels that agree with train the small one
    # wins; with them swapped it scores 0% on val and the huge one must be chosen: the choice is made on val.
    train_x, train_y = _blobs(30, seed=0, classes=2)
    keep = torch.cat([torch.arange(30), torch.arange(30, 40)])  # 30 of class 0, 10 of class 1
    train_x, train_y = train_x[keep], train_y[keep]
    val_x, val_y = _blobs(20, seed=1, classes=2)
    grid = [1e-4, 1e4]
    assert fit_linear_probe(train_x, train_y, val_x, val_y, 2, weight_decays=grid).weight_decay == 1e-4
    swapped = fit_linear_probe(train_x, train_y, val_x, 1 - val_y, 2, weight_decays=grid)
    assert swapped.weight_decay == 1e4
    assert [r["val_acc"] for r in swapped.grid] == [0.0, 0.5]


def test_bad_arguments_are_named():
    x, y = _blobs(5, seed=0)
    with pytest.raises(ValueError, match=r"weight_decays must be .* got \[-1\.0\]"):
        fit_linear_probe(x, y, x, y, 3, weight_decays=[-1.0])
    with pytest.raises(ValueError, match=r"train labels must lie in 0..1, got 0..2"):
        fit_linear_probe(x, y, x, y, 2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_probe_folds_into_the_head_of_every_family(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    d = model.num_features
    probe = LinearProbe(
        weight=torch.randn(3, d, generator=g), bias=torch.randn(3, generator=g),
        mean=torch.randn(d, generator=g), std=torch.rand(d, generator=g) + 0.5, weight_decay=0.0,
    )  # fmt: skip
    x = torch.randn(2, 3, SIDE, SIDE, generator=g)
    with torch.no_grad():
        expected = probe.logits(pooled_features(model, x))
        fold_into_model(model, probe, ["a", "b", "c"])
        logits = model(x)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert model.num_classes == 3 and model.preprocess.class_names == ["a", "b", "c"]
