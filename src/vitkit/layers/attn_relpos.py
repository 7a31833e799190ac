"""Relative position attention: a learned bias on the logits from the offset between a query's and a key's patch.

Two forms, registered as two attention layers:
- `relpos` (`RelPosAttention`): one learned scalar per head and 2-D offset, a ((2H-1)(2W-1) + 3, heads) table
  indexed as in Swin/BEiT, plus BEiT's three entries for prefix tokens.
- `relpos_decomposed` (`DecomposedRelPosAttention`): ViTDet/MViTv2's per-axis embeddings Rh, Rw (head_dim wide)
  dotted with the query, bias = q . Rh[h_q - h_k] + q . Rw[w_q - w_k].
Both give a full N x N map, so raw attention, rollout and relevance work on them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import Attention, grid_sides, scaled_dot_product_attention, split_tokens


def _grid_option(value: object, layer: str) -> tuple[int, int]:
    """`grid_size` as given in attn_args (an int or [h, w]) -> (h, w); a ValueError names a bad value."""
    pair = (value, value) if isinstance(value, int) else value
    ok = (
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    )
    if not ok:
        raise ValueError(
            f"attn_layer={layer!r}: grid_size={value!r} is not allowed; give the native patch grid as a positive int "
            "or a pair [H', W'] of positive ints (e.g. 14 for 224 px at patch 16)"
        )
    return int(pair[0]), int(pair[1])


class _GridCache:
    """A few recent per-grid index tensors (grids change with the input size; parameters do not enter them)."""

    SIZE = 8

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        while len(self._items) > self.SIZE:
            self._items.popitem(last=False)
        return value


def relative_position_index(grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """BEiT's index into a ((2H-1)(2W-1) + 3)-row bias table for `prefix` prefix tokens and an (H, W) patch grid.

    Patch i at (h_i, w_i) and patch j at (h_j, w_j) read row (h_i - h_j + H - 1) * (2W - 1) + (w_i - w_j + W - 1);
    the last three rows are prefix -> patch, patch -> prefix and prefix -> prefix (shared by every prefix token).

    Returns:
        (N, N) long tensor, N = prefix + H*W.
    """
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)  # (2, H*W)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, H*W, H*W): offsets query - key per axis
    patch_index = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)  # (H*W, H*W)
    n_rel = (2 * gh - 1) * (2 * gw - 1)
    n = prefix + gh * gw
    index = torch.empty(n, n, dtype=torch.long)
    index[prefix:, prefix:] = patch_index
    index[:prefix, :] = n_rel  # prefix -> patch
    index[:, :prefix] = n_rel + 1  # patch -> prefix
    index[:prefix, :prefix] = n_rel + 2  # prefix -> prefix
    return index


class RelPosAttention(Attention):
    """Multi-head attention with a learned relative position bias (Swin, Liu et al. 2021; BEiT, Bao et al. 2022).

    logits = q k^T / sqrt(d) + B[index], B a ((2H-1)(2W-1) + 3, heads) table: one scalar per head for each 2-D
    offset between two patches of an H x W grid, plus BEiT's three shared entries for prefix tokens (class,
    distillation, registers): prefix -> patch, patch -> prefix and prefix -> prefix. Prefix tokens attend every
    token and are attended by every token (attention stays global), they only get these position-free biases.

    Any grid: the table is learned for the native grid `grid_size`. For another grid the (2H-1, 2W-1) part is
    resampled bicubically to the new offsets (align_corners=False, as timm's `resize_rel_pos_bias_table` does when
    loading BEiT at another resolution), inside the forward so gradients reach the stored table; at the native
    grid it is used as stored. The three prefix entries carry over unchanged.

    Cost: the attention itself is dense, O(N^2) time; the bias is an (heads, N, N) tensor given to the fused
    `scaled_dot_product_attention` as a float mask, so it adds O(heads * N^2) memory. The table is initialised
    with trunc_normal(std=0.02), as Swin does.

    Args:
        grid_size: the native patch grid (H', W') the table is sized for, an int for square grids; 14 = 224 px at
            patch 16. Use the model's grid (e.g. 8 for vit_nano_patch4_32) so that training sizes need no resampling.
        (the others as in `Attention`)
    """

    global_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        grid_size: int | list[int] | tuple[int, int] = 14,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self.grid_size = _grid_option(grid_size, "relpos")
        gh, gw = self.grid_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1) + 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._index = _GridCache()

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}"

    def table_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The bias table for a patch grid: ((2H-1)(2W-1) + 3, heads), resampled when `grid` is not native."""
        table = self.relative_position_bias_table
        # While exporting with symbolic sizes the table is always resampled: at the native grid the bicubic
        # resample is the identity (its sample points fall on the entries), and no branch freezes the size.
        if not torch.compiler.is_exporting() and tuple(grid) == self.grid_size:
            return table
        gh, gw = self.grid_size
        rel = table[:-3].T.reshape(1, -1, 2 * gh - 1, 2 * gw - 1)  # (1, heads, 2gh-1, 2gw-1)
        size = (2 * grid[0] - 1, 2 * grid[1] - 1)
        rel = F.interpolate(rel, size=size, mode="bicubic", align_corners=False)  # (1, heads, 2H-1, 2W-1)
        return torch.cat([rel.reshape(self.num_heads, -1).T, table[-3:]])  # ((2H-1)(2W-1) + 3, heads)

    def position_bias(self, n_tokens: int, grid: tuple[int, int] | None) -> torch.Tensor:
        """The bias added to the logits: (heads, N, N) for a sequence of `n_tokens` tokens with patch `grid`."""
        prefix = split_tokens(n_tokens, grid, "relpos")
        grid = grid_sides(grid)
        table = self.table_for(grid)
        if torch.compiler.is_exporting():  # symbolic sizes: built in the graph, not cached by grid
            return table.T[:, relative_position_index(grid, prefix).to(table.device)]
        index = self._index.get(
            (grid, prefix, table.device), lambda: relative_position_index(grid, prefix).to(table.device)
        )  # (N, N)
        return table.T[:, index]  # (heads, N, N), contiguous for the fused kernel

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        bias = self.position_bias(q.shape[2], grid).to(q.dtype)[None]  # (1, h, N, N): SDPA is ~4x slower with 3-D
        capture = self.capture
        # Exporting takes the explicit path: the ONNX exporter's decomposition of the fused kernel with a float bias
        # changes its output layout and then fails on the reshape that follows.
        if capture is not None or torch.compiler.is_exporting():
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, h, N, N)
            if capture is not None:
                capture(self, attn)
            return self.attn_drop(attn) @ v  # (B, h, N, d)
        p = self.attn_drop.p if self.training else 0.0
        return scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)


