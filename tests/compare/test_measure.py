"""Each measurement of `vitkit compare` on a tiny case whose answer is known by hand."""

import math

import pytest
import torch
from torch import nn

from vitkit.compare import measure as M


def _ones_conv(cin: int = 1, cout: int = 1, k: int = 3) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    return conv


# --- effective receptive field ------------------------------------------------------------------------------------
def test_erf_of_one_3x3_conv_is_exactly_the_3x3_centre():
    erf = M.effective_receptive_field(_ones_conv(), torch.randn(3, 1, 9, 9))
    support = (erf > 0).nonzero().tolist()
    assert sorted(support) == [[r, c] for r in (3, 4, 5) for c in (3, 4, 5)]
    assert torch.allclose(erf[3:6, 3:6], torch.ones(3, 3))  # each input pixel reaches the centre once
    # 5 of 9 equal pixels lie within 1 px of the centre (>= 50%); all 9 within sqrt(2) (>= 90%).
    assert M.erf_radius(erf, 0.5) == pytest.approx(1.0)
    assert M.erf_radius(erf, 0.9) == pytest.approx(math.sqrt(2))


def test_erf_of_two_stacked_3x3_convs_is_exactly_5x5():
    net = nn.Sequential(_ones_conv(), _ones_conv())
    erf = M.effective_receptive_field(net, torch.randn(2, 1, 11, 11))
    rows, cols = (erf > 0).nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 7, 3, 7)
    assert int((erf > 0).sum()) == 25
    # Not uniform: the centre pixel has 9 paths to the centre output, a corner of the 5x5 only 1.
    assert erf[5, 5] == pytest.approx(9.0) and erf[3, 3] == pytest.approx(1.0)


def test_erf_radius_of_a_point_is_zero_and_bad_maps_are_refused():
    point = torch.zeros(7, 7)
    point[2, 4] = 3.0
    assert M.erf_radius(point, 0.9) == 0.0
    with pytest.raises(ValueError, match="no positive weight"):
        M.erf_radius(torch.zeros(5, 5))
    with pytest.raises(ValueError, match=r"mass must be in \(0, 1\]"):
        M.erf_radius(point, 1.5)


def test_model_erf_reads_a_vit_block_on_its_patch_grid():
    from vitkit.models.vit import VisionTransformer, ViTConfig

    vit = VisionTransformer(ViTConfig(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3))
    erf = M.model_erf(vit, torch.randn(2, 3, 16, 16), 1)
    assert erf.shape == (16, 16)
    # Global attention: the centre token depends on pixels in every patch, not only its own 4x4 patch.
    assert bool((erf.reshape(4, 4, 4, 4).sum(dim=(1, 3)) > 0).all())


# --- attention distance -----------------------------------------------------------------------------------------
def test_mean_attention_distance_of_a_hand_made_map():
    # A 2x2 grid of 4 px patches after one class token: 5 tokens.
    n = 5
    to_first = torch.zeros(1, 1, n, n)
    to_first[0, 0, :, 0] = 0.5  # half of every row on the class token: excluded, the rest renormalised
    to_first[0, 0, :, 1] = 0.5  # the other half on patch (0, 0)
    to_self = torch.eye(n).view(1, 1, n, n)
    attn = torch.cat([to_first, to_self], dim=1)  # (B=1, heads=2, 5, 5)
    d = M.attention_distance_from_maps([attn], grid=(2, 2), patch_size=4, num_prefix_tokens=1)
    # Head 0: queries at (0,0) (0,4) (4,0) (4,4) px all look at (0,0): distances 0, 4, 4, 4*sqrt(2).
    assert d.shape == (1, 2)
    assert d[0, 0].item() == pytest.approx((0 + 4 + 4 + 4 * math.sqrt(2)) / 4)
    assert d[0, 1].item() == pytest.approx(0.0)  # every query looks at itself


# --- cost -----------------------------------------------------------------------------------------------------------
def test_gmacs_of_one_conv_is_counted_exactly():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert M.model_gmacs(net, 16) == pytest.approx(16 * 16 * 8 * 3 * 9 / 1e9)


