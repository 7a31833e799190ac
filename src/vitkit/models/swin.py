"""Swin Transformer v1 (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows").

Read top-down: the config, then the parts (window helpers, window attention, block, patch merging, stage), then the
model (patch embed -> 4 stages -> norm -> avg pool -> head), then the registered variants under timm's names.

Attention runs inside non-overlapping windows of `window_size` x `window_size` tokens; every second block shifts the
windows by half a window (a cyclic roll) so information crosses window borders, and a -100 mask keeps tokens that
the roll made neighbours from attending to each other. Each window's attention gets a learned bias per relative
offset (the relative position bias table). Between stages, patch merging concatenates 2x2 neighbours and halves
the grid while doubling the width.

Parameter names follow timm's current layout (downsample at the start of stages 1..3, `head.fc`), so timm state
dicts load with `load_state_dict`. `relative_position_index` is a non-persistent buffer and no attention mask is
stored: both are functions of the window and the input size. With autograd on they are built per call; without it
(inference) each block keeps its finished attention bias (position bias + shift mask) and its shifted-window
gather index per input geometry, served only while the bias table still equals the copy they were made from, so
no visible state changes between calls (`SwinBlock._inference_geometry`).

Any input size works: the image is padded to a multiple of the patch size and each stage's map to a multiple of its
window (bottom/right, after the norm, before the shift, as the official detection backbone and transformers do);
a stage whose shorter side is at most the window uses one window of that side and no shift (transformers' rule).
A window smaller than the configured one reads the bias of its own offsets from the centre of the learned table.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.layers import DropPath, Linear, Mlp, drop_path_rates, get_layer, get_norm, resolve_intermediates
from vitkit.layers.attention import scaled_dot_product_attention
from vitkit.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, config_kwargs
from vitkit.models.contract import ContractMixin
from vitkit.models.registry import register_family, register_model

MASK_VALUE = -100.0  # the official implementation's value: exp(-100) is 0 in fp32, fp16 and bf16 softmax


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SwinConfig:
    """Architecture of a SwinTransformer. Defaults are Swin-T at 224 px, as in the paper."""

    img_size: int | tuple[int, int] = 224  # native input (H, W); any other size also works (padded per stage)
    patch_size: int = 4  # pixels per patch side of the stem (a stride-`patch_size` conv)
    in_chans: int = 3  # input image channels
    num_classes: int = 1000  # classifier outputs; 0 = no head (pooled features)
    embed_dim: int = 96  # width of stage 0; stage i has embed_dim * 2**i channels
    depths: tuple[int, ...] = (2, 2, 6, 2)  # blocks per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads per stage
    window_size: int = 7  # tokens per window side (the bias table covers (2w-1)^2 offsets)
    mlp_ratio: float = 4.0  # MLP hidden width / block width
    qkv_bias: bool = True  # bias on the query/key/value projection
    drop_rate: float = 0.0  # dropout after attention/MLP projections and before the head
    attn_drop_rate: float = 0.0  # dropout on attention probabilities
    drop_path_rate: float = 0.1  # stochastic depth at the last block (linear from 0 over all blocks)
    norm_layer: str = "layernorm"  # norm for blocks, patch embed, patch merging and the final norm
    norm_eps: float = 1e-5  # LayerNorm epsilon (timm and transformers use 1e-5 for Swin)
    act_layer: str = "gelu"  # MLP activation (exact erf GELU, as the checkpoints were trained)

    def __post_init__(self) -> None:
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size):
            raise ValueError(f"img_size must be a positive int or (H, W), got {self.img_size!r}")
        self.img_size = size
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        for name in ("patch_size", "in_chans", "embed_dim", "window_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got {self.num_classes!r}")
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} need one entry per stage (same length, >= 1)"
            )
        if any(d <= 0 for d in self.depths) or any(h <= 0 for h in self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must be positive")
        for i, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**i
            if width % heads:
                raise ValueError(f"stage {i} width {width} (embed_dim * 2**{i}) is not divisible by {heads} heads")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")


# ----------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------
def window_and_shift(height: int, width: int, window: int, shift: int) -> tuple[int, int]:
    """Window side and shift for a (height, width) map: a map whose shorter side is at most the window gets one
    window of that side and no shift (transformers' rule); otherwise the configured values.

    While exporting (symbolic sides) the same rule without a comparison of the two sides: `torch.sym_min` stays
    symbolic, and the branch is decided by each side against the constant window, which the exporter settles from
    the sides' ranges (`vitkit.deploy.export.size_rule` keeps every stage on the example's branch).
    """
    if torch.compiler.is_exporting():
        if height <= window or width <= window:
            return torch.sym_min(height, width), 0
        return window, shift
    if min(height, width) <= window:
        return min(height, width), 0
    return window, shift


def relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """Index (window^2, window^2) into a (2*table_window-1)^2 bias table for every pair of tokens in a window.

    For `window < table_window` the offsets are a subset of the table's: it reads them from the table's centre.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, w*w, w*w) offsets in -(w-1)..(w-1)
    rel = rel + (table_window - 1)
    return rel[0] * (2 * table_window - 1) + rel[1]  # (w*w, w*w)


