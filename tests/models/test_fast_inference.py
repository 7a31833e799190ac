"""The inference paths of ResNet, ConvNeXt and Swin (eval mode, no autograd): exact against the plain path, caches
invalidated by every change of the weights, no visible state, training and gradients untouched."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from vitkit.models import ConvNeXt, ResNet, SwinConfig, SwinTransformer
from vitkit.models.swin import shifted_window_index, window_partition


# ----------------------------------------------------------------------------------------------------------------
# ResNet: BatchNorm folded into the convolutions, channels-last maps
# ----------------------------------------------------------------------------------------------------------------
def _resnet(block: str = "bottleneck") -> ResNet:
    torch.manual_seed(0)
    model = ResNet(block=block, depths=(1, 2), widths=(8, 16), stem_width=8, num_classes=5)
    with torch.no_grad():  # BN statistics and affines far from identity, so a stale fold shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output through its plain path (autograd on, which the inference paths never take)."""
    with torch.enable_grad():
        return model(x).detach()


def _fast(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _folds(model: nn.Module) -> list:
    return [m.__dict__.get("_folded") for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_folded_inference_matches_the_unfolded_model(block):
    model = _resnet(block)
    x = torch.randn(2, 3, 45, 38)
    ref, out = _plain(model, x), _fast(model, x)
    assert all(f is not None for f in _folds(model)), "every BatchNorm was folded on the inference path"
    # Folding rounds differently from conv then BN: about 1e-6 of the logits' magnitude in fp32.
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with torch.no_grad():
        feats, (mid,) = model.forward_features(x), model.forward_intermediates(x, indices=[0])
    assert feats.is_contiguous() and mid.is_contiguous(), "channels-last stays inside the model"


def test_resnet_fold_is_rebuilt_after_every_kind_of_weight_change():
    model = _resnet()
    x = torch.randn(2, 3, 40, 40)
    _fast(model, x)
    bn = model.layer1[0].bn2
    before = bn.__dict__["_folded"][2]

    with torch.no_grad():  # an in-place change (optimiser steps and init functions look like this)
        model.layer1[0].conv2.weight.mul_(-1.5)
        model.layer2[1].bn1.running_var.mul_(3.0)
    ref = _plain(model, x)
    assert (_fast(model, x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert not torch.equal(bn.__dict__["_folded"][2], before)

    other = _resnet()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    model.load_state_dict(other.state_dict())  # copy_ into the same tensors
    ref = _plain(other, x)
    assert (_fast(model, x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()

    model.train()  # a training step moves the running statistics in place
    model(torch.randn(4, 3, 40, 40))
    model.eval()
    ref = _plain(model, x)
    assert (_fast(model, x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()

    model.to(torch.float64)  # new tensors (a dtype change) replace the old
    out = _fast(model, x.double())
    assert out.dtype == torch.float64
    ref = _plain(model, x.double())
    assert (out - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()

    model.layer1[0].bn1.weight = nn.Parameter(torch.full_like(model.layer1[0].bn1.weight, 3.0))  # reassignment
    ref = _plain(model, x.double())
    assert (_fast(model, x.double()) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_resnet_fold_sees_writes_through_data():
    """`.data` writes bypass version counters (research code adds noise or prunes this way): value fingerprints
    (BatchNorm tensors, every 97th convolution weight) catch them."""
    model = _resnet()
    x = torch.randn(2, 3, 40, 40)
    _fast(model, x)
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.add_(torch.randn(m.weight.shape, generator=g) * 0.1)
    ref = _plain(model, x)
    assert (_fast(model, x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    model.layer2[0].bn1.running_mean.data.add_(1.0)
    ref = _plain(model, x)
    assert (_fast(model, x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_resnet_weights_made_in_inference_mode_run_unfolded():
    model = _resnet()
    x = torch.randn(2, 3, 40, 40)
    with torch.inference_mode():
        model.to(torch.float64)  # inference tensors: no version counter to validate a fold against
        out = model(x.double())
        model.layer1[0].conv1.weight.mul_(2.0)  # allowed on inference tensors, invisible to a version check
        again = model(x.double())
    assert all(f is None for f in _folds(model))
    assert not torch.equal(out, again)


def test_resnet_fold_leaves_state_dict_training_and_gradients_alone():
    model = _resnet()
    keys = list(model.state_dict())
    fresh = copy.deepcopy(model)  # made before any fold exists
    x = torch.randn(3, 3, 33, 33)
    _fast(model, x)
    assert list(model.state_dict()) == keys
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert set(torch.load(io.BytesIO(buf.getvalue()))) == set(keys)

    # Eval with autograd (Grad-CAM, input attributions): the plain path, gradients as without any fold.
    grads = []
    for m in (model, fresh):
        xi = x.clone().requires_grad_(True)
        m(xi).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])

    # Training: the same losses, gradients and running statistics as the model that never folded.
    for m in (model, fresh):
        m.zero_grad()
        m.train()
        m(x).logsumexp(1).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), fresh.buffers()):
        assert torch.equal(b, c), name


# ----------------------------------------------------------------------------------------------------------------
# ConvNeXt: channels-last maps on the inference path
# ----------------------------------------------------------------------------------------------------------------
def test_convnext_channels_last_inference_matches_and_returns_contiguous_maps():
    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1), dims=(8, 16), num_classes=4, ls_init_value=0.5).eval()
    x = torch.randn(2, 3, 50, 37)
    ref = _plain(model, x)
    assert (_fast(model, x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with torch.no_grad():
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x)
    with torch.enable_grad():
        ref_feats = model.forward_features(x).detach()
    assert feats.is_contiguous() and all(m.is_contiguous() for m in maps)
    assert feats.shape == ref_feats.shape and (feats - ref_feats).abs().max().item() <= 1e-5 * ref_feats.abs().max()


def test_convnext_low_precision_depthwise_convolution_runs_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1), dims=(8, 16), num_classes=4, ls_init_value=0.5).eval().to(torch.bfloat16)
    block = model.stages[0].blocks[0]
    x = torch.randn(2, 8, 12, 12).to(torch.bfloat16)
    conv = block.conv_dw
    want = torch.nn.functional.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=3, groups=8)
    with torch.no_grad():
        got = block._depthwise(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    native = conv(x).detach()  # autograd on: PyTorch's own bf16 kernel
    assert (got.float() - native.float()).abs().max().item() <= 2**-7 * native.float().abs().max().item()
    images = torch.randn(2, 3, 64, 64).to(torch.bfloat16)
    ref = _plain(model, images).float()
    assert (_fast(model, images).float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Swin: cached attention bias + shift mask, roll and partition as one gather
# ----------------------------------------------------------------------------------------------------------------
def _swin() -> SwinTransformer:
    torch.manual_seed(0)
    cfg = SwinConfig(img_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5)
    model = SwinTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()  # a bias that matters
    return model


def _swin_plain(model: SwinTransformer, x: torch.Tensor) -> torch.Tensor:
    """The per-call path (autograd on) with no parameter requiring grad, so SDPA picks the kernel it picks at
    inference: the two paths then differ only by the caches, and must agree bit for bit."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        return _plain(model, x)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _cache_entries(model: SwinTransformer) -> int:
    return sum(len(blk._geometry) for stage in model.layers for blk in stage.blocks)


def test_shifted_window_index_is_roll_then_partition():
    x = torch.randn(2, 8, 12, 3)
    for window, shift in ((4, 2), (4, 1), (2, 1)):
        want = window_partition(torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)), window)
        index = shifted_window_index(8, 12, window, shift, x.device)
        got = x.reshape(2, 96, 3).index_select(1, index).view(-1, window * window, 3)
        assert torch.equal(got, want)
        assert torch.equal(got.view(2, 96, 3).index_select(1, torch.argsort(index)).view_as(x), x)


@pytest.mark.parametrize("size", [(64, 64), (45, 70)])
def test_swin_cached_inference_is_bit_identical_to_the_per_call_path(size):
    model = _swin()
    x = torch.randn(2, 3, *size)
    ref = _swin_plain(model, x)
    assert _cache_entries(model) == 0, "the per-call path caches nothing"
    first, second = _fast(model, x), _fast(model, x)
    assert _cache_entries(model) > 0
    assert torch.equal(first, ref) and torch.equal(second, ref)


def test_swin_cache_follows_every_change_of_the_bias_table():
    model = _swin()
    x = torch.randn(2, 3, 64, 64)
    _fast(model, x)
    table = model.layers[0].blocks[1].attn.relative_position_bias_table
    table.data.add_(1.0)  # a write through .data: no version bump, still seen
    assert torch.equal(_fast(model, x), _swin_plain(model, x))

    other = _swin()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.7)
    model.load_state_dict(other.state_dict())
    assert torch.equal(_fast(model, x), _swin_plain(other, x))

    model.to(torch.float64)
    out = _fast(model, x.double())
    assert out.dtype == torch.float64 and torch.equal(out, _swin_plain(model, x.double()))


def test_swin_cache_is_bounded_invisible_and_leaves_training_alone():
    model = _swin()
    keys = list(model.state_dict())
    fresh = copy.deepcopy(model)
    for side in range(40, 72, 4):  # many geometries: each block keeps only the most recent few
        _fast(model, torch.randn(1, 3, side, side))
    assert (
        max(len(b._geometry) for s in model.layers for b in s.blocks) <= model.layers[0].blocks[0].GEOMETRY_CACHE_SIZE
    )
    assert list(model.state_dict()) == keys

    x = torch.randn(2, 3, 64, 64)
    for m in (model, fresh):
        m.train()
        torch.manual_seed(1)
        m(x).logsumexp(1).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.grad, q.grad), name
