"""JAX ViT / big_vision .npz checkpoints, checked against a forward pass written in numpy from the raw arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vitkit

D, HEADS, HD, HIDDEN, PATCH, IMG, DEPTH, CLASSES = 64, 4, 16, 128, 8, 32, 2, 5
GRID = IMG // PATCH
EPS = 1e-6  # flax LayerNorm default


def make_arrays(layout: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays with the names and shapes of a JAX checkpoint.

    layout: "vit" (original repository: class token, posembed_input, _1/_2/_3 sub-modules), "big_vision"
    (no class token, mean pooling, top-level pos_embedding, _0/_1/_0), or "big_vision_scanned" (the same with
    all blocks stacked along a leading axis, under a "params/" prefix).
    """
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def gain():
        return (1.0 + r(D)).astype(np.float32)

    original = layout == "vit"
    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if original else (
        "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")  # fmt: skip
    a = {"embedding/kernel": r(PATCH, PATCH, 3, D), "embedding/bias": r(D)}  # HWIO
    if original:
        a["cls"] = r(1, 1, D)
        a["Transformer/posembed_input/pos_embedding"] = r(1, 1 + GRID * GRID, D)
    else:
        a["pos_embedding"] = r(1, GRID * GRID, D)
    for i in range(DEPTH):
        bp = f"Transformer/encoderblock_{i}/"
        a[bp + "LayerNorm_0/scale"], a[bp + "LayerNorm_0/bias"] = gain(), r(D)
        for n in ("query", "key", "value"):
            a[f"{bp}{mha}/{n}/kernel"], a[f"{bp}{mha}/{n}/bias"] = r(D, HEADS, HD), r(HEADS, HD)
        a[f"{bp}{mha}/out/kernel"], a[f"{bp}{mha}/out/bias"] = r(HEADS, HD, D), r(D)
        a[f"{bp}{ln2}/scale"], a[f"{bp}{ln2}/bias"] = gain(), r(D)
        a[f"{bp}{mlp}/Dense_0/kernel"], a[f"{bp}{mlp}/Dense_0/bias"] = r(D, HIDDEN), r(HIDDEN)
        a[f"{bp}{mlp}/Dense_1/kernel"], a[f"{bp}{mlp}/Dense_1/bias"] = r(HIDDEN, D), r(D)
    a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"] = gain(), r(D)
    a["head/kernel"], a["head/bias"] = r(D, CLASSES, scale=1.0), r(CLASSES)
    if layout == "big_vision_scanned":
        blocks = [k for k in a if k.startswith("Transformer/encoderblock_0/")]
        for k in blocks:
            rest = k[len("Transformer/encoderblock_0/") :]
            a[f"Transformer/encoderblock/{rest}"] = np.stack([a.pop(f"Transformer/encoderblock_{i}/{rest}")
                                                             for i in range(DEPTH)])  # fmt: skip
        a = {f"params/{k}": v for k, v in a.items()}
    return a


# --- the reference: the ViT forward pass in float64 numpy, straight from the JAX arrays ----------------------
def layer_norm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * scale + bias


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def embed(a, img):
    """img (H, W, 3) -> tokens (N, D): each patch times the HWIO kernel, then class token and positions."""
    k = a["embedding/kernel"].astype(np.float64)
    tokens = []
    for gy in range(GRID):
        for gx in range(GRID):
            patch = img[gy * PATCH : (gy + 1) * PATCH, gx * PATCH : (gx + 1) * PATCH]  # (p, p, 3)
            tokens.append(np.einsum("hwc,hwcd->d", patch, k) + a["embedding/bias"])
    x = np.stack(tokens)  # (N, D), row-major over the grid
    if "cls" in a:
        x = np.concatenate([a["cls"].reshape(1, D), x])
        return x + a["Transformer/posembed_input/pos_embedding"][0]
    return x + a["pos_embedding"][0]


def block(a, i, x):
    bp = f"Transformer/encoderblock_{i}/"
    mha = next(f"{bp}{n}/" for n in ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
               if f"{bp}{n}/query/kernel" in a)  # fmt: skip
    ln2 = f"{bp}LayerNorm_2/" if f"{bp}LayerNorm_2/scale" in a else f"{bp}LayerNorm_1/"
    mlp = f"{bp}MlpBlock_3/" if f"{bp}MlpBlock_3/Dense_0/kernel" in a else f"{bp}MlpBlock_0/"
    y = layer_norm(x, a[bp + "LayerNorm_0/scale"], a[bp + "LayerNorm_0/bias"])
    q, k, v = (
        np.einsum("nd,dhe->hne", y, a[f"{mha}{n}/kernel"]) + a[f"{mha}{n}/bias"][:, None, :]
        for n in ("query", "key", "value")
    )  # fmt: skip  (heads, N, head_dim)
    logits = np.einsum("hne,hme->hnm", q, k) / math.sqrt(HD)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hnm,hme->hne", p, v)  # (heads, N, head_dim)
    x = x + np.einsum("hne,hed->nd", o, a[f"{mha}out/kernel"]) + a[f"{mha}out/bias"]
    y = layer_norm(x, a[ln2 + "scale"], a[ln2 + "bias"])
    h = gelu(y @ a[mlp + "Dense_0/kernel"] + a[mlp + "Dense_0/bias"])
    return x + h @ a[mlp + "Dense_1/kernel"] + a[mlp + "Dense_1/bias"]