class DecomposedRelPosAttention(Attention):
    """Multi-head attention with decomposed relative positions (MViTv2 and ViTDet, Li et al. 2022).

    For patches i = (h_i, w_i), j = (h_j, w_j): logits = q_i . k_j / sqrt(d) + q_i . Rh[h_i - h_j] + q_i . Rw[w_i - w_j],
    with Rh (2S_h - 1, head_dim) and Rw (2S_w - 1, head_dim) shared by the heads (the query makes the bias
    head-dependent). For a grid other than the native `grid_size` each table is linearly interpolated to the new
    length 2H-1 / 2W-1 (ViTDet's `get_rel_pos`), so the layer runs at any input size. Prefix tokens (class,
    distillation, registers) get no bias: as queries and as keys their logits are plain q . k / sqrt(d); attention
    stays global (every token attends every token).

    Computed as ViTDet does: rel_h[i, a] = q_i . Rh[h_i - a] (B, heads, H*W, H) and rel_w likewise, broadcast-added
    into a (B, heads, N, N) float bias for the fused `scaled_dot_product_attention`. Cost: dense O(N^2) attention
    plus O(B * heads * N^2) bias memory and O(N * (H + W) * d) for rel_h, rel_w. (Folding the bias into the dot
    product, q' = [q / sqrt(d), rel_h, rel_w], k' = [k, onehot(h), onehot(w)], avoids the N x N bias but was
    slower on CPU: SDPA has no fused kernel when q/k and v widths differ.) Tables are initialised with
    trunc_normal(std=0.02).

    Args:
        grid_size: the native patch grid (S_h, S_w) the tables are sized for, an int for square grids (14 = 224 px
            at patch 16).
        (the others as in `Attention`)
    """

    global_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        grid_size: int | list[int] | tuple[int, int] = 14,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self.grid_size = _grid_option(grid_size, "relpos_decomposed")
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.grid_size[0] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.grid_size[1] - 1, self.head_dim))
        nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
        nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}"

    @staticmethod
    def rel_pos_for(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
        """One axis' table (2S-1, d) -> the embedding per (query, key) position pair (size, size, d): R[q - k]."""
        # Exporting with symbolic sizes: always resampled (the identity at the native length), no branch on size.
        if torch.compiler.is_exporting() or rel_pos.shape[0] != 2 * size - 1:
            rel_pos = F.interpolate(rel_pos.T[None], size=2 * size - 1, mode="linear")[0].T  # (2*size-1, d)
        coords = torch.arange(size, device=rel_pos.device)
        return rel_pos[coords[:, None] - coords[None, :] + size - 1]  # (size, size, d)

    def position_bias(self, q: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """The bias added to the logits for queries q (B, h, N, d): (B, h, N, N), zero where a prefix token is the
        query or the key."""
        B, h, N, d = q.shape
        prefix = split_tokens(N, grid, "relpos_decomposed")
        gh, gw = grid_sides(grid)
        rh = self.rel_pos_for(self.rel_pos_h, gh).to(q.dtype)  # (H, H, d)
        rw = self.rel_pos_for(self.rel_pos_w, gw).to(q.dtype)  # (W, W, d)
        qp = q[:, :, prefix:].reshape(B, h, gh, gw, d)  # (B, h, H, W, d), unscaled as in ViTDet
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", qp, rh)  # (B, h, H, W, H): q_i . Rh[h_i - h_j] per key row h_j
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", qp, rw)  # (B, h, H, W, W)
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, h, H, W, H, W)
        bias = bias.reshape(B, h, gh * gw, gh * gw)  # (B, h, H*W, H*W)
        return F.pad(bias, (prefix, 0, prefix, 0))  # (B, h, N, N)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        bias = self.position_bias(q, grid)  # (B, h, N, N)
        capture = self.capture
        # Exporting takes the explicit path: the ONNX exporter's decomposition of the fused kernel with a float bias
        # changes its output layout and then fails on the reshape that follows.
        if capture is not None or torch.compiler.is_exporting():
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, h, N, N)
            if capture is not None:
                capture(self, attn)
            return self.attn_drop(attn) @ v  # (B, h, N, d)
        p = self.attn_drop.p if self.training else 0.0
        return scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