def test_loglog_slope_recovers_the_exponent():
    sides = [16, 32, 64, 128]
    assert M.loglog_slope(sides, [3 * s**2 for s in sides]) == pytest.approx(2.0)
    assert M.loglog_slope(sides, [s**4 + 0 * s for s in sides]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="two distinct"):
        M.loglog_slope([8], [1.0])
    with pytest.raises(ValueError, match="positive"):
        M.loglog_slope([8, 16], [0.0, 1.0])


def test_train_step_time_leaves_the_model_untouched_and_throughput_is_positive():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    before = [p.detach().clone() for p in net.parameters()]
    assert M.train_step_time(net, 4, 8, num_classes=5, repeats=1) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert M.inference_throughput(net, 4, 8, repeats=1) > 0
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        M.inference_throughput(net, 0, 8)


def test_peak_memory_sees_a_64_mib_allocation():
    import os

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS sampling needs /proc")
    import time

    with M.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, touched
        # Alive for 50 sampling periods before it is freed: a sampler thread starved of the GIL or a core (a loaded
        # CI machine) missed an allocation freed at once (peak 53.6 MiB seen in a fresh-clone run).
        time.sleep(0.05)
        del x
    assert mem.peak_mib >= 60


# --- probes -----------------------------------------------------------------------------------------------------
class CircularGap(nn.Module):
    """Circular 3x3 conv, ReLU, global average pooling, linear: exactly invariant to circular shifts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Flat(nn.Module):
    """A linear classifier on the raw pixels: no reason to be shift-invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_shift_consistency_is_one_for_an_exactly_invariant_model():
    x = torch.randn(24, 1, 8, 8)
    res = M.shift_consistency(CircularGap(), x, max_shift=3, mode="circular")
    assert res["shift_px"] == [1, 2, 3]
    assert res["consistency"] == [1.0, 1.0, 1.0]


def test_shift_consistency_can_fail():
    x = torch.randn(64, 1, 8, 8)
    res = M.shift_consistency(Flat(), x, max_shift=2, mode="circular")
    assert max(res["consistency"]) < 0.8


def test_shift_images_pads_with_the_fill_value():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = M.shift_images(x, 1, -1, mode="pad", fill=-5.0)
    assert y[0, 0, 0].tolist() == [-5.0] * 4  # the uncovered top row
    assert y[0, 0, :, 3].tolist() == [-5.0] * 4  # the uncovered right column
    assert y[0, 0, 1, 0].item() == x[0, 0, 0, 1].item()  # (0, 1) moved one down, one left


def test_occlusion_masks_exactly_k_cells_and_k0_is_the_clean_accuracy():
    x = torch.zeros(5, 1, 8, 8)
    occ = M.occlude_images(x, 3, grid=4, fill=1.0, generator=torch.Generator().manual_seed(0))
    assert (occ.sum(dim=(1, 2, 3)) == 3 * 2 * 2).all()  # 3 cells of 2x2 px per image
    model = Flat()
    xs = torch.randn(16, 1, 8, 8)
    labels = model(xs).argmax(-1)
    res = M.occlusion_accuracy(model, xs, labels, ks=(0, 16), grid=4, fill=0.0)
    assert res["accuracy"][0] == 1.0
    assert res["fraction"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="cannot be occluded"):
        M.occlude_images(x, 17, grid=4)


def test_rotation_accuracy_of_a_rotation_invariant_model():
    # Global average pooling of a 1x1 conv ignores where pixels are, so quarter turns cannot change it.
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(12, 1, 6, 6)
    labels = model(x).argmax(-1)
    res = M.rotation_accuracy(model, x, labels, angles=(0, 90, 180, 270))
    assert res["accuracy"] == [1.0, 1.0, 1.0, 1.0]
    assert torch.equal(M.rotate_images(M.rotate_images(x, 90), 270), x)
    # A small angle keeps the centre pixel and fills the corners with the fill value.
    r = M.rotate_images(torch.ones(1, 1, 9, 9), 45, fill=-1.0)
    assert r[0, 0, 4, 4].item() == pytest.approx(1.0) and r[0, 0, 0, 0].item() == pytest.approx(-1.0)
