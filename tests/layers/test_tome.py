"""Token merging (vitkit.layers.tome): the merge maths, proportional attention, the model setting and agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.layers import Attention, Block
from vitkit.layers.tome import (
    _attend,
    _bipartite_matching,
    _merge,
    _merge_average,
    apply_tome,
    tome_block,
    tome_schedule,
)
from vitkit.models import create_model


def merge_reference(x, idx, prefix):
    """ToMe's sum-merge written out (the reference's gather/scatter form): [prefix, unmerged A, B + merged A]."""
    unm_idx, src_idx, dst_idx = idx
    pre, patches = x[:, :prefix], x[:, prefix:]
    src, dst = patches[:, ::2], patches[:, 1::2]
    B, na, c = src.shape
    r = src_idx.shape[1]
    unm = src.gather(dim=1, index=unm_idx.expand(B, na - r, c))
    src = src.gather(dim=1, index=src_idx.expand(B, r, c))
    return torch.cat([pre, unm, dst.scatter_reduce(1, dst_idx.expand(B, r, c), src, reduce="sum")], dim=1)


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(num_classes=5, embed_dim=32, depth=3, num_heads=4, img_size=32, patch_size=4)
    return create_model("vit_tiny_patch16_224", **{**args, **kw})


def test_r0_is_the_unmerged_model_exactly():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m.set_tome(0)
        assert m.tome_r == []
        assert torch.equal(m(x), ref)
        m.set_tome(4)
        merged = m(x)
        m.set_tome(0)
        assert torch.equal(m(x), ref)
    assert not torch.allclose(merged, ref)  # merging changed something: the setting is live


def test_token_counts_follow_the_schedule_and_cap_at_half_the_patches():
    m = tiny_vit().eval()  # 64 patches + class token
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m.set_tome(5)
        assert m.forward_features(x).shape == (2, 1 + 64 - 15, 32)
        m.set_tome([30, 30, 0])  # 64 -> 34 -> 17 (at most half of the patch tokens merge per block) -> 17
        assert m.forward_features(x).shape == (2, 1 + 17, 32)
        assert m(x).shape == (2, 5)


def test_prefix_only_last_block_is_not_used_with_merging():
    m = tiny_vit(reg_tokens=2).eval()
    m.set_tome(6)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert not m._last_block_reads_prefix_only()
        torch.testing.assert_close(m(x), m.forward_head(m.forward_features(x)), rtol=0, atol=0)


def test_weighted_merge_keeps_total_mass_and_size():
    # The merge is a size-weighted average: sum(size * x) and sum(size) are the same before and after.
    torch.manual_seed(1)
    B, prefix, n, c = 3, 2, 11, 6
    x = torch.randn(B, prefix + n, c)
    size = torch.randint(1, 4, (B, prefix + n)).float()
    idx = _bipartite_matching(torch.randn(B, prefix + n, 8), 4, prefix)
    merged_sum = _merge(x * size[..., None], idx, prefix)
    new_size = _merge(size[..., None], idx, prefix)[..., 0]
    assert merged_sum.shape == (B, prefix + n - 4, c)
    torch.testing.assert_close(merged_sum.sum(1), (x * size[..., None]).sum(1))
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    # Prefix rows are copied untouched.
    torch.testing.assert_close(merged_sum[:, :prefix], (x * size[..., None])[:, :prefix], rtol=0, atol=0)


@pytest.mark.parametrize(("prefix", "n", "r", "sized"), [(0, 12, 6, False), (1, 11, 4, True), (3, 9, 1, True)])
def test_average_merge_equals_the_weighted_sum_over_the_summed_size(prefix, n, r, sized):
    # The merges the blocks use against their definition: sum(size * x) / sum(size), with several
    # sources landing on one destination (few B tokens), an odd patch count and prefix tokens; gradients too.
    torch.manual_seed(4)
    B, c = 3, 5
    x = torch.randn(B, prefix + n, c, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 5, (B, prefix + n)).double() if sized else None
    metric = torch.randn(B, prefix + n, 4)
    metric[:, prefix + 1 :: 2] = metric[:, prefix + 1 : prefix + 2]  # every B token alike: sources pile up
    idx = _bipartite_matching(metric, r, prefix)
    w = torch.ones(B, prefix + n, dtype=torch.float64) if size is None else size
    want_size = merge_reference(w[..., None], idx, prefix)[..., 0]
    want = merge_reference(x * w[..., None], idx, prefix) / want_size[..., None]
    torch.testing.assert_close(_merge(x * w[..., None], idx, prefix), want * want_size[..., None])
    got, got_size = _merge_average(x, size, idx, prefix)
    assert got_size.dtype == torch.float32 and got.shape == (B, prefix + n - r, c)
    torch.testing.assert_close(got_size.double(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(want)
    (ga,) = torch.autograd.grad((got * g).sum(), x)
    (gb,) = torch.autograd.grad((want * g).sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)


def test_matching_merges_the_most_similar_pairs():
    # Patch tokens 0/1 and 4/5 are identical (A = even, B = odd); the others are orthogonal: r=2 merges exactly those.
    metric = torch.eye(8)[None]  # (1, 8, 8): 8 orthogonal tokens, the first is a prefix token
    metric[0, 2] = metric[0, 1]  # patch 1 (B) equals patch 0 (A)
    metric[0, 6] = metric[0, 5]  # patch 5 (B) equals patch 4 (A)
    unm_idx, src_idx, dst_idx = _bipartite_matching(metric, 2, prefix=1)
    assert sorted(src_idx.flatten().tolist()) == [0, 2]  # A tokens at patch 0 and patch 4
    assert sorted(dst_idx.flatten().tolist()) == [0, 2]  # B tokens at patch 1 and patch 5


def test_proportional_attention_equals_duplicated_keys():
    # A key of size s must weigh exactly as s identical keys (ToMe's proportional attention).
    torch.manual_seed(2)
    attn = Attention(16, 2).eval()
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    v = torch.randn(1, 2, 4, 8)
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    out = _attend(attn, q, k, v, size, None)
    rep = torch.tensor([0, 1, 1, 1, 2, 3, 3])
    ref = F.scaled_dot_product_attention(q, k[:, :, rep], v[:, :, rep])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_tome_block_protects_prefix_and_traces_sources():
    torch.manual_seed(3)
    blk = Block(16, 2).eval()
    B, prefix, n = 2, 3, 10
    x = torch.randn(B, prefix + n, 16)
    source = torch.eye(prefix + n).expand(B, -1, -1)
    out, size, src = tome_block(blk, x, None, source, 3, prefix)
    assert out.shape == (B, prefix + n - 3, 16)
    torch.testing.assert_close(size[:, :prefix], torch.ones(B, prefix))
    torch.testing.assert_close(src[:, :prefix], torch.eye(prefix + n)[:prefix].expand(B, -1, -1))
    torch.testing.assert_close(src.sum(-1), size)  # each merged token holds `size` originals
    torch.testing.assert_close(src.sum(1), torch.ones(B, prefix + n))  # every original is in exactly one token


def test_training_gradients_reach_every_parameter():
    m = tiny_vit(class_token=True, reg_tokens=1).train()
    m.set_tome(6)
    x = torch.randn(2, 3, 32, 32)
    F.cross_entropy(m(x), torch.tensor([0, 3])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in m.parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m = tiny_vit().train()
        m.set_tome(4)
        m.set_grad_checkpointing(ckpt)
        m(x).sum().backward()
        grads.append(m.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "vit_small_patch16_224_gap"])
def test_other_vits_of_the_registry(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=3, depth=2, img_size=64).eval()
    m.set_tome(3)
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape[1] == m.num_prefix_tokens + 16 - 6


def test_bad_settings_are_named():
    m = tiny_vit()
    with pytest.raises(ValueError, match="-1"):
        m.set_tome(-1)
    with pytest.raises(TypeError, match="'8'"):
        m.set_tome("8")
    with pytest.raises(ValueError, match="one r per block \\(3\\)"):
        m.set_tome([1, 2])
    with pytest.raises(ValueError, match="1.5"):
        tome_schedule([1, 1.5, 0], 3)
    with pytest.raises(ValueError, match="forward_intermediates"):
        m.set_tome(2)
        m.forward_intermediates(torch.randn(1, 3, 32, 32))


def test_other_attention_and_cnn_are_refused_by_name():
    m = tiny_vit(attn_layer="local", attn_args={"window": 4}) if _has_local() else None
    if m is not None:
        with pytest.raises(ValueError, match="attn_layer='local'"):
            m.set_tome(2)
    cnn = create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="ResNet"):
        apply_tome(cnn, 4)
    apply_tome(cnn, 0)  # off is allowed for any model (nothing to do)


def _has_local() -> bool:
    from vitkit.layers.create import _TABLE

    return "local" in _TABLE["attn"]


def test_refuses_a_replaced_attention_module():
    m = tiny_vit()
    m.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(ValueError, match="Identity"):
        m.set_tome(2)


def test_small_r_agrees_with_unmerged_on_held_out_digits():
    # A tiny ViT trained for ~10 s on sklearn's 8x8 digits (patch 2: a 4x4 grid of 16 patch tokens), then r=2 per
    # block (16 -> 12 patch tokens) against the same weights unmerged on 397 held-out digits.
    from vitkit.data.digits import load_digits_images

    torch.manual_seed(0)
    images, y = load_digits_images()
    x = (images.float() / 255.0 - 0.5) / 0.5  # (1797, 3, 8, 8)
    perm = torch.randperm(len(y))
    train, test = perm[:1400], perm[1400:]
    m = create_model(
        "vit_tiny_patch16_224", num_classes=10, embed_dim=64, depth=2, num_heads=4, img_size=8, patch_size=2
    )
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05)
    m.train()
    for _epoch in range(6):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 32):
            b = order[i : i + 32]
            loss = F.cross_entropy(m(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        ref = m(x[test]).argmax(1)
        m.set_tome(2)
        assert m.forward_features(x[test[:1]]).shape[1] == 1 + 12
        merged = m(x[test]).argmax(1)
    acc = (ref == y[test]).float().mean().item()
    agree = (ref == merged).float().mean().item()
    assert acc > 0.5, f"the tiny model did not learn digits (accuracy {acc:.3f}, chance 0.1)"
    assert agree >= 0.9, f"r=2 agrees with the unmerged model on {agree:.3f} of {len(test)} held-out digits"


@pytest.fixture
def saved_model(tmp_path):
    from PIL import Image

    from vitkit.data.shapes import SHAPE_CLASSES, make_shapes

    model = tiny_vit(num_classes=len(SHAPE_CLASSES))
    model.save_pretrained(tmp_path / "model")
    images, labels, _, _ = make_shapes(len(SHAPE_CLASSES), 32, 32, seed=0)
    paths = []
    for i in range(3):
        folder = tmp_path / "data" / SHAPE_CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i}.png")
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    return tmp_path / "model", paths


def test_cli_predict_and_eval_take_tome(saved_model, capsys):
    import json

    from vitkit.cli import main
    from vitkit.train.evaluate import predict

    model_dir, paths = saved_model
    assert main(["predict", "--checkpoint", str(model_dir), *map(str, paths), "--tome", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # The same numbers as the library with merging, and not those without: the flag reached the model.
    merged = predict(model_dir, paths, device="cpu", threads=None, tome=3)
    plain = predict(model_dir, paths, device="cpu", threads=None)
    assert [r["top"][0]["prob"] for r in out] == pytest.approx([r["top"][0]["prob"] for r in merged], abs=1e-6)
    assert [r["top"][0]["prob"] for r in out] != pytest.approx([r["top"][0]["prob"] for r in plain], abs=1e-6)
    data = str(paths[0].parent.parent)
    assert main(["eval", "--checkpoint", str(model_dir), "--data", data, "--split", "all", "--tome", "3"]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(model_dir), str(paths[0]), "--tome", "-2"]) != 0
    assert "r must be >= 0" in capsys.readouterr().err


def test_train_config_applies_tome():
    from vitkit.train.config import TrainConfig
    from vitkit.train.run import build_model

    cfg = TrainConfig(model="vit_nano_patch4_32", model_args={"depth": 2}, tome=3)
    assert build_model(cfg, 4, print).tome_r == [3, 3]
    with pytest.raises(ValueError, match="tome must be an int >= 0"):
        TrainConfig(tome=-1)
    with pytest.raises(ValueError, match="ResNet"):
        build_model(TrainConfig(model="resnet18", tome=2), 4, print)


def test_average_pooling_weights_merged_tokens_by_their_size():
    """With pool='avg' a merged token stands for `size` patches: the size-weighted mean (ToMe's reference) keeps
    the pooled features of a merged model close to the unmerged ones; the plain mean over merged tokens does not."""
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", num_classes=3, depth=3, class_token=False, pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        model.set_tome(8)
        feats, sizes = model._features(x)
        weighted = model.forward_head(feats, pre_logits=True, token_sizes=sizes)
        plain = model.forward_head(feats, pre_logits=True)
        logits = model(x)
    assert sizes is not None and sizes.shape == (2, feats.shape[1], 1) and float(sizes[0].sum()) == 64
    assert torch.allclose(logits, model.head(weighted))  # forward pools with the sizes
    assert (weighted - ref).norm() < (plain - ref).norm()
