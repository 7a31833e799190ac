"""Attention flow (Abnar & Zuidema 2020): hand-computed max-flows, closed forms, the model path and the CLI."""

import pytest
import torch

from tests.explain.conftest import PATCH, H, W, make_model
from vitkit.cli import main
from vitkit.explain import explain, flow_from_attentions, forward_with_attention, rollout_from_attentions
from vitkit.explain.maps import FLOW_RESOLUTION, _residual_normalise

TOL = 1e-5  # (tokens + 1) * resolution / 2 for these sizes, with room for float32 rounding


def _as_maps(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]  # (B=1, heads=1, N, N)


def test_two_layers_three_tokens_hand_computed():
    """Tokens [class, p1, p2]. Every path from an input patch j is j -> k -> class through a distinct middle token
    k, so the paths share no edge and the max-flow is sum_k min(A1^[k, j], A2^[0, k]) (A^ = 0.5 A + 0.5 I)."""
    a1 = _as_maps([0.2, 0.4, 0.4], [0.6, 0.2, 0.2], [0.0, 0.8, 0.2])  # A1^ = [.6 .2 .2; .3 .6 .1; 0 .4 .6]
    a2 = _as_maps([0.0, 0.6, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0])  # A2^[0] = [.5 .3 .2]
    flow = flow_from_attentions([a1, a2], (1, 2), num_prefix_tokens=1)
    # p1: min(.2, .5) + min(.6, .3) + min(.4, .2) = .7;  p2: min(.2, .5) + min(.1, .3) + min(.6, .2) = .5
    torch.testing.assert_close(flow, torch.tensor([[[0.7, 0.5]]]), atol=TOL, rtol=0)
    # Rollout sums products along the same paths: .5*.2 + .3*.6 + .2*.4 = .36 and .5*.2 + .3*.1 + .2*.6 = .25.
    roll = rollout_from_attentions([a1, a2], (1, 2), num_prefix_tokens=1)
    torch.testing.assert_close(roll, torch.tensor([[[0.36, 0.25]]]), atol=1e-6, rtol=0)


def _random_attention(B, heads, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, heads, N, N, generator=g).mul(2).softmax(dim=-1)


@pytest.mark.parametrize("head_fusion", ["mean", "max"])
def test_one_layer_with_class_token_equals_the_edge_weight(head_fusion):
    """One layer: the only path from input j to the class token is the edge j -> class, so flow = A^[0, j],
    which is also one-layer rollout."""
    a = _random_attention(2, 3, 1 + 1 + 6)  # class, one register, a 2 x 3 grid
    flow = flow_from_attentions([a], (2, 3), num_prefix_tokens=2, head_fusion=head_fusion)
    roll = rollout_from_attentions([a], (2, 3), num_prefix_tokens=2, head_fusion=head_fusion)
    torch.testing.assert_close(flow, roll, atol=TOL, rtol=0)


def test_one_layer_pooled_equals_the_min_closed_form():
    """Without a class token the sink is fed by each output patch with capacity 1/n (its weight in the mean):
    input j reaches it through the disjoint paths j -> i -> sink, so flow = sum_i min(A^[i, j], 1/n)."""
    P, n = 1, 6
    a = _random_attention(2, 2, P + n)
    flow = flow_from_attentions([a], (2, 3), num_prefix_tokens=P, has_class_token=False)
    A = _residual_normalise(a.mean(dim=1))  # (B, N, N)
    expected = A[:, P:, P:].clamp(max=1 / n).sum(dim=1).reshape(2, 2, 3)
    torch.testing.assert_close(flow, expected, atol=TOL, rtol=0)


