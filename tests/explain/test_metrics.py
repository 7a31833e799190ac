"""Faithfulness and localisation metrics: exact values on constructed cases, and a model built so we know the answer."""

import pytest
import torch
from torch import nn

from tests.explain.conftest import H, W, make_model
from vitkit.explain import (
    auc,
    deletion_auc,
    energy_in_mask,
    evaluate_explanations,
    format_table,
    insertion_auc,
    perturbation_curves,
    pointing_game,
    random_maps,
)
from vitkit.explain.metrics import blur


class CornerModel(nn.Module):
    """Two classes; the class-0 logit is 8 x the mean of the top-left 16 x 16 pixels - 4: only that corner matters."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # so next(model.parameters()) has a device

    def patch_grid(self, height, width):
        return height // 8, width // 8

    def forward(self, x):
        s = x[:, :, :16, :16].mean(dim=(1, 2, 3)) * 8 - 4 + self.anchor
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def corner_map(batch=2):
    m = torch.zeros(batch, H // 8, W // 8)
    m[:, :2, :2] = 1.0  # the four patches that make up the top-left 16 x 16
    return m


def test_pointing_game_oracle_and_miss():
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 4:12, 8:20] = True
    masks[1, 20:30, 30:40] = True
    assert pointing_game(masks.float(), masks).all()  # the mask itself is a perfect map
    miss = torch.zeros(2, H, W)
    miss[:, 0, 0] = 1.0
    assert not pointing_game(miss, masks).any()


def test_pointing_game_tolerance():
    masks = torch.zeros(1, H, W, dtype=torch.bool)
    masks[0, 10:20, 10:20] = True
    near = torch.zeros(1, H, W)
    near[0, 15, 20] = 1.0  # one pixel right of the mask (columns 10..19)
    assert not pointing_game(near, masks)[0]
    assert pointing_game(near, masks, tolerance=1)[0]
    assert not pointing_game(near, masks, tolerance=0)[0]
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(near, masks, tolerance=-1)


def test_pointing_game_upsamples_patch_maps():
    masks = torch.zeros(1, H, W, dtype=torch.bool)
    masks[0, 8:16, 16:24] = True  # exactly patch (1, 2) of the 4 x 6 grid
    grid_map = torch.zeros(1, 4, 6)
    grid_map[0, 1, 2] = 1.0
    assert pointing_game(grid_map, masks)[0]


def test_energy_in_mask():
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[:, :8, :] = True  # a quarter of the image
    torch.testing.assert_close(energy_in_mask(masks.float(), masks), torch.ones(2))
    torch.testing.assert_close(energy_in_mask(torch.ones(2, H, W), masks), torch.full((2,), 0.25))
    assert energy_in_mask(torch.zeros(2, H, W), masks).eq(0).all()


def test_auc_trapezoid():
    x = torch.linspace(0, 1, 11)
    torch.testing.assert_close(auc(x, torch.ones(3, 11)), torch.ones(3))
    torch.testing.assert_close(auc(x, (1 - x).expand(2, 11)), torch.full((2,), 0.5))


def test_curve_end_points():
    model = make_model("registers")
    x = torch.randn(2, 3, H, W)
    sal = torch.rand(2, 4, 6)
    with torch.no_grad():
        clean = model(x).softmax(-1)
        target = clean.argmax(-1)
        p = lambda imgs: model(imgs).softmax(-1).gather(1, target[:, None])[:, 0]  # noqa: E731
        p_clean, p_zero, p_blur = p(x), p(torch.zeros_like(x)), p(blur(x))
    frac, dele = perturbation_curves(model, x, sal, mode="deletion")
    assert frac[0] == 0 and frac[-1] == 1 and len(frac) == 25  # 24 patches, one per step
    torch.testing.assert_close(dele[:, 0], p_clean)
    torch.testing.assert_close(dele[:, -1], p_zero)
    _, ins = perturbation_curves(model, x, sal, mode="insertion")
    torch.testing.assert_close(ins[:, 0], p_blur)
    torch.testing.assert_close(ins[:, -1], p_clean)
    frac, coarse = perturbation_curves(model, x, sal, mode="deletion", max_steps=5, batch_size=7)
    assert len(frac) == 6 and torch.allclose(frac, torch.tensor([0, 5, 10, 15, 20, 24]) / 24)
    torch.testing.assert_close(coarse[:, 0], p_clean)


def test_deletion_follows_the_saliency_order():
    model = CornerModel()
    x = torch.ones(2, 3, H, W)
    frac, curve = perturbation_curves(model, x, corner_map(), mode="deletion")
    # Each of the first four steps deletes a corner patch: the logit drops by 8/4 each time, then stays at -4.
    expected = torch.sigmoid(torch.tensor([4.0, 2, 0, -2, -4]))
    torch.testing.assert_close(curve[:, :5], expected.expand(2, 5))
    torch.testing.assert_close(curve[:, 5:], torch.sigmoid(torch.tensor(-4.0)).expand(2, 20))


def test_good_map_beats_random_on_a_model_built_so():
    model = CornerModel()
    x = torch.rand(4, 3, H, W) + 0.5
    gen = torch.Generator().manual_seed(0)
    good = deletion_auc(model, x, corner_map(4), target=0)
    rand = deletion_auc(model, x, random_maps(4, (4, 6), generator=gen), target=0)
    assert (good < rand).all()
    # Insertion starts from the blurred image; a bright corner on black loses half its brightness to the blur.
    x = torch.zeros(4, 3, H, W)
    x[:, :, :16, :16] = 1.0
    first = insertion_auc(model, x, corner_map(4), target=0)
    last = insertion_auc(model, x, -corner_map(4), target=0)
    rand = insertion_auc(model, x, random_maps(4, (4, 6), generator=gen), target=0)
    assert (first > rand).all() and (rand > last).all()


def test_pixel_maps_are_pooled_onto_the_grid():
    model = CornerModel()
    x = torch.ones(1, 3, H, W)
    pixel = torch.zeros(1, H, W)
    pixel[0, :16, :16] = 1.0
    torch.testing.assert_close(deletion_auc(model, x, pixel), deletion_auc(model, x, corner_map(1)))
    with pytest.raises(ValueError, match="match neither"):
        deletion_auc(model, x, torch.zeros(1, 5, 7))


def test_evaluate_explanations_runs_every_method():
    model = make_model("registers")
    x = torch.randn(4, 3, H, W)
    masks = torch.zeros(4, H, W, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    out = evaluate_explanations(model, x, masks, labels=torch.tensor([0, 1, 2, 3]), batch_size=3, max_steps=4)
    assert set(out["methods"]) == {"attention", "rollout", "flow", "grad-rollout", "relevance", "gradcam", "random"}
    for row in out["methods"].values():
        assert 0 <= row["pointing"] <= row["pointing_half_patch"] <= row["pointing_patch"] <= 1
        assert 0 <= row["energy"] <= 1 and 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    table = format_table(out)
    assert table.count("\n") == 8 and "| relevance |" in table and "| gradcam |" in table and "| flow |" in table
    with pytest.raises(ValueError, match="method='gradcam2'"):
        evaluate_explanations(model, x, masks, methods=["gradcam2"])