def shift_mask(height: int, width: int, window: int, shift: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The shifted-window mask (windows, window^2, window^2): 0 within a region, -100 across regions.

    Built in the activation dtype so it adds to fp16/bf16 scores without a dtype error.
    """
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    h_region = (h >= height - window).long() + (h >= height - shift).long()  # 3 bands per axis after the roll
    w_region = (w >= width - window).long() + (w >= width - shift).long()
    regions = (h_region[:, None] * 3 + w_region[None, :])[None, :, :, None]  # (1, H, W, 1)
    regions = window_partition(regions, window).squeeze(-1)  # (windows, w*w)
    differ = regions[:, None, :] != regions[:, :, None]  # (windows, w*w, w*w)
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill(differ, MASK_VALUE)


def shifted_window_index(height: int, width: int, window: int, shift: int, device) -> torch.Tensor:
    """Token gather index (H * W,) doing the cyclic roll by -shift and `window_partition` in one step.

    `x.flatten(1, 2)[:, index]` equals `window_partition(torch.roll(x, (-shift, -shift), (1, 2)), window)`
    flattened to (B, H * W, C): one copy instead of two; its `argsort` undoes both.
    """
    h = (torch.arange(height, device=device) + shift) % height  # source row of each rolled row
    w = (torch.arange(width, device=device) + shift) % width
    src = h[:, None] * width + w[None, :]  # (H, W) flat source position of each rolled token
    return window_partition(src[None, :, :, None], window).reshape(-1)  # (H * W,) in window order


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * windows, window^2, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)  # (B, nH, w, nW, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B * windows, window^2, C) -> (B, H, W, C); the inverse of `window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, C)  # (B, nH, nW, w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned bias per relative offset.

    Deliberately has no `global_attention` flag: its maps are per window, not N x N over the image, so
    `vitkit.layers.capture_attention` declines Swin by name. The `capture` slot is for `vitkit.explain`, which reads
    one block's window maps (B * nW, heads, window^2, window^2) and places them on the stage's token grid itself.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Non-persistent: a function of window_size, so checkpoints that store it are not expected to.
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size, window_size), persistent=False
        )
        self.capture = None  # a callable(module, probabilities) set only while vitkit.explain reads this block

    def position_bias(self, window: int) -> torch.Tensor:
        """Bias (heads, window^2, window^2) for a window of side `window` (<= the configured side)."""
        if isinstance(window, int) and window == self.window_size:  # a symbolic side (export) is never the buffer's
            index = self.relative_position_index
        else:
            index = relative_position_index(window, self.window_size).to(self.relative_position_bias_table.device)
        bias = self.relative_position_bias_table[index.reshape(-1)]  # (w^2 * w^2, heads)
        return bias.view(window * window, window * window, -1).permute(2, 0, 1)

    def attention_bias(self, window: int, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive attention bias: (1, heads, N, N) position bias, or (nW, heads, N, N) with the shift `mask`."""
        bias = self.position_bias(window).to(dtype).unsqueeze(0)  # (1, heads, N, N)
        return bias if mask is None else bias + mask[:, None]  # (nW, heads, N, N)

    def forward(
        self, x: torch.Tensor, window: int, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Windows (B * nW, window^2, C) -> same shape; `mask` (nW, window^2, window^2) for shifted windows.

        `bias`, when given, is the finished `attention_bias` (the inference cache's) and replaces bias and mask.
        """
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B * nW, heads, N, head_dim)
        if bias is None:
            bias = self.attention_bias(window, mask, x.dtype)
        nW = bias.shape[0]
        # Exporting, the caller repeats the bias per image (no (B * nW) // nW division of symbolic sizes).
        if not torch.compiler.is_exporting() and nW > 1:  # one bias per window, the same for every image
            bias = bias.unsqueeze(0).expand(Bw // nW, -1, -1, -1, -1).reshape(Bw, self.num_heads, N, N)
        capture = self.capture  # read once: another thread may close its capture meanwhile
        # The explicit path, while a map is read or while exporting (the ONNX exporter's decomposition of the fused
        # kernel with a bias changes its output layout and then fails on the reshape below); same output.
        if capture is not None or torch.compiler.is_exporting():
            attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B * nW, heads, N, N)
            if capture is not None:
                capture(self, attn)
            x = F.dropout(attn, self.attn_drop, self.training) @ v
        else:
            x = scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
            )
        x = x.transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP on a (B, H, W, C) map; `shift_size` 0 = regular windows."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        cfg: SwinConfig,
        drop_path: float,
    ):
        super().__init__()
        norm_layer = get_norm(cfg.norm_layer, cfg.norm_eps)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), drop=cfg.drop_rate, act_layer=get_layer("act", cfg.act_layer))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # Inference cache (see _inference_geometry): geometry -> (bias, gather index, inverse); not state.
        self._geometry: OrderedDict[tuple, tuple] = OrderedDict()
        self._bias_src: torch.Tensor | None = None  # the bias table the cached biases were made from

    GEOMETRY_CACHE_SIZE = 4  # input geometries kept per block; enough for multi-scale eval without growing

    def _inference_geometry(
        self, height: int, width: int, window: int, shift: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(attention bias, shifted-window gather index, its inverse) for a padded (height, width) map, cached.

        Only used without autograd. An entry is served only while the bias table equals the copy it was made
        from (one `torch.equal` of a ((2w-1)^2, heads) table per call): optimiser steps, `load_state_dict`, writes
        through `.data` and reassignment all change the values, and any change drops every entry.
        """
        if torch.compiler.is_compiling():
            # Traced once per compiled geometry: the compiler keeps the result as a constant of the graph, and the
            # cache's value check (`torch.equal`) is data-dependent control flow it cannot trace.
            return self._make_geometry(height, width, window, shift, dtype, device)
        table = self.attn.relative_position_bias_table
        src = self._bias_src
        if src is None or src.shape != table.shape or src.dtype != table.dtype or src.device != table.device:
            fresh = False
        else:
            fresh = torch.equal(src, table)
        if not fresh:
            self._geometry.clear()
            self._bias_src = table.detach().clone()
        key = (height, width, window, shift, dtype, device)
        entry = self._geometry.get(key)
        if entry is None:
            entry = self._make_geometry(height, width, window, shift, dtype, device)
            self._geometry[key] = entry
            while len(self._geometry) > self.GEOMETRY_CACHE_SIZE:
                self._geometry.popitem(last=False)
        else:
            self._geometry.move_to_end(key)
        return entry

    def _make_geometry(
        self, height: int, width: int, window: int, shift: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        mask = shift_mask(height, width, window, shift, dtype, device) if shift else None
        index = shifted_window_index(height, width, window, shift, device) if shift else None
        bias = self.attn.attention_bias(window, mask, dtype)  # (1 or nW, heads, N, N)
        return bias, index, None if index is None else torch.argsort(index)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, shift = window_and_shift(H, W, self.window_size, self.shift_size)
        if torch.compiler.is_exporting():
            return self._attend_exporting(x, window, shift)
        # Pad bottom/right to whole windows after the norm and before the shift (official detection code).
        pad_b, pad_r = (window - H % window) % window, (window - W % window) % window
        if pad_b or pad_r:  # F.pad copies even when it pads nothing
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (B, Hp, Wp, C)
        Hp, Wp = H + pad_b, W + pad_r
        # torch.export (vitkit.deploy.export) takes the roll path: the cache is keyed by the (symbolic) map size.
        if not torch.is_grad_enabled() and not torch.compiler.is_exporting():
            # Inference: cached bias, and roll + partition (and their inverses) as one gather each.
            bias, index, inverse = self._inference_geometry(Hp, Wp, window, shift, x.dtype, x.device)
            if shift:
                windows = x.reshape(B, Hp * Wp, C).index_select(1, index).view(-1, window * window, C)
                x = self.attn(windows, window, bias=bias)  # (B * nW, window^2, C)
                x = x.view(B, Hp * Wp, C).index_select(1, inverse).view(B, Hp, Wp, C)
            else:
                x = window_reverse(self.attn(window_partition(x, window), window, bias=bias), window, Hp, Wp)
            return x if not (pad_b or pad_r) else x[:, :H, :W]
        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shift_mask(Hp, Wp, window, shift, x.dtype, x.device)
        x = self.attn(window_partition(x, window), window, mask)  # (B * nW, window^2, C)
        x = window_reverse(x, window, Hp, Wp)  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W]

    def _attend_exporting(self, x: torch.Tensor, window, shift: int) -> torch.Tensor:
        """`_attend` with symbolic sides (vitkit.deploy.export), in gathers instead of pad, roll, views and a crop:
        those leave guards on the sizes (a pad of zero, one window) that torch.export freezes at the example.

        Shifted or regular `window` x `window` windows (constant window): one gather does the padding, the roll and
        the partition, another undoes them, and the per-window bias is repeated per image (no division of batch x
        windows by windows). One-window stages (`window` = the shorter side, symbolic): the padded map attends as
        one sequence with the bias of each pair in the same window and -inf across windows, which equals attention
        per window (the number of windows may then be one or more within one graph).
        """
        B, H, W, C = x.shape
        n_h, n_w = (H + window - 1) // window, (W + window - 1) // window  # windows per side
        Hp, Wp = n_h * window, n_w * window
        dev = x.device
        # Padded-map coordinates in the order attention sees them, and their source (the roll by -shift).
        if isinstance(window, int):  # window order: (n_h, n_w, window, window) flattened
            rows = torch.arange(n_h, device=dev)[:, None] * window + torch.arange(window, device=dev)[None, :]
            cols = torch.arange(n_w, device=dev)[:, None] * window + torch.arange(window, device=dev)[None, :]
            r, c = rows[:, None, :, None], cols[None, :, None, :]  # (n_h, 1, w, 1), (1, n_w, 1, w)
        else:  # one sequence: the padded map row by row
            r, c = torch.arange(Hp, device=dev)[:, None], torch.arange(Wp, device=dev)[None, :]  # (Hp, 1), (1, Wp)
        r_src = torch.where(r + shift >= Hp, r + shift - Hp, r + shift)  # (r + shift) mod Hp, as in torch.roll
        c_src = torch.where(c + shift >= Wp, c + shift - Wp, c + shift)
        index = torch.where((r_src < H) & (c_src < W), r_src * W + c_src, H * W).reshape(-1)  # H * W: the padding
        tokens = torch.cat([x.reshape(B, H * W, C), x.new_zeros(B, 1, C)], dim=1)  # (B, H * W + 1, C)
        seq = tokens.index_select(1, index)  # (B, Hp * Wp, C) in window (or row) order
        if isinstance(window, int):
            mask = shift_mask(Hp, Wp, window, shift, x.dtype, dev) if shift else None  # (nW, N, N)
            bias = self.attn.attention_bias(window, mask, x.dtype)  # (1 or nW, heads, N, N)
            if shift:
                bias = bias.repeat(B, 1, 1, 1)  # (B * nW, heads, N, N): window_partition's order
            out = self.attn(seq.reshape(-1, window * window, C), window, bias=bias)  # (B * nW, N, C)
            out = out.reshape(B, Hp * Wp, C)
        else:
            out = self.attn(seq, window, bias=self._one_window_bias(Hp, Wp, window, x.dtype, dev))  # (B, Hp*Wp, C)
        # Back: the token at (i, j) sits where its rolled position (i - shift) mod Hp lands in that order.
        i, j = torch.arange(H, device=dev)[:, None], torch.arange(W, device=dev)[None, :]
        ri = torch.where(i < shift, i - shift + Hp, i - shift)
        cj = torch.where(j < shift, j - shift + Wp, j - shift)
        if isinstance(window, int):
            inverse = ((ri // window) * n_w + cj // window) * (window * window) + (ri % window) * window + cj % window
        else:
            inverse = ri * Wp + cj
        return out.index_select(1, inverse.reshape(-1)).reshape(B, H, W, C)

    def _one_window_bias(self, Hp: int, Wp: int, window, dtype: torch.dtype, device) -> torch.Tensor:
        """(1, heads, Hp * Wp, Hp * Wp) bias of a padded map attended as one sequence: each pair in the same
        window gets its relative position bias (from the table's centre, as `position_bias`), other pairs -inf."""
        table = self.attn.relative_position_bias_table
        T = self.attn.window_size
        r = torch.arange(Hp, device=device)[:, None].expand(Hp, Wp).reshape(-1)  # (L,) row of each token
        c = torch.arange(Wp, device=device)[None, :].expand(Hp, Wp).reshape(-1)
        dr = (r[:, None] - r[None, :]).clamp(-(T - 1), T - 1)  # (L, L); clamped only across windows (masked)
        dc = (c[:, None] - c[None, :]).clamp(-(T - 1), T - 1)
        bias = table[((dr + T - 1) * (2 * T - 1) + dc + T - 1).reshape(-1)]  # (L * L, heads)
        bias = bias.reshape(Hp * Wp, Hp * Wp, -1).permute(2, 0, 1).to(dtype)  # (heads, L, L)
        win_id = (r // window) * Wp + c // window  # the window of each token
        apart = win_id[:, None] != win_id[None, :]
        return bias.masked_fill(apart, float("-inf")).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attend(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), normed and projected to 2C: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, dim: int, out_dim: int, norm_layer):
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if torch.compiler.is_exporting():  # symbolic sides: always pad, to a side written as 2 x halves (no guard)
            x = F.pad(x, (0, 0, 0, 2 * ((W + 1) // 2) - W, 0, 2 * ((H + 1) // 2) - H))
        elif H % 2 or W % 2:  # odd sides get one zero row/column (as transformers); F.pad copies even for none
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = x.shape[1], x.shape[2]
        # Channel order (0,0), (1,0), (0,1), (1,1) as (row, col) offsets: the original x0..x3 concatenation.
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating regular and shifted windows."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, downsample: bool, cfg, dpr: list[float]):
        super().__init__()
        norm_layer = get_norm(cfg.norm_layer, cfg.norm_eps)
        self.downsample = PatchMerging(dim, out_dim, norm_layer) if downsample else nn.Identity()
        w = cfg.window_size
        self.blocks = nn.ModuleList(
            SwinBlock(out_dim, num_heads, w, 0 if i % 2 == 0 else w // 2, cfg, dpr[i]) for i in range(depth)
        )
        self.grad_checkpointing = False  # set by SwinTransformer.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H / 2, W / 2, out_dim) (the same size without merging). The model calls the stage
        module itself, so hooks on `feature_info`'s `layers.i` fire; blocks are checkpointed when enabled."""
        x = self.downsample(x)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class SwinPatchEmbed(nn.Module):
    """Stride-`patch` conv then LayerNorm: image (B, C, H, W) -> (B, ceil(H/p), ceil(W/p), D), padding bottom/right."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:  # F.pad copies even when it pads nothing
            x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H', W', D)


class SwinHead(nn.Module):
    """Global average pool -> dropout -> `fc` (timm's ClassifierHead layout: `head.fc`)."""

    def __init__(self, dim: int, num_classes: int, drop: float):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)
        return x if pre_logits else self.fc(x)


class SwinTransformer(ContractMixin, nn.Module):
    """Swin Transformer v1 classifier (timm layout).

    Args:
        cfg: architecture; `SwinConfig()` (Swin-T) when None.
        **overrides: fields of SwinConfig to change, e.g. `num_classes=10, depths=(1, 1)`.
    """

    family = "swin"

    def __init__(self, cfg: SwinConfig | None = None, **overrides):
        super().__init__()
        overrides = config_kwargs(SwinConfig, overrides, base=cfg)
        cfg = SwinConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)  # a private copy
        self.cfg = cfg
        self.preprocess = Preprocess(input_size=cfg.img_size)
        self.grad_checkpointing = False
        norm_layer = get_norm(cfg.norm_layer, cfg.norm_eps)
        n = len(cfg.depths)
        self.widths = [cfg.embed_dim * 2**i for i in range(n)]
        self.embed_dim = cfg.embed_dim
        self.num_features = self.widths[-1]
        self.patch_embed = SwinPatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, norm_layer)
        dpr = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        stages, start = [], 0
        for i in range(n):
            prev = self.widths[max(i - 1, 0)]
            stage_dpr = dpr[start : start + cfg.depths[i]]
            stages.append(SwinStage(prev, self.widths[i], cfg.depths[i], cfg.num_heads[i], i > 0, cfg, stage_dpr))
            start += cfg.depths[i]
        self.layers = nn.ModuleList(stages)
        self.norm = norm_layer(self.num_features)
        self.head = SwinHead(self.num_features, cfg.num_classes, cfg.drop_rate)
        self.init_weights()

    def __setattr__(self, name: str, value: Any) -> None:
        # `model.head = nn.Linear(C, 5)` (the tutorials' way to change the class count) becomes that Linear inside
        # a pooling head, so the model still pools, keeps timm's `head.fc` keys and saves a config that rebuilds it.
        if name == "head" and isinstance(value, (nn.Linear, nn.Identity)) and "cfg" in self.__dict__:
            if isinstance(value, nn.Linear) and (value.in_features != self.num_features or value.bias is None):
                raise ValueError(
                    f"model.head = {value}: a Swin head is nn.Linear({self.num_features}, classes) with a bias "
                    "(or nn.Identity()); use reset_classifier(classes) for a fresh one"
                )
            head = SwinHead(self.num_features, 0, self.cfg.drop_rate)
            head.fc = value
            value = head
        super().__setattr__(name, value)
        if name == "head" and "cfg" in self.__dict__:
            self.cfg.num_classes = self.num_classes

    def init_weights(self) -> None:
        """timm's init: truncated normal 0.02 for linear layers and bias tables, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    # --- forward ----------------------------------------------------------------------------------------------
    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[i](x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected images (B, {self.cfg.in_chans}, H, W), got shape {tuple(x.shape)}")
        return self.patch_embed(x)  # (B, ceil(H/p), ceil(W/p), D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W), any size -> normed last-stage map (B, num_features, H', W').

        H' = ceil(H / reduction) with the last stage's `feature_info` reduction (32 for every registered variant).
        """
        x = self._embed(x)
        for i in range(len(self.layers)):
            x = self._run_stage(i, x)  # (B, H_i, W_i, C_i)
        return self.norm(x).permute(0, 3, 1, 2)  # (B, C, H', W')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Maps (B, C, H', W') -> logits (B, classes), or the pooled features (B, C) when `pre_logits`."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> logits (B, classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, as_maps: bool = True, norm: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of chosen stages.

        Args:
            x: images (B, C, H, W).
            indices: an int n for the last n stages, or stage indices (negatives from the end); None = all.
            as_maps: (B, C_i, H_i, W_i) maps (True) or (B, H_i * W_i, C_i) tokens.
            norm: apply the final norm to the last stage's output (the only stage it was trained on).
        """
        n = len(self.layers)
        wanted = resolve_intermediates(indices, n, "stage")
        x = self._embed(x)
        outs = []
        for i in range(max(wanted) + 1):
            x = self._run_stage(i, x)
            if i in wanted:
                y = self.norm(x) if norm and i == n - 1 else x
                outs.append(y.permute(0, 3, 1, 2) if as_maps else y.flatten(1, 2))
        return outs

    # --- fine-tuning helpers ----------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (randomly initialised) for `num_classes` outputs; 0 removes it."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got {num_classes!r}")
        w = self.norm.weight
        self.cfg.num_classes = num_classes
        self.head = SwinHead(self.num_features, num_classes, self.cfg.drop_rate).to(device=w.device, dtype=w.dtype)
        if isinstance(self.head.fc, nn.Linear):
            nn.init.trunc_normal_(self.head.fc.weight, std=0.02)
            nn.init.zeros_(self.head.fc.bias)
        if self.preprocess.class_names is not None and len(self.preprocess.class_names) != num_classes:
            self.preprocess.class_names = None

    def get_classifier(self) -> nn.Module:
        return self.head.fc if isinstance(self.head, SwinHead) else self.head  # a head assigned as it is

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.grad_checkpointing = bool(enable)
        for stage in self.layers:
            stage.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """The relative position bias tables (as timm), besides norms and biases."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage: `num_chs`, `reduction` (stride in pixels; sides round up), `module`."""
        p = self.cfg.patch_size
        return [{"num_chs": c, "reduction": p * 2**i, "module": f"layers.{i}"} for i, c in enumerate(self.widths)]

    @property
    def num_layer_ids(self) -> int:
        """0 = patch embed, 1..total blocks = blocks in order, total blocks + 1 = final norm and head."""
        return sum(self.cfg.depths) + 2

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter: 0 = patch embed, then one per block in order (a stage's patch merging shares
        the id of the stage's first block, which it feeds), last = final norm and head."""
        if name.startswith("patch_embed."):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            stage = int(parts[1])
            before = sum(self.cfg.depths[:stage])
            if parts[2] == "blocks":
                return before + int(parts[3]) + 1
            return before + 1
        return self.num_layer_ids - 1

    def is_classifier(self, name: str) -> bool:
        """Whether a parameter belongs to the classifier (`head.*`)."""
        return name.startswith("head.")

    def adapt_state_dict(self, state: dict[str, torch.Tensor], source_cfg: dict[str, Any], log=None) -> dict:
        """A state dict saved for another window size, made to fit: each bias table is resized (bicubic)."""
        old = int(source_cfg.get("window_size", self.cfg.window_size))
        new = self.cfg.window_size
        if old == new:
            return state
        state = dict(state)
        for key, table in list(state.items()):
            if key.endswith("relative_position_bias_table"):
                state[key] = resize_bias_table(table, new)
        if log is not None:
            log(f"resized relative position bias tables from window {old} to {new} (bicubic)")
        return state


def resize_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """A ((2w-1)^2, heads) bias table resampled (bicubic) to window side `window`: ((2*window-1)^2, heads)."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"a bias table has (2w-1)^2 rows; got {table.shape[0]}")
    new = 2 * window - 1
    if side == new:
        return table
    heads = table.shape[1]
    grid = table.float().T.reshape(1, heads, side, side)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new * new).T.contiguous().to(table.dtype)


register_family("swin", SwinConfig, SwinTransformer)


# ----------------------------------------------------------------------------------------------------------------
# Variants (timm's names and pretrained_cfg: ImageNet statistics, crop 0.9, 1.0 at 384 px, bicubic)
# ----------------------------------------------------------------------------------------------------------------
WIDTHS = {  # name: (embed_dim, depths, num_heads)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
PRE_224 = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_fraction": 0.9, "interpolation": "bicubic"}
PRE_384 = {**PRE_224, "crop_fraction": 1.0}


def _register_swin(name: str, width: str, window: int, size: int, doc: str) -> None:
    def builder(**overrides) -> SwinTransformer:
        dim, depths, heads = WIDTHS[width]
        base = SwinConfig(img_size=size, embed_dim=dim, depths=depths, num_heads=heads, window_size=window)
        return SwinTransformer(base, **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    register_model(name, family="swin", preprocess=PRE_384 if size == 384 else PRE_224)(builder)


_register_swin("swin_tiny_patch4_window7_224", "tiny", 7, 224, "Swin-T, 28.3M params.")
_register_swin("swin_small_patch4_window7_224", "small", 7, 224, "Swin-S, 49.6M params.")
_register_swin("swin_base_patch4_window7_224", "base", 7, 224, "Swin-B, 87.8M params.")
_register_swin("swin_base_patch4_window12_384", "base", 12, 384, "Swin-B at 384 px with 12x12 windows.")
_register_swin("swin_large_patch4_window7_224", "large", 7, 224, "Swin-L, 196.5M params.")
