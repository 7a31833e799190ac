"""Each saliency method against a reference written here with explicit loops (float64, one image at a time).

The references read the attention maps from the model's own `return_attention` and take gradients with
`retain_grad` + `backward` per image, so they share nothing with vitkit.explain but the model.
"""

import math

import pytest
import torch

from tests.explain.conftest import PATCH, H, W, make_model
from vitkit.explain import (
    attention_map,
    attention_rollout,
    discard_lowest,
    explain,
    grad_rollout,
    mean_attention_distance,
    relevance_map,
)

GRID = (H // PATCH, W // PATCH)
TOL = dict(rtol=1e-4, atol=1e-6)  # float32 implementation vs float64 reference


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------
def ref_attentions(model, x):
    with torch.no_grad():
        _, attns = model(x, return_attention=True)
    return [a.double() for a in attns]


def ref_attentions_and_grads(model, x, targets):
    """Per image: attention maps and d(logit of its target)/d(attention), by retain_grad + backward."""
    attns, grads = [], []
    for b in range(x.shape[0]):
        model.zero_grad()
        logits, maps = model(x[b : b + 1], return_attention=True)
        for a in maps:
            a.retain_grad()
        logits[0, targets[b]].backward()
        attns.append([a.detach()[0].double() for a in maps])
        grads.append([a.grad[0].double() for a in maps])
    return attns, grads


def fuse(a, how):
    return {"mean": a.mean(0), "max": a.max(0).values, "min": a.min(0).values}[how]


def class_row(matrix, model):
    """The class token's row at the patch columns, or the mean of the patch rows for a class-token-free model."""
    P = model.num_prefix_tokens
    if model.cfg.class_token:
        row = matrix[0, P:]
    else:
        row = torch.stack([matrix[i, P:] for i in range(P, matrix.shape[0])]).mean(0)
    return row.reshape(GRID)


def ref_discard(f, ratio, has_cls):
    f = f.clone()
    N = f.shape[0]
    cand = [j for j in range(N) if not (has_cls and j == 0)]
    k = int(ratio * len(cand))
    for i in range(N):
        for j in sorted(cand, key=lambda j: f[i, j].item())[:k]:
            f[i, j] = 0.0
    return f


def ref_rollout_matrix(fused_per_layer, ratio, has_cls):
    N = fused_per_layer[0].shape[0]
    R = torch.eye(N, dtype=torch.float64)
    for f in fused_per_layer:
        f = ref_discard(f, ratio, has_cls)
        f = 0.5 * f + 0.5 * torch.eye(N, dtype=torch.float64)
        f = f / f.sum(dim=1, keepdim=True)
        R = torch.einsum("ij,jk->ik", f, R)
    return R


def predicted(model, x):
    with torch.no_grad():
        return model(x).argmax(-1).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer,head,fusion", [(-1, None, "mean"), (0, None, "max"), (1, 1, "mean"), (0, None, "min")])
def test_attention_matches_reference(model, images, layer, head, fusion):
    attns = ref_attentions(model, images)
    ref = []
    for b in range(3):
        a = attns[layer][b]
        ref.append(class_row(a[head] if head is not None else fuse(a, fusion), model))
    out = attention_map(model, images, layer=layer, head=head, head_fusion=fusion)
    assert out.shape == (3, *GRID)
    torch.testing.assert_close(out.double(), torch.stack(ref), **TOL)


@pytest.mark.parametrize("fusion,ratio", [("mean", 0.0), ("max", 0.5), ("min", 0.9)])
def test_rollout_matches_reference(model, images, fusion, ratio):
    attns = ref_attentions(model, images)
    ref = []
    for b in range(3):
        R = ref_rollout_matrix([fuse(a[b], fusion) for a in attns], ratio, model.cfg.class_token)
        ref.append(class_row(R, model))
    out = attention_rollout(model, images, head_fusion=fusion, discard_ratio=ratio)
    torch.testing.assert_close(out.double(), torch.stack(ref), **TOL)


@pytest.mark.parametrize("ratio", [0.0, 0.6])
def test_grad_rollout_matches_reference(model, images, ratio):
    targets = [4, 0, 2]
    attns, grads = ref_attentions_and_grads(model, images, targets)
    ref = []
    for b in range(3):
        fused = [(a * g).mean(0).clamp(min=0) for a, g in zip(attns[b], grads[b])]
        ref.append(class_row(ref_rollout_matrix(fused, ratio, model.cfg.class_token), model))
    out = grad_rollout(model, images, target=targets, discard_ratio=ratio)
    torch.testing.assert_close(out.double(), torch.stack(ref), **TOL)


def test_relevance_matches_reference(model, images):
    targets = predicted(model, images)
    attns, grads = ref_attentions_and_grads(model, images, targets)
    ref = []
    for b in range(3):
        N = attns[b][0].shape[-1]
        R = torch.eye(N, dtype=torch.float64)
        for a, g in zip(attns[b], grads[b]):
            cam = torch.stack([(g[h] * a[h]).clamp(min=0) for h in range(a.shape[0])]).mean(0)
            R = R + torch.einsum("ij,jk->ik", cam, R)
        ref.append(class_row(R, model))
    out = relevance_map(model, images)  # target defaults to the prediction
    torch.testing.assert_close(out.double(), torch.stack(ref), **TOL)


def test_relevance_target_changes_the_map(images):
    model = make_model("registers")
    a = relevance_map(model, images, target=0)
    b = relevance_map(model, images, target=3)
    assert not torch.allclose(a, b)


def test_mean_attention_distance_brute_force(model, images):
    attns = ref_attentions(model, images)
    P = model.num_prefix_tokens
    gh, gw = GRID
    n = gh * gw
    expected = torch.zeros(len(attns), model.cfg.num_heads, dtype=torch.float64)
    for li, a in enumerate(attns):
        for h in range(a.shape[1]):
            total = 0.0
            for b in range(a.shape[0]):
                for q in range(n):
                    weights = [a[b, h, P + q, P + k].item() for k in range(n)]
                    norm = sum(weights)
                    qr, qc = divmod(q, gw)
                    for k in range(n):
                        kr, kc = divmod(k, gw)
                        total += weights[k] / norm * PATCH * math.hypot(qr - kr, qc - kc)
            expected[li, h] = total / (a.shape[0] * n)
    out = mean_attention_distance(model, images)
    assert out.shape == (2, 2)
    torch.testing.assert_close(out.double(), expected, **TOL)


def test_uniform_attention_distance_is_the_mean_pairwise_distance():
    # A model whose attention is exactly uniform: zero q/k weights and biases.
    model = make_model("registers")
    for blk in model.blocks:
        torch.nn.init.zeros_(blk.attn.qkv.weight)
        torch.nn.init.zeros_(blk.attn.qkv.bias)
    out = mean_attention_distance(model, torch.randn(2, 3, H, W))
    gh, gw = GRID
    pts = [(r, c) for r in range(gh) for c in range(gw)]
    mean = sum(PATCH * math.dist(p, q) for p in pts for q in pts) / len(pts) ** 2
    torch.testing.assert_close(out, torch.full_like(out, mean), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher, upsampling, cost, side effects
# ----------------------------------------------------------------------------------------------------------------
def test_explain_dispatches_and_upsamples(images):
    model = make_model("registers")
    for method, direct in [
        ("attention", attention_map(model, images, layer=0, head=1)),
        ("rollout", attention_rollout(model, images, discard_ratio=0.3)),
        ("grad-rollout", grad_rollout(model, images, target=1)),
        ("relevance", relevance_map(model, images, target=1)),
    ]:
        small = explain(model, images, method=method, layer=0, head=1, discard_ratio=0.3, target=1, upsample=False)
        torch.testing.assert_close(small, direct)
        big = explain(model, images, method=method, layer=0, head=1, discard_ratio=0.3, target=1)
        assert big.shape == (3, H, W) and big.device == images.device and big.dtype == torch.float32
        up = torch.nn.functional.interpolate(small[:, None], size=(H, W), mode="bilinear", align_corners=False)
        torch.testing.assert_close(big, up[:, 0])
        assert not torch.equal(big[:, :PATCH, :PATCH].amax((1, 2)), big[:, :PATCH, :PATCH].amin((1, 2)))  # smooth


@pytest.mark.parametrize("method", ["attention", "rollout", "grad-rollout", "relevance"])
def test_one_forward_at_most_one_backward(method, images, monkeypatch):
    model = make_model("distilled")
    calls = {"forward": 0, "backward": 0}
    model.patch_embed.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    real_grad, real_backward = torch.autograd.grad, torch.Tensor.backward

    def counting(real):
        def wrapper(*args, **kwargs):
            calls["backward"] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.autograd, "grad", counting(real_grad))
    monkeypatch.setattr(torch.Tensor, "backward", counting(real_backward))
    explain(model, images, method=method)
    assert calls["forward"] == 1
    assert calls["backward"] == (1 if method in ("grad-rollout", "relevance") else 0)


def test_leaves_model_state_alone(images):
    model = make_model("registers", drop_rate=0.5).train()
    a = relevance_map(model, images, target=2)
    b = relevance_map(model, images, target=2)
    torch.testing.assert_close(a, b)  # dropout was off while explaining
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_works_with_frozen_parameters(images):
    model = make_model("registers")
    model.requires_grad_(False)
    out = relevance_map(model, images)
    assert out.abs().sum() > 0


def test_discard_never_touches_the_class_column():
    a = torch.rand(2, 6, 6) + 1.0
    a[:, :, 0] = 0.01  # the class column is the smallest everywhere
    out = discard_lowest(a, 0.5)
    assert torch.equal(out[:, :, 0], a[:, :, 0])
    assert ((out[:, :, 1:] == 0).sum(-1) == int(0.5 * 5)).all()
    no_cls = discard_lowest(a, 0.5, protect=None)
    assert (no_cls[:, :, 0] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Errors name the bad value
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="gradcam2"), "method='gradcam2'.*'attention'"),
        (dict(method="attention", layer=2), "layer 2 is out of range.*2 blocks"),
        (dict(method="attention", layer=-3), "layer -3 is out of range"),
        (dict(method="attention", head=2), "head 2 is out of range for 2 heads"),
        (dict(method="rollout", discard_ratio=1.0), r"discard_ratio must be in \[0, 1\).*1.0"),
        (dict(method="grad-rollout", discard_ratio=-0.1), r"discard_ratio must be in \[0, 1\).*-0.1"),
        (dict(method="rollout", head_fusion="median"), "head_fusion='median'.*'mean'"),
        (dict(method="relevance", target=5), "target class 5 is out of range.*5 classes"),
        (dict(method="relevance", target=[0, 1]), "2 targets for a batch of 3"),
    ],
)
def test_errors(images, kwargs, match):
    model = make_model("registers")
    with pytest.raises(ValueError, match=match):
        explain(model, images, **kwargs)


def test_rejects_uint8_images():
    with pytest.raises(TypeError, match="normalise"):
        explain(make_model("registers"), torch.zeros(1, 3, H, W, dtype=torch.uint8))
