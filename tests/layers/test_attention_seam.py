"""The seam the attention zoo plugs into: options checked by name, the patch grid passed to every block."""

import pytest
import torch

from vitkit.layers import Attention, check_layer_args, layer_options, register_layer
from vitkit.layers.attention import split_tokens
from vitkit.layers.create import _TABLE
from vitkit.models import create_model
from vitkit.train.config import resolve_config


class GridSpy(Attention):
    """Global attention that records the grid each call receives and takes one option."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False, attn_drop=0.0, proj_drop=0.0,
                 norm_layer=torch.nn.LayerNorm, tag: str = "x"):  # fmt: skip
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self.tag, self.seen = tag, []

    def attend(self, q, k, v, grid=None):
        self.seen.append((split_tokens(q.shape[2], grid, "spy"), grid))
        return super().attend(q, k, v, grid)


@pytest.fixture
def spy_layer():
    register_layer("attn", "spy", GridSpy)
    yield "spy"
    del _TABLE["attn"]["spy"]


def test_every_block_gets_the_grid_of_a_non_square_input(spy_layer):
    model = create_model("vit_nano_patch4_32", num_classes=3, attn_layer=spy_layer, attn_args={"tag": "y"}).eval()
    model(torch.randn(2, 3, 16, 24))
    seen = [s for blk in model.blocks for s in blk.attn.seen]
    assert seen == [(1, (4, 6))] * len(model.blocks)
    assert model.blocks[0].attn.tag == "y"
    model.blocks[0].attn.seen.clear()
    model.forward_intermediates(torch.randn(1, 3, 8, 12), indices=[0])
    assert model.blocks[0].attn.seen == [(1, (2, 3))]


def test_grid_reaches_blocks_under_gradient_checkpointing(spy_layer):
    model = create_model("vit_nano_patch4_32", num_classes=3, attn_layer=spy_layer, reg_tokens=2)
    model.set_grad_checkpointing(True)
    model(torch.randn(1, 3, 12, 8)).sum().backward()
    assert {s for s in model.blocks[-1].attn.seen} == {(3, (3, 2))}  # forward and the recomputation


def test_unknown_options_are_named_with_the_allowed_ones(spy_layer):
    assert layer_options("attn", spy_layer) == ["tag"]
    assert layer_options("attn", "mha") == []
    with pytest.raises(ValueError, match=r"'windw'.*attn_layer='spy' takes 'tag'"):
        check_layer_args("attn", spy_layer, {"windw": 7})
    with pytest.raises(ValueError, match=r"'window'.*'mha' takes no options"):
        create_model("vit_nano_patch4_32", attn_args={"window": 7})
    with pytest.raises(ValueError, match=r"attn_layer='nope'.*'mha'"):
        create_model("vit_nano_patch4_32", attn_layer="nope")


def test_split_tokens_refuses_a_missing_or_wrong_grid():
    assert split_tokens(17, (4, 4), "x") == 1
    with pytest.raises(ValueError, match="needs grid"):
        split_tokens(17, None, "local")
    with pytest.raises(ValueError, match=r"grid \(5, 5\) does not fit a sequence of 17"):
        split_tokens(17, (5, 5), "local")


def test_model_args_merge_recipe_and_overrides():
    cfg = resolve_config(
        {"model": "vit_nano_patch4_32", "model_args": {"depth": 2}}, {"model_args": {"attn_layer": "mha"}}
    )
    assert cfg.model_args == {"depth": 2, "attn_layer": "mha"}


class OldContract(torch.nn.Module):
    """An attention layer written before the grid was passed: `forward(x)` only, options through **kwargs."""

    def __init__(self, dim, num_heads, **kwargs):
        super().__init__()
        self.proj, self.kwargs = torch.nn.Linear(dim, dim), kwargs

    def forward(self, x):
        return self.proj(x)


def test_attention_without_grid_or_with_kwargs_still_plugs_in():
    register_layer("attn", "old", OldContract)
    try:
        model = create_model("vit_nano_patch4_32", num_classes=3, depth=1, attn_layer="old", attn_args={"tau": 2})
        assert model(torch.randn(1, 3, 16, 24)).shape == (1, 3)
        assert model.blocks[0].attn.kwargs["tau"] == 2
    finally:
        del _TABLE["attn"]["old"]