def test_resolution_rounds_capacities_and_is_checked():
    a1 = _as_maps([0.2, 0.4, 0.4], [0.6, 0.2, 0.2], [0.0, 0.8, 0.2])
    a2 = _as_maps([0.0, 0.6, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0])
    coarse = flow_from_attentions([a1, a2], (1, 2), 1, resolution=0.1)  # every weight is a multiple of 0.1
    torch.testing.assert_close(coarse, torch.tensor([[[0.7, 0.5]]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"resolution must be in \[1e-9, 0.1\].*got 0.5"):
        flow_from_attentions([a1, a2], (1, 2), 1, resolution=0.5)
    assert FLOW_RESOLUTION == 1e-6


def test_flow_on_models_of_every_token_layout(layout):
    """Registers, distillation token, no class token; non-square 4 x 6 grid; a batch of 3 images."""
    model = make_model(layout)
    x = torch.randn(3, 3, H, W)
    maps = explain(model, x, method="flow", upsample=False)
    assert maps.shape == (3, H // PATCH, W // PATCH)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 + TOL
    _, attns, _, _ = forward_with_attention(model, x)
    P, cls = model.num_prefix_tokens, layout != "pooled"
    torch.testing.assert_close(maps, flow_from_attentions(attns, (4, 6), P, cls), atol=0, rtol=0)
    # Images are independent: the second image alone gives the same map.
    torch.testing.assert_close(explain(model, x[1:2], method="flow", upsample=False), maps[1:2], atol=1e-5, rtol=0)
    assert explain(model, x, method="flow").shape == (3, H, W)


def test_one_block_model_flow_is_rollout():
    model = make_model("distilled", depth=1)
    x = torch.randn(2, 3, H, W)
    flow = explain(model, x, method="flow", upsample=False)
    torch.testing.assert_close(flow, explain(model, x, method="rollout", upsample=False), atol=TOL, rtol=0)


def test_flow_refuses_models_without_global_attention():
    from vitkit.models.registry import create_model

    cnn = create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match=r"attention flow maps need global self-attention; resnet18 has none.*resnet"):
        explain(cnn, torch.randn(1, 3, 32, 32), method="flow")


def test_cli_explain_method_flow(tmp_path, capsys):
    model = make_model("registers", img_size=32)
    model.save_pretrained(tmp_path / "model")
    from PIL import Image

    Image.fromarray(torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy()).save(tmp_path / "a.png")
    rc = main(["explain", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "model"), "--method", "flow",
               "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "out" / "a_flow.png").stat().st_size > 2000
    assert "a_flow.png: flow; predicted" in capsys.readouterr().out
    args = ["explain", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "model"), "--method", "flow"]
    assert main([*args, "--target", "1", "--out", str(tmp_path / "t")]) == 2
    assert "has no effect on --method flow" in capsys.readouterr().err


def test_explorer_embeds_flow_only_when_asked(tmp_path):
    from vitkit.viz import explorer_data

    model = make_model("pooled")
    x = torch.randn(1, 3, H, W)
    plain = explorer_data(model, [x], layers=[-1], top_k=2)
    assert "flow" not in plain["images"][0] and plain["settings"]["flow"] is False
    data = explorer_data(model, [x], layers=[-1], top_k=2, flow=True)
    expected = explain(model, x, method="flow", upsample=False)[0].flatten()
    got = torch.tensor(data["images"][0]["flow"])
    torch.testing.assert_close(got, expected / expected.max(), atol=1e-4, rtol=0)  # stored scaled to max 1
    assert data["settings"]["flow"] is True


@pytest.mark.parametrize("cls", [True, False])
def test_three_layers_match_networkx_on_float_capacities(cls):
    """An independent max-flow (networkx, float capacities, graph built node by node) on random 3-layer attention."""
    nx = pytest.importorskip("networkx")
    P, n, L = 2, 4, 3
    N = P + n
    attns = [_random_attention(1, 2, N, seed=s) for s in range(L)]
    flow = flow_from_attentions(attns, (1, n), P, has_class_token=cls).flatten()
    layers = [_residual_normalise(a.mean(dim=1))[0].double() for a in attns]
    g = nx.DiGraph()
    for depth, A in enumerate(layers):
        for i in range(N):
            for j in range(N):
                g.add_edge((depth, j), (depth + 1, i), capacity=float(A[i, j]))
    outputs = [0] if cls else list(range(P, N))
    for t in outputs:
        g.add_edge((L, t), "sink", capacity=1.0 if cls else 1.0 / n)
    expected = torch.tensor([nx.maximum_flow_value(g, (0, j), "sink") for j in range(P, N)], dtype=torch.float32)
    torch.testing.assert_close(flow, expected, atol=TOL, rtol=0)
    assert float((flow - rollout_from_attentions(attns, (1, n), P, cls).flatten()).abs().max()) > 1e-3
