"""Relative position attention (`relpos`, `relpos_decomposed`) against biases built entry by entry in plain loops.

Tolerance: atol 1e-5 in float32 (outputs and maps are O(1); the fused kernel and the explicit softmax differ by
summation order only).
"""

import pytest
import torch
import torch.nn.functional as F

from vitkit.explain import explain
from vitkit.layers import DecomposedRelPosAttention, RelPosAttention
from vitkit.models import create_model
from vitkit.weights import load_model, save_pretrained

ATOL = 1e-5


def qkv(prefix, grid, heads=3, d=4, batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    return [torch.randn(batch, heads, n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def relpos_bias_loop(table, grid, prefix):
    """BEiT's bias, one (query, key) pair at a time: (heads, N, N)."""
    gh, gw = grid
    n_rel = (2 * gh - 1) * (2 * gw - 1)
    n = prefix + gh * gw
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if i < prefix and j < prefix:
                r = n_rel + 2
            elif i < prefix:
                r = n_rel
            elif j < prefix:
                r = n_rel + 1
            else:
                (hi, wi), (hj, wj) = divmod(i - prefix, gw), divmod(j - prefix, gw)
                r = (hi - hj + gh - 1) * (2 * gw - 1) + (wi - wj + gw - 1)
            row.append(table[r])
        rows.append(torch.stack(row))
    return torch.stack(rows).permute(2, 0, 1)  # (heads, N, N)


def decomposed_bias_loop(q, rh, rw, grid, prefix):
    """ViTDet's bias q_i . Rh[h_i - h_j] + q_i . Rw[w_i - w_j] for patch pairs, 0 where a prefix token is involved."""
    gh, gw = grid
    n = q.shape[2]
    bias = torch.zeros(q.shape[0], q.shape[1], n, n, dtype=q.dtype)
    for i in range(prefix, n):
        for j in range(prefix, n):
            (hi, wi), (hj, wj) = divmod(i - prefix, gw), divmod(j - prefix, gw)
            r = rh[hi - hj + gh - 1] + rw[wi - wj + gw - 1]  # (d,)
            bias[:, :, i, j] = q[:, :, i] @ r
    return bias


def reference(q, k, v, bias):
    attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(-1)
    return attn @ v, attn


def run_both_paths(layer, q, k, v, grid):
    """The fused output, then the captured output and map."""
    out = layer.attend(q, k, v, grid)
    maps = []
    layer.capture = lambda module, attn: maps.append(attn)
    try:
        captured = layer.attend(q, k, v, grid)
    finally:
        layer.capture = None
    return out, captured, maps[0]


@pytest.mark.parametrize("prefix", [1, 3])
@pytest.mark.parametrize("grid", [(5, 7), (4, 4)])
def test_relpos_matches_the_loop_built_bias_at_the_native_grid(prefix, grid):
    layer = RelPosAttention(12, num_heads=3, grid_size=list(grid))
    with torch.no_grad():
        layer.relative_position_bias_table.normal_()  # large enough that a wrong index shows
    q, k, v = qkv(prefix, grid)
    ref, ref_attn = reference(q, k, v, relpos_bias_loop(layer.relative_position_bias_table, grid, prefix))
    out, captured, attn = run_both_paths(layer, q, k, v, grid)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(captured, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(attn, ref_attn, atol=ATOL, rtol=0)
    # The bias matters: plain attention is far from it.
    assert (F.scaled_dot_product_attention(q, k, v) - ref).abs().max() > 0.1


def test_relpos_gradients_match_the_oracle():
    grid, prefix = (3, 5), 2
    layer = RelPosAttention(12, num_heads=3, grid_size=grid)
    with torch.no_grad():
        layer.relative_position_bias_table.normal_()
    q, k, v = qkv(prefix, grid)
    g = torch.randn(2, 3, prefix + 15, 4)
    grads = torch.autograd.grad((layer.attend(q, k, v, grid) * g).sum(), [q, k, v, layer.relative_position_bias_table])
    ref, _ = reference(q, k, v, relpos_bias_loop(layer.relative_position_bias_table, grid, prefix))
    ref_grads = torch.autograd.grad((ref * g).sum(), [q, k, v, layer.relative_position_bias_table])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert ref_grads[3][:-3].abs().sum() > 0 and ref_grads[3][-3:].abs().sum() > 0  # table rows and prefix entries


def test_relpos_resamples_the_table_bicubically_for_another_grid():
    native, grid, prefix = (5, 7), (4, 9), 1
    layer = RelPosAttention(12, num_heads=3, grid_size=native)
    with torch.no_grad():
        layer.relative_position_bias_table.normal_()
    table = layer.relative_position_bias_table
    rel = table[:-3].T.reshape(1, 3, 9, 13)
    resized = F.interpolate(rel, size=(7, 17), mode="bicubic", align_corners=False).reshape(3, -1).T
    want_table = torch.cat([resized, table[-3:]])
    q, k, v = qkv(prefix, grid)
    ref, _ = reference(q, k, v, relpos_bias_loop(want_table, grid, prefix))
    torch.testing.assert_close(layer.attend(q, k, v, grid), ref, atol=ATOL, rtol=0)
    # The zero offset stays the centre of the resampled table: a table that is one value per head resamples to it.
    with torch.no_grad():
        table.copy_(torch.arange(3.0).expand(table.shape[0], 3))
    assert torch.allclose(layer.table_for(grid), torch.arange(3.0).expand(7 * 17 + 3, 3), atol=1e-6)


@pytest.mark.parametrize("prefix", [1, 3])
@pytest.mark.parametrize("grid", [(5, 7), (3, 3)])
def test_decomposed_matches_the_loop_built_bias(prefix, grid):
    layer = DecomposedRelPosAttention(12, num_heads=3, grid_size=(5, 7))
    with torch.no_grad():
        layer.rel_pos_h.normal_()
        layer.rel_pos_w.normal_()
    rh, rw = layer.rel_pos_h, layer.rel_pos_w
    if grid != (5, 7):  # ViTDet's linear interpolation of each axis' table to 2*size - 1 rows
        rh = F.interpolate(rh.T[None], size=2 * grid[0] - 1, mode="linear")[0].T
        rw = F.interpolate(rw.T[None], size=2 * grid[1] - 1, mode="linear")[0].T
    q, k, v = qkv(prefix, grid)
    ref, ref_attn = reference(q, k, v, decomposed_bias_loop(q, rh, rw, grid, prefix))
    out, captured, attn = run_both_paths(layer, q, k, v, grid)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(captured, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(attn, ref_attn, atol=ATOL, rtol=0)
    assert (F.scaled_dot_product_attention(q, k, v) - ref).abs().max() > 0.1


def test_decomposed_gradcheck_float64():
    grid, prefix = (2, 3), 1
    layer = DecomposedRelPosAttention(4, num_heads=2, grid_size=(3, 2)).double()  # not native: interpolation too
    q, k, v = qkv(prefix, grid, heads=2, d=2, batch=1, dtype=torch.float64)

    rh = layer.rel_pos_h.detach().clone().normal_().requires_grad_()
    rw = layer.rel_pos_w.detach().clone().normal_().requires_grad_()

    def attend(q, k, v, rh, rw):
        return DecomposedRelPosAttention.attend(_Tables(layer, rh, rw), q, k, v, grid)

    assert torch.autograd.gradcheck(attend, (q, k, v, rh, rw))


class _Tables:
    """`layer` with its tables replaced by plain tensors, so gradcheck can differentiate with respect to them."""

    def __init__(self, layer, rh, rw):
        self._layer, self.rel_pos_h, self.rel_pos_w = layer, rh, rw

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def position_bias(self, q, grid):
        return DecomposedRelPosAttention.position_bias(self, q, grid)


# Decomposed positions give prefix queries no bias, so with class-token pooling the last block's tables get no
# gradient (correctly); mean pooling makes every table reach the loss.
@pytest.mark.parametrize(
    ("name", "args", "pool"),
    [("relpos", {"grid_size": 8}, "token"), ("relpos_decomposed", {"grid_size": [8, 8]}, "avg")],
)
def test_tiny_vit_runs_at_two_sizes_trains_and_round_trips(name, args, pool, tmp_path):
    torch.manual_seed(0)
    model = create_model(
        "vit_nano_patch4_32", attn_layer=name, attn_args=args, num_classes=3, reg_tokens=1, pool=pool, depth=2
    )
    for size in [(32, 32), (24, 40)]:
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        out.square().sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []
        model.zero_grad()
        n = 2 + (size[0] // 4) * (size[1] // 4)
        logits, maps = model.eval()(x, return_attention=True)
        model.train()
        assert [m.shape for m in maps] == [(2, model.blocks[0].attn.num_heads, n, n)] * len(model.blocks)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, maps[0].shape[1], n))
    model.eval()
    # Relevance needs gradients through the captured maps: they must be the probabilities the layer used.
    relevance = explain(model, torch.randn(1, 3, 24, 40), method="relevance", upsample=False)
    assert relevance.shape == (1, 6, 10) and torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    save_pretrained(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert type(loaded.blocks[0].attn) is type(model.blocks[0].attn)
    assert loaded.cfg.attn_args == model.cfg.attn_args
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("cls", [RelPosAttention, DecomposedRelPosAttention])
@pytest.mark.parametrize("bad", [0, -3, 2.5, "14", [14], [14, 0], True])
def test_bad_grid_size_is_named(cls, bad):
    with pytest.raises(ValueError, match=rf"grid_size={bad!r}".replace("[", r"\[").replace("]", r"\]")):
        cls(12, 3, grid_size=bad)


def test_missing_grid_is_refused_by_name():
    layer = RelPosAttention(12, 3, grid_size=4)
    q, k, v = qkv(1, (4, 4))
    with pytest.raises(ValueError, match="attn_layer='relpos' .* needs grid"):
        layer.attend(q, k, v, None)
    with pytest.raises(ValueError, match="attn_layer='relpos_decomposed' .* needs grid"):
        DecomposedRelPosAttention(12, 3, grid_size=4).attend(q, k, v, None)


@pytest.mark.parametrize("name", ["relpos", "relpos_decomposed"])
def test_vit_sizes_the_tables_for_its_own_grid_unless_told(name):
    model = create_model("vit_nano_patch4_32", num_classes=3, depth=1, attn_layer=name)  # 32 px / 4 -> 8 x 8
    assert model.blocks[0].attn.grid_size == (8, 8)
    assert model.cfg.attn_args == {"grid_size": [8, 8]}  # stored, so a load at another img_size keeps the tables
    told = create_model("vit_nano_patch4_32", num_classes=3, depth=1, attn_layer=name, attn_args={"grid_size": 14})
    assert told.blocks[0].attn.grid_size == (14, 14)
    wide = create_model("vit_nano_patch4_32", num_classes=3, depth=1, attn_layer=name, img_size=(16, 40))
    assert wide.blocks[0].attn.grid_size == (4, 10)


@pytest.mark.parametrize("name", ["relpos", "relpos_decomposed"])
def test_saved_variant_loads_at_another_image_size(name, tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", num_classes=3, depth=1, attn_layer=name).eval()
    save_pretrained(model, tmp_path / "m")
    bigger = load_model(tmp_path / "m", img_size=48).eval()  # 12 x 12 grid; the tables stay 8 x 8 and resample
    assert bigger.blocks[0].attn.grid_size == (8, 8)
    with torch.no_grad():
        assert torch.equal(model(torch.ones(1, 3, 32, 32)), load_model(tmp_path / "m").eval()(torch.ones(1, 3, 32, 32)))
        assert bigger(torch.randn(2, 3, 48, 48)).shape == (2, 3)


def test_relative_position_tables_are_not_weight_decayed():
    for name, tables in (
        ("relpos", {"relative_position_bias_table"}),
        ("relpos_decomposed", {"rel_pos_h", "rel_pos_w"}),
    ):
        model = create_model("vit_nano_patch4_32", depth=2, attn_layer=name)
        skipped = {n.rsplit(".", 1)[-1] for n in model.no_weight_decay() if n.startswith("blocks.")}
        assert skipped == tables
