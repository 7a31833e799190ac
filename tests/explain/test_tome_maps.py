"""Explanations of a model with token merging: captured maps are unmerged back to the original tokens."""

from __future__ import annotations

import pytest
import torch

from tests.explain.conftest import PATCH, H, W, make_model
from vitkit.explain import explain
from vitkit.explain.maps import forward_with_attention
from vitkit.layers.tome import unmerge_attention

GRID = (H // PATCH, W // PATCH)  # (4, 6): 24 patch tokens


def test_r0_maps_are_the_unmerged_maps(model, images):
    ref = [explain(model, images, method=m, upsample=False) for m in ("attention", "rollout", "relevance")]
    model.set_tome(0)
    for m, r in zip(("attention", "rollout", "relevance"), ref):
        torch.testing.assert_close(explain(model, images, method=m, upsample=False), r, rtol=0, atol=0)


def test_merging_after_the_last_attention_leaves_every_map_exact(layout, images):
    # Merging happens after a block's attention: with r only in the last block no map sees a merged token, so the
    # traced path (source matrix = identity, unmerged through S^T A S) must reproduce the plain maps.
    model = make_model(layout, depth=3)
    _, ref, _, _ = forward_with_attention(model, images)
    model.set_tome([0, 0, 5])
    _, maps, _, _ = forward_with_attention(model, images)
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_merged_maps_are_full_size_row_stochastic_and_give_grid_saliency(layout, images):
    model = make_model(layout, depth=3)
    n = model.num_prefix_tokens + GRID[0] * GRID[1]
    model.set_tome(4)  # 24 -> 20 -> 16 patch tokens before the attention of blocks 1 and 2
    logits, maps, grads, _ = forward_with_attention(model, images, need_grads=True)
    for a, g in zip(maps, grads):
        assert a.shape == g.shape == (3, 2, n, n)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, n))
    # Block 0 attends before any merge, so its map is the unmerged model's.
    model.set_tome(0)
    _, ref, _, _ = forward_with_attention(model, images, layers=[0])
    torch.testing.assert_close(maps[0], ref[0], rtol=1e-5, atol=1e-6)
    model.set_tome(4)
    # The later maps are of merged tokens: the sources of one merged key share its weight equally, so some
    # rows of block 2 must hold repeated (equal, non-zero) key weights.
    assert not torch.allclose(maps[2], ref[0])
    for method in ("attention", "rollout", "grad-rollout", "relevance"):
        sal = explain(model, images, method=method, upsample=False)
        assert sal.shape == (3, *GRID) and torch.isfinite(sal).all(), method
    # The explicit (captured, unmerged) path computes the same logits as the fused merged path.
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits, rtol=1e-4, atol=1e-5)


def test_unmerge_copies_queries_and_splits_keys_equally():
    # Merged tokens: 0 = {0}, 1 = {1, 3}, 2 = {2}; a map over the 3 merged tokens -> over the 4 originals.
    source = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]])  # (1, 3, 4)
    size = source.sum(-1)
    attn = torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]]])[:, None]  # (1, 1, 3, 3)
    full = unmerge_attention(attn, source, size)[0, 0]
    expected = torch.tensor(
        [
            [0.2, 0.25, 0.3, 0.25],
            [0.1, 0.30, 0.3, 0.30],
            [0.4, 0.20, 0.2, 0.20],
            [0.1, 0.30, 0.3, 0.30],  # original token 3 is in merged token 1: the row of token 1
        ]
    )
    torch.testing.assert_close(full, expected)


def test_gradcam_refuses_with_merging_by_name(images):
    model = make_model("registers")
    model.set_tome(2)
    with pytest.raises(ValueError, match="set_tome\\(0\\)"):
        explain(model, images, method="gradcam")


def test_cli_explain_with_tome_writes_overlays(tmp_path):
    import numpy as np
    from PIL import Image

    from vitkit.cli import main

    model = make_model("registers", depth=3)
    model.save_pretrained(tmp_path / "model")
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(path)
    args = ["explain", str(path), "--checkpoint", str(tmp_path / "model"), "--method", "rollout", "--tome", "3"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
