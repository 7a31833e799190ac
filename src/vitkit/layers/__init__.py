"""Building blocks shared by every model family."""

from vitkit.layers.attention import Attention
from vitkit.layers.attn_axial import AxialAttention
from vitkit.layers.attn_linear import LinearAttention
from vitkit.layers.attn_local import LocalAttention
from vitkit.layers.attn_relpos import DecomposedRelPosAttention, RelPosAttention
from vitkit.layers.attn_sparse import SparseAttention
from vitkit.layers.block import Block
from vitkit.layers.capture import (
    AttentionRecorder,
    attention_layers,
    capture_attention,
    resolve_intermediates,
    resolve_layers,
    run_with_captures,
)
from vitkit.layers.create import check_layer_args, get_layer, get_norm, layer_names, layer_options, register_layer
from vitkit.layers.drop import DropPath, drop_path_rates
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.linear import Linear, lowp_in_fp32
from vitkit.layers.mlp import GluMlp, Mlp
from vitkit.layers.norm import LayerNorm2d
from vitkit.layers.patch_embed import (
    ConvStemEmbed,
    HybridEmbed,
    OverlapPatchEmbed,
    PatchEmbed,
    bilinear_resize_matrix,
    check_image_size,
    pi_resize_kernel,
    pi_resize_matrix,
)
from vitkit.layers.pos_embed import PosConv, resample_pos_embed, resample_pos_embed_traced, sincos_2d

__all__ = [
    "Attention",
    "AttentionRecorder",
    "AxialAttention",
    "LinearAttention",
    "SparseAttention",
    "ConvStemEmbed",
    "DecomposedRelPosAttention",
    "LocalAttention",
    "RelPosAttention",
    "HybridEmbed",
    "Block",
    "GluMlp",
    "attention_layers",
    "capture_attention",
    "check_layer_args",
    "get_layer",
    "get_norm",
    "layer_options",
    "layer_names",
    "register_layer",
    "resample_pos_embed_traced",
    "resolve_intermediates",
    "resolve_layers",
    "run_with_captures",
    "DropPath",
    "LayerNorm2d",
    "LayerScale",
    "Linear",
    "lowp_in_fp32",
    "Mlp",
    "OverlapPatchEmbed",
    "PatchEmbed",
    "PosConv",
    "bilinear_resize_matrix",
    "pi_resize_kernel",
    "pi_resize_matrix",
    "check_image_size",
    "drop_path_rates",
    "resample_pos_embed",
    "sincos_2d",
]