def reference(a, img):
    """(tokens after block 0, logits), in float64."""
    a = {k.removeprefix("params/"): v.astype(np.float64) for k, v in a.items()}
    for k in [k for k in a if k.startswith("Transformer/encoderblock/")]:
        stacked = a.pop(k)
        for i in range(DEPTH):
            a[k.replace("encoderblock/", f"encoderblock_{i}/")] = stacked[i]
    x = embed(a, img)
    first = None
    for i in range(DEPTH):
        x = block(a, i, x)
        first = x if i == 0 else first
    x = layer_norm(x, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    pooled = x[0] if "cls" in a else x.mean(0)
    return first, pooled @ a["head/kernel"] + a["head/bias"]


@pytest.fixture
def img(astronaut):
    from PIL import Image

    small = np.asarray(Image.fromarray(astronaut).resize((IMG, IMG), Image.BILINEAR), dtype=np.float64)
    return small / 127.5 - 1.0  # mean = std = 0.5, (H, W, 3)


@pytest.mark.parametrize("layout", ["vit", "big_vision", "big_vision_scanned"])
def test_npz_matches_numpy_reference(layout, tmp_path, img, lines):
    arrays = make_arrays(layout)
    np.savez(tmp_path / "vit.npz", **arrays)
    model = vitkit.load_model(tmp_path / "vit.npz", log=lines).eval()

    assert model.cfg.num_heads == HEADS  # from the kernels: the embed_dim // 64 guess would say 1
    assert "num_heads=4 from the attention kernels" in lines.text()
    assert model.cfg.class_token == (layout == "vit")
    assert model.cfg.pool == ("token" if layout == "vit" else "avg") and not model.cfg.fc_norm
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.interpolation == "bilinear"

    first_ref, logits_ref = reference(arrays, img)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    with torch.no_grad():
        first = model.forward_intermediates(x, indices=[0])[0][0].double().numpy()  # (N, D)
        logits = model(x)[0].double().numpy()
    assert np.abs(first_ref).max() > 0.5  # the check is not trivially small
    np.testing.assert_allclose(first, first_ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(logits, logits_ref, atol=2e-5, rtol=0)


def test_pre_logits_is_refused(tmp_path):
    arrays = make_arrays("vit")
    arrays["pre_logits/kernel"], arrays["pre_logits/bias"] = np.zeros((D, D), np.float32), np.zeros(D, np.float32)
    np.savez(tmp_path / "vit.npz", **arrays)
    with pytest.raises(ValueError, match="pre-logits.*vitkit has no pre-logits layer"):
        vitkit.load_model(tmp_path / "vit.npz")


def test_unknown_arrays_are_listed(tmp_path):
    arrays = make_arrays("vit")
    arrays["Transformer/encoderblock_0/Extra_0/kernel"] = np.zeros((D, D), np.float32)
    np.savez(tmp_path / "vit.npz", **arrays)
    with pytest.raises(ValueError, match="no counterpart.*Extra_0/kernel"):
        vitkit.load_model(tmp_path / "vit.npz")


def test_class_token_without_position_gets_a_zero_row(tmp_path, lines):
    """big_vision 'tok' pooling: a class token added after the positions, so pos_embedding has no row for it.

    vitkit gives the class token a zero position, which is the same function (nothing is added to it)."""
    arrays = make_arrays("big_vision")
    arrays["cls"] = np.zeros((1, 1, D), np.float32)
    np.savez(tmp_path / "vit.npz", **arrays)
    with pytest.raises(ValueError, match="pass img_size="):  # 16 rows: 4x4 without a class row, or not square
        vitkit.load_model(tmp_path / "vit.npz")
    model = vitkit.load_model(tmp_path / "vit.npz", img_size=32, log=lines)
    assert "no_embed_class" in lines.text()
    pos = model.pos_embed.detach()
    assert torch.equal(pos[:, :1], torch.zeros(1, 1, D))
    npz_pos = [v for k, v in arrays.items() if k.endswith("pos_embedding")][0]
    torch.testing.assert_close(pos[:, 1:], torch.from_numpy(npz_pos).reshape(1, -1, D), rtol=0, atol=0)


def test_img_size_resamples_npz_positions(tmp_path, lines):
    np.savez(tmp_path / "vit.npz", **make_arrays("vit"))
    model = vitkit.load_model(tmp_path / "vit.npz", img_size=48, log=lines)
    assert model.pos_embed.shape == (1, 1 + 36, D)
    assert "resampled pos_embed from a 4x4 to a 6x6 grid" in lines.text()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 48, 48))).all()
