"""Batch transforms and Mixup/CutMix: shapes, exact values on known images, determinism, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.data import EvalTransform, Mixup, TrainTransform, smooth_one_hot
from vitkit.data.transforms import sample_crop_boxes
from vitkit.train.losses import soft_target_cross_entropy

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _normalised(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def astro(astronaut) -> torch.Tensor:
    """A batch of 4 natural 64x64 images: quarters of skimage's astronaut, uint8 (4, 3, 64, 64)."""
    img = torch.from_numpy(astronaut).permute(2, 0, 1)  # (3, 512, 512)
    small = F.interpolate(img[None].float(), size=(128, 128), mode="area")[0].round().to(torch.uint8)
    return torch.stack([small[:, :64, :64], small[:, :64, 64:], small[:, 64:, :64], small[:, 64:, 64:]])


def test_eval_transform_centre_crops_a_known_image() -> None:
    # Each pixel holds its column index, so the crop's offset can be read back exactly.
    cols = torch.arange(80, dtype=torch.uint8).view(1, 1, 1, 80).expand(2, 3, 40, 80)
    out = EvalTransform(32, MEAN, STD, crop_fraction=0.8)(cols)  # scale size 40 == input height: no resize
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, _normalised(cols[:, :, 4:36, 24:56]), atol=1e-6)


