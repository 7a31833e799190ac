"""Parameter groups, the LR schedule, layer decay and freezing."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.conftest import tiny_model
from vitkit.train import WarmupCosine, freeze_backbone, param_groups, setup_optimizer_groups


def _group_of(groups, name):
    return next(g for g in groups if name in g["param_names"])


def test_no_weight_decay_on_norms_biases_pos_embed_and_tokens():
    model = tiny_model(reg_tokens=2)
    groups = param_groups(model, weight_decay=0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert {
        "pos_embed",
        "cls_token",
        "reg_token",
        "patch_embed.proj.bias",
        "blocks.0.norm1.weight",
        "blocks.0.norm1.bias",
        "blocks.1.attn.qkv.bias",
        "norm.weight",
        "head.bias",
    } <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight"} <= decay
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}  # every parameter exactly once
    assert all(g["weight_decay"] in (0.0, 0.05) for g in groups)


def test_layer_decay_scales_and_head_multiplier():
    model = tiny_model()  # depth 2: layer ids 0 (embeddings), 1, 2 (blocks), 3 (head + final norm)
    groups = param_groups(model, 0.05, layer_decay=0.5, head_lr_mult=10.0)
    assert _group_of(groups, "pos_embed")["lr_scale"] == pytest.approx(0.5**3)
    assert _group_of(groups, "patch_embed.proj.weight")["lr_scale"] == pytest.approx(0.5**3)
    assert _group_of(groups, "blocks.0.attn.qkv.weight")["lr_scale"] == pytest.approx(0.5**2)
    assert _group_of(groups, "blocks.1.mlp.fc1.weight")["lr_scale"] == pytest.approx(0.5)
    assert _group_of(groups, "norm.weight")["lr_scale"] == pytest.approx(1.0)  # final norm: head's layer, no mult
    assert _group_of(groups, "head.weight")["lr_scale"] == pytest.approx(10.0)
    opt = setup_optimizer_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, head_lr_mult=10.0)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["head.weight"] == pytest.approx(1e-2)
    assert lrs["blocks.0.attn.qkv.weight"] == pytest.approx(2.5e-4)


def test_bad_optimizer_arguments_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="layer_decay must be in"):
        param_groups(model, 0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="lr must be > 0, got -1"):
        setup_optimizer_groups(model, lr=-1)


def test_warmup_cosine_values():
    s = WarmupCosine(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert s(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: 0.55
    assert s(110) == pytest.approx(0.1)
    assert s(10_000) == pytest.approx(0.1)  # clamped after the end
    values = s.values()
    assert len(values) == 110 and all(a >= b for a, b in zip(values[9:], values[10:]))  # monotone decay
    no_warmup = WarmupCosine(2.0, 4)
    assert [no_warmup(i) for i in range(4)] == pytest.approx(
        [2.0, 1.0 + math.cos(math.pi / 4), 1.0, 1.0 + math.cos(3 * math.pi / 4)]
    )


def test_schedule_applies_group_scales():
    model = tiny_model()
    opt = setup_optimizer_groups(model, lr=1.0, weight_decay=0.0, layer_decay=0.5)
    s = WarmupCosine(1.0, 100, warmup_steps=10)
    assert s.apply(opt, 4) == pytest.approx(0.5)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.5 * g["lr_scale"])


def test_freeze_backbone_freezes_embeddings_and_first_blocks():
    model = tiny_model(depth=3)
    n = freeze_backbone(model, freeze_layers=2)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    expected = {
        name
        for name, _ in model.named_parameters()
        if name.startswith(("patch_embed.", "pos_embed", "cls_token", "blocks.0.", "blocks.1."))
    }
    assert frozen == expected
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in expected)
    groups = param_groups(model, 0.05)  # frozen parameters are left out of the optimiser
    assert not any(name in frozen for g in groups for name in g["param_names"])
    model.zero_grad()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is None and model.blocks[2].attn.qkv.weight.grad is not None


def test_freeze_backbone_rejects_too_many_layers():
    with pytest.raises(ValueError, match=r"freeze_layers=5 must be an integer in 0..2"):
        freeze_backbone(tiny_model(), freeze_layers=5)
