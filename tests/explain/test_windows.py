"""Swin window attention on the stage grid, against a direct per-token computation from the block's parameters."""

import pytest
import torch

from vitkit.explain import explain
from vitkit.explain.windows import window_blocks
from vitkit.models.swin import MASK_VALUE, SwinConfig, SwinTransformer, window_and_shift

# 36 x 44 px with 4 px patches: stage 0 is 9 x 11 tokens (padded to 9 x 12 for 3 x 3 windows, shifted by 1 in its
# second block), stage 1 is 5 x 6 (padded to 6 x 6, shifted): padding, shifts and a non-square grid in every map.
H, W = 36, 44


def _tiny() -> SwinTransformer:
    torch.manual_seed(0)
    cfg = SwinConfig(img_size=(H, W), embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=3, num_classes=3)
    model = SwinTransformer(cfg).eval()
    for blk in window_blocks(model):  # distinct rows: near-uniform attention would hide a misplaced token
        torch.nn.init.normal_(blk.attn.qkv.weight, std=0.5)
        torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=1.0)
    return model


@torch.no_grad()
def _direct(model: SwinTransformer, x: torch.Tensor, block: int) -> torch.Tensor:
    """Per query token: its window in rolled coordinates, scores q.k / sqrt(d) + bias[offset] + region mask over
    that window's tokens (padding tokens are zero after the norm), softmax; then the mean over the real queries
    of what each real key receives, heads averaged. Loops over tokens; no window_partition, reverse or roll."""
    blk = window_blocks(model)[block]
    seen = {}
    hook = blk.norm1.register_forward_hook(lambda m, i, out: seen.setdefault("y", out))
    model(x)
    hook.remove()
    y = seen["y"]  # (B, Hs, Ws, C)
    B, Hs, Ws, C = y.shape
    w, s = window_and_shift(Hs, Ws, blk.window_size, blk.shift_size)
    Hp, Wp = -(-Hs // w) * w, -(-Ws // w) * w
    padded = torch.zeros(B, Hp, Wp, C)
    padded[:, :Hs, :Ws] = y
    attn = blk.attn
    heads, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(padded).reshape(B, Hp, Wp, 3, heads, d)
    q, k = qkv[..., 0, :, :], qkv[..., 1, :, :]  # (B, Hp, Wp, heads, d)
    table = attn.relative_position_bias_table  # ((2 * window - 1)^2, heads), window = the configured one

    def rolled(r, c):  # where token (r, c) sits after the block's cyclic shift by -s
        return (r - s) % Hp, (c - s) % Wp

    def region(rr, cc):  # the shift mask's bands, in rolled coordinates
        band = lambda v, n: int(v >= n - w) + int(v >= n - s) if s else 0  # noqa: E731
        return band(rr, Hp), band(cc, Wp)

    out = torch.zeros(B, Hs, Ws)
    tokens = [(r, c) for r in range(Hp) for c in range(Wp)]
    for qr, qc in [(r, c) for r in range(Hs) for c in range(Ws)]:
        qrr, qcc = rolled(qr, qc)
        keys = [(r, c) for r, c in tokens if rolled(r, c)[0] // w == qrr // w and rolled(r, c)[1] // w == qcc // w]
        scores = []
        for kr, kc in keys:
            krr, kcc = rolled(kr, kc)
            dr, dc = qrr - krr + blk.window_size - 1, qcc - kcc + blk.window_size - 1
            bias = table[dr * (2 * blk.window_size - 1) + dc]  # (heads,)
            mask = 0.0 if region(qrr, qcc) == region(krr, kcc) else MASK_VALUE
            scores.append((q[:, qr, qc] * k[:, kr, kc]).sum(-1) * d**-0.5 + bias + mask)  # (B, heads)
        probs = torch.stack(scores, dim=-1).softmax(dim=-1).mean(dim=1)  # (B, keys), heads averaged
        for (kr, kc), p in zip(keys, probs.unbind(-1), strict=True):
            if kr < Hs and kc < Ws:
                out[:, kr, kc] += p
    return out / (Hs * Ws)


@pytest.mark.parametrize("block", [0, 1, 2, 3])
def test_window_attention_matches_direct_computation(block):
    model = _tiny()
    x = torch.randn(2, 3, H, W)
    got = explain(model, x, method="attention", layer=block, upsample=False)
    expected = _direct(model, x, block)
    assert got.shape == ((2, 9, 11) if block < 2 else (2, 5, 6))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert float(expected.std()) > 1e-3  # the maps are not flat, so a misplaced token would show


def test_window_attention_heads_layers_and_upsampling():
    model = _tiny()
    x = torch.randn(1, 3, H, W)
    per_head = torch.stack([explain(model, x, method="attention", layer=-1, head=h, upsample=False) for h in range(4)])
    mean = explain(model, x, method="attention", layer=-1, upsample=False)
    torch.testing.assert_close(per_head.mean(dim=0), mean, atol=1e-6, rtol=1e-5)  # the map is linear in the heads
    assert explain(model, x, method="attention", layer=3).shape == (1, H, W)
    with pytest.raises(ValueError, match="head 4 is out of range for 4 heads"):
        explain(model, x, method="attention", layer=3, head=4)
    with pytest.raises(ValueError, match="layer 4 is out of range for a model with 4 blocks"):
        explain(model, x, method="attention", layer=4)
    # The capture slot is closed again: a plain forward equals the fused path's output.
    assert all(blk.attn.capture is None for blk in window_blocks(model))


def test_explicit_capture_path_gives_the_fused_output():
    model = _tiny()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        fused = model(x)
        for blk in window_blocks(model):
            blk.attn.capture = lambda m, a: None
        explicit = model(x)
        for blk in window_blocks(model):
            blk.attn.capture = None
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["rollout", "flow", "grad-rollout", "relevance"])
def test_products_across_blocks_are_refused_by_name(method):
    model = _tiny()
    with pytest.raises(ValueError, match=r"need global self-attention; SwinTransformer has none \(family swin: "
                       r"windowed attention.*not defined across patch merging.*method='attention'"):  # fmt: skip
        explain(model, torch.randn(1, 3, H, W), method=method)


def test_gradcam_reads_a_swin_stage_run_block_by_block():
    """feature_info names `layers.i`, a stage the model runs block by block: Grad-CAM hooks its last block."""
    model = _tiny()
    cam = explain(model, torch.randn(2, 3, H, W), method="gradcam", layer=0, upsample=False)
    assert cam.shape == (2, 9, 11) and float(cam.max()) > 0


def test_cli_swin_attention_and_refused_rollout(tmp_path, capsys):
    from PIL import Image

    from vitkit.cli import main

    _tiny().save_pretrained(tmp_path / "model")
    Image.fromarray(torch.randint(0, 255, (40, 50, 3), dtype=torch.uint8).numpy()).save(tmp_path / "a.png")
    args = ["explain", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "model")]
    assert main([*args, "--method", "attention", "--layer", "1", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "a_attention.png").stat().st_size > 2000
    assert main([*args, "--method", "rollout", "--out", str(tmp_path / "r")]) == 2
    assert "not defined across patch merging" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
