"""Every family compiles into one graph (`torch.compile(fullgraph=True)` raises at any graph break) under inference
and training, in fp32 and bf16, and the compiled forward equals the eager one.

A graph break inside a block is not only slower: each block instance has its own guards, so a model deeper than
dynamo's recompile limit (8) silently runs its remaining blocks eagerly. That is what made compiled bf16 ViTs
slower than compiled transformers: the CPU bf16 rule of `vitkit.layers.linear` called a `functools.cache`d probe
in every Linear, which dynamo cannot trace under `inference_mode`.
"""

from __future__ import annotations

import pytest
import torch

from tests.explain.test_families import FAMILIES, tiny_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inference_compiles_without_graph_breaks_in_bf16(family):
    model = tiny_model(family).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.inference_mode():
        expected = model(x)
        got = compiled(x)
    torch.testing.assert_close(got, expected)


# Hybrids are made of the ViT and CNN parts below; their training graphs add nothing new and cost 10+ s each.
@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if not f.startswith("vit_hybrid") and f != "resnetv2"))
def test_training_step_compiles_without_graph_breaks(family):
    model = tiny_model(family).train()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(x).float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
