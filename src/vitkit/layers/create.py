"""Layers chosen by name: the one small table that turns the names in a config into layer classes.

Configs store names ("mha", "layernorm", "gelu" ...) so that `config.json` stays plain JSON; models call the
`get_*` functions below. New variants (the attention zoo, other MLPs and patch embeddings) register here with
`register_layer(kind, name, factory)` and become usable from every model and from the command line.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from vitkit.layers.attention import Attention
from vitkit.layers.attn_axial import AxialAttention
from vitkit.layers.attn_linear import LinearAttention
from vitkit.layers.attn_local import LocalAttention
from vitkit.layers.attn_relpos import DecomposedRelPosAttention, RelPosAttention
from vitkit.layers.attn_sparse import SparseAttention
from vitkit.layers.mlp import GluMlp, Mlp
from vitkit.layers.patch_embed import ConvStemEmbed, HybridEmbed, OverlapPatchEmbed, PatchEmbed

LAYER_KINDS = ("attn", "mlp", "norm", "act", "embed")

_TABLE: dict[str, dict[str, Callable[..., Any]]] = {
    "attn": {
        "mha": Attention,
        "axial": AxialAttention,
        "sparse": SparseAttention,
        "linear": LinearAttention,
        "relpos": RelPosAttention,
        "relpos_decomposed": DecomposedRelPosAttention,
        "local": LocalAttention,
    },
    "mlp": {"mlp": Mlp, "swiglu": functools.partial(GluMlp, act_layer=nn.SiLU)},
    "norm": {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm},
    "act": {
        "gelu": nn.GELU,
        "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
        "relu": nn.ReLU,
        "silu": nn.SiLU,
    },
    # "hybrid" needs a built backbone module (`backbone=`), which a model family supplies (models/hybrid.py).
    # "convstem", the conv stem's name before issue 9, is mapped to "conv_stem" when a config is read (ViTConfig).
    "embed": {"patch": PatchEmbed, "overlap": OverlapPatchEmbed, "conv_stem": ConvStemEmbed, "hybrid": HybridEmbed},
}


def register_layer(kind: str, name: str, factory: Callable[..., Any]) -> None:
    """Make `factory` available under `name` for configs (e.g. `register_layer("attn", "linear", LinearAttention)`).

    Raises:
        ValueError: an unknown kind, or a name already taken.
    """
    table = _table(kind)
    if name in table:
        raise ValueError(f"{kind} layer {name!r} is registered twice")
    table[name] = factory


def layer_names(kind: str) -> list[str]:
    """Names accepted for one kind of layer, e.g. `layer_names("attn")`."""
    return list(_table(kind))


def get_layer(kind: str, name: str) -> Callable[..., Any]:
    """The class (or factory) registered as `name` for `kind`; a ValueError lists the allowed names."""
    table = _table(kind)
    if name not in table:
        raise ValueError(
            f"{kind}_layer={name!r} is not a known {kind} layer; choose one of {', '.join(map(repr, table))}"
        )
    return table[name]


# Arguments every attention layer receives from the block; everything else a layer accepts is a variant option.
ATTN_BLOCK_ARGS = ("dim", "num_heads", "qkv_bias", "qk_norm", "attn_drop", "proj_drop", "norm_layer")
# Arguments every patch embedding receives from the model (`build_patch_embed`); a hybrid's backbone and stage come
# from its own config fields, not from `embed_args`.
EMBED_MODEL_ARGS = ("patch_size", "in_chans", "embed_dim", "bias", "backbone", "stage")


def layer_options(kind: str, name: str) -> list[str]:
    """The option names (`attn_args` keys) a layer accepts beyond what the model passes every layer of its kind."""
    factory = get_layer(kind, name)
    target = factory.func if isinstance(factory, functools.partial) else factory
    params = inspect.signature(target).parameters
    fixed = {"attn": ATTN_BLOCK_ARGS, "embed": EMBED_MODEL_ARGS}.get(kind, ())
    bound = factory.keywords if isinstance(factory, functools.partial) else {}
    return [
        p
        for p, v in params.items()
        if p not in fixed and p not in bound and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)
    ]


def check_layer_args(kind: str, name: str, args: dict[str, Any]) -> None:
    """Refuse option names a layer does not take, listing those it does (values are checked by the layer).

    Raises:
        ValueError: an unknown option, e.g. `attn_args={"windw": 7}` for `attn_layer="local"`.
    """
    factory = get_layer(kind, name)
    target = factory.func if isinstance(factory, functools.partial) else factory
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values()):
        return  # the layer takes any keyword (**kwargs): it checks its own options
    allowed = layer_options(kind, name)
    bad = sorted(set(args) - set(allowed))
    if bad:
        takes = f"takes {', '.join(map(repr, allowed))}" if allowed else "takes no options"
        raise ValueError(
            f"{kind}_args has unknown option(s) {', '.join(map(repr, bad))}: {kind}_layer={name!r} {takes}"
        )


def get_norm(name: str, eps: float) -> Callable[[int], nn.Module]:
    """A norm constructor taking only the width, with `eps` bound."""
    return functools.partial(get_layer("norm", name), eps=eps)


def _table(kind: str) -> dict[str, Callable[..., Any]]:
    if kind not in _TABLE:
        raise ValueError(f"unknown layer kind {kind!r}; kinds are {', '.join(LAYER_KINDS)}")
    return _TABLE[kind]
