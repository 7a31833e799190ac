"""At inference a class-token classifier computes only the prefix rows of its last block (the head reads nothing
else): same logits as the full path, and the full path whenever anything could observe the other rows."""

import pytest
import torch

import vitkit
from vitkit.layers import Block, capture_attention

TINY = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


@pytest.fixture
def calls(monkeypatch):
    seen = []
    original = Block.forward_queries

    def spy(self, x, n):
        seen.append((tuple(x.shape), n))
        return original(self, x, n)

    monkeypatch.setattr(Block, "forward_queries", spy)
    return seen


@pytest.mark.parametrize(
    "name, keep",
    [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2), ("vit_small_patch14_224_reg4", 1)],
)
def test_prefix_rows_only_give_the_full_logits(calls, name, keep):
    torch.manual_seed(0)
    model = vitkit.create_model(name, **{**TINY, "patch_size": 8}).eval()
    x = torch.randn(3, 3, 32, 48)
    with torch.enable_grad():  # autograd on: the full path
        full = model(x).detach()
    assert calls == []
    with torch.no_grad():
        fast = model(x)
    assert calls == [((3, model.num_tokens(32, 48), 32), keep)]
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)


def test_full_path_when_rows_are_observable_or_unused(calls):
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 32, 48)
    seen = []
    handle = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [(2, 1 + 4 * 6, 32)] and calls == []  # the hook saw every token
    with torch.no_grad(), capture_attention(model, [-1]) as rec:
        model(x)
    assert rec.maps[0].shape == (2, 2, 25, 25) and calls == []
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []
    avg = vitkit.create_model("vit_small_patch16_224_gap", **TINY).eval()
    with torch.no_grad():
        avg(x)  # mean pooling reads every patch token
    assert calls == []