def test_eval_transform_resizes_shorter_side_then_crops(astro: torch.Tensor) -> None:
    tf = EvalTransform(48, MEAN, STD)  # 48 / 0.875 -> 54
    assert tf.resized_shape(64, 64) == (54, 54) and tf.resized_shape(60, 120) == (54, 108)
    out = tf(astro)
    ref = F.interpolate(astro.float() / 255, size=(54, 54), mode="bicubic", antialias=True, align_corners=False)
    ref = ref.clamp(0, 1)[:, :, 3:51, 3:51]
    assert torch.allclose(out, (ref - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert torch.equal(out, tf(astro))  # deterministic
    assert torch.allclose(tf(astro.float() / 255), out, atol=1e-6)  # float 0..1 input is accepted


def test_eval_transform_upsamples_small_inputs_and_normalises() -> None:
    ramp = (torch.arange(8) * 30).to(torch.uint8).view(1, 1, 1, 8).expand(2, 3, 8, 8)  # columns 0, 30, ..., 210
    out = EvalTransform(32, MEAN, STD)(ramp)  # 8 -> 36 -> centre 32
    assert out.shape == (2, 3, 32, 32)
    values = (out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    row = values[0, 0, 16]
    assert (row.diff() >= -1e-3).all()  # a ramp stays a ramp
    assert row[0] < 15 and row[-1] > 195  # the crop drops about a pixel of the 36 at each edge
    assert torch.allclose(values, row.expand_as(values), atol=1e-3)  # rows and channels untouched
    # Normalising with the data's own statistics gives zero mean and unit std per channel.
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    f = x.float() / 255
    mean, std = f.mean(dim=(0, 2, 3)).tolist(), f.std(dim=(0, 2, 3), unbiased=False).tolist()
    y = EvalTransform(16, mean, std, crop_fraction=1.0)(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_eval_transform_non_square() -> None:
    x = torch.randint(0, 256, (2, 3, 30, 50), dtype=torch.uint8)
    out = EvalTransform((24, 40), MEAN, STD, crop_fraction=0.8)(x)  # exact resize to (30, 50): a no-op
    assert out.shape == (2, 3, 24, 40)
    assert torch.allclose(out, _normalised(x[:, :, 3:27, 5:45]), atol=1e-6)


def test_train_transform_identity_when_randomness_is_off(astro: torch.Tensor) -> None:
    tf = TrainTransform(64, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert torch.allclose(tf(astro), _normalised(astro), atol=1e-6)
    flip = TrainTransform(64, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    assert torch.allclose(flip(astro), _normalised(astro).flip(-1), atol=1e-6)


def test_train_transform_shapes_and_determinism(astro: torch.Tensor) -> None:
    tf = TrainTransform(32, MEAN, STD, color_jitter=0.4, auto_augment="randaugment", random_erasing=0.25)
    torch.manual_seed(0)
    a = tf(astro)
    torch.manual_seed(0)
    b = tf(astro)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, tf(astro))
    trivial = TrainTransform((24, 40), MEAN, STD, auto_augment="trivialaugment", randaug_m=10)
    out = trivial(astro)
    assert out.shape == (4, 3, 24, 40) and torch.isfinite(out).all()
    # Pixel values stay in the normalised 0..1 range whatever the policy does.
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (out.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (out.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()


def test_random_erasing_fills_a_rectangle_with_the_mean(astro: torch.Tensor) -> None:
    tf = TrainTransform(64, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, random_erasing=1.0)
    torch.manual_seed(1)
    out = tf(astro)
    erased = (out == 0).all(dim=1)  # (B, H, W): the mean becomes exactly 0 after normalising
    share = erased.flatten(1).float().mean(1)
    assert ((share > 0.015) & (share < 0.4)).all(), share  # kornia's default area range is 2%..33%
    kept = ~erased[:, None].expand_as(out)
    assert torch.allclose(out[kept], _normalised(astro)[kept], atol=1e-6)


def test_crop_boxes_respect_scale_and_ratio() -> None:
    torch.manual_seed(0)
    boxes = sample_crop_boxes(2000, 60, 80, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 80).all()
    area = (h * w).float() / (60 * 80)
    assert area.min() > 0.18 and area.max() < 0.63  # within scale, up to pixel rounding
    aspect = w.float() / h.float()
    assert aspect.min() > 0.45 and aspect.max() < 2.2
    assert 0.35 < area.mean() < 0.45  # uniform in [0.2, 0.6]
    # A crop that can never fit (scale > what the ratio allows) falls back to the central crop within ratio.
    tall = sample_crop_boxes(3, 100, 10, scale=(1.0, 1.0), ratio=(0.5, 2.0))
    assert tall.tolist() == [[40, 0, 20, 10]] * 3


def test_transform_argument_errors() -> None:
    with pytest.raises(ValueError, match="hflip must be in \\[0, 1\\], got 1.5"):
        TrainTransform(32, MEAN, STD, hflip=1.5)
    with pytest.raises(ValueError, match="auto_augment='autoaugment' is not allowed; choose one of 'none'"):
        TrainTransform(32, MEAN, STD, auto_augment="autoaugment")
    with pytest.raises(ValueError, match="img_size must be positive, got 0"):
        TrainTransform(0, MEAN, STD)
    with pytest.raises(TypeError, match="img_size"):
        EvalTransform(32.5, MEAN, STD)
    with pytest.raises(ValueError, match="crop_fraction must be in \\(0, 1\\], got 0"):
        EvalTransform(32, MEAN, STD, crop_fraction=0)
    with pytest.raises(ValueError, match="interpolation='lanczos' is not allowed; choose one of 'bicubic'"):
        EvalTransform(32, MEAN, STD, interpolation="lanczos")
    with pytest.raises(ValueError, match="std values must be positive"):
        EvalTransform(32, MEAN, (0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="scale must be"):
        TrainTransform(32, MEAN, STD, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="randaug_m"):
        TrainTransform(32, MEAN, STD, auto_augment="randaugment", randaug_m=11)
    with pytest.raises(ValueError, match="expected an image batch"):
        EvalTransform(32, MEAN, STD)(torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_smooth_one_hot_and_soft_cross_entropy() -> None:
    y = torch.tensor([0, 3, 9])
    t = smooth_one_hot(y, 10, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t[1, 3], torch.tensor(0.91)) and torch.allclose(t[1, 0], torch.tensor(0.01))
    logits = torch.randn(3, 10)
    expected = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(soft_target_cross_entropy(logits, t), expected, atol=1e-6)
    with pytest.raises(ValueError, match="label 10 is outside the class range 0..9"):
        smooth_one_hot(torch.tensor([10]), 10, 0.0)


def test_mixup_blends_images_and_targets_with_the_same_lambda() -> None:
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    mix = Mixup(num_classes=6, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    torch.manual_seed(0)
    mixed, target = mix(x, y)
    lam = float(target[0, 0])
    assert 0 < lam < 1 and torch.allclose(target[0, 5], torch.tensor(1 - lam))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(6))
    smoothed = Mixup(num_classes=6, cutmix_alpha=0.0, label_smoothing=0.3)
    torch.manual_seed(0)
    _, soft = smoothed(x, y)
    off = 0.3 / 6
    assert torch.allclose(soft[0, 0], torch.tensor(lam * (0.7 + off) + (1 - lam) * off))
    assert torch.allclose(soft[0, 1], torch.tensor(off)) and torch.allclose(soft.sum(1), torch.ones(6))


def test_cutmix_area_matches_lambda() -> None:
    mix = Mixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 20, 30).contiguous()
    y = torch.arange(4)
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, target = mix(x, y)
        for i in range(4):
            pasted = (mixed[i, 0] != i).float().mean()  # share of image i taken from image 3 - i
            assert math.isclose(float(target[i, i]), 1 - float(pasted), abs_tol=1e-6)
            assert math.isclose(float(target[i, 3 - i]), float(pasted), abs_tol=1e-6)
        assert (mixed == x.flip(0)).all(dim=(0, 1)).float().mean() > 0  # a box really was pasted
    assert torch.equal(x, torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 20, 30))  # not mutated


def test_mixup_switching_probability_and_arguments() -> None:
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    off = Mixup(num_classes=2, prob=0.0, label_smoothing=0.2)
    mixed, target = off(x, y)
    assert torch.equal(mixed, x) and torch.allclose(target, smooth_one_hot(y, 2, 0.2))
    torch.manual_seed(3)
    a = Mixup(num_classes=2)(x, y)
    torch.manual_seed(3)
    b = Mixup(num_classes=2)(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="prob must be in \\[0, 1\\], got 2"):
        Mixup(num_classes=2, prob=2)
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        Mixup(num_classes=2, mixup_alpha=-1)
    with pytest.raises(TypeError, match="float images"):
        Mixup(num_classes=2)(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), y[:2])
