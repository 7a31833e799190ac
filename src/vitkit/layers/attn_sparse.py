"""Sparse attention (Child et al. 2019, "Generating Long Sequences with Sparse Transformers") on image patches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitkit.layers.attention import Attention, grid_sides, split_tokens

SPARSE_PATTERNS = ("strided", "fixed")


def sparse_mask(
    pattern: str, prefix: int, grid: tuple[int, int], stride: int, c: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """The boolean (N, N) mask of a bidirectional sparse pattern, N = prefix + H'*W' (True = may attend).

    Patches are numbered i = 0 .. H'*W'-1 in row-major order. `strided` (stride l): i sees j when |i - j| < l or
    (i - j) is a multiple of l. `fixed` (block length l, c summary positions): i sees j when both lie in the same
    block of l (i // l == j // l) or j is one of the last c positions of its block (j mod l >= l - c). Prefix rows
    and prefix columns are all True.

    Raises:
        ValueError: an unknown pattern.
    """
    if pattern not in SPARSE_PATTERNS:
        raise ValueError(f"pattern {pattern!r} is not a sparse pattern; choose one of {', '.join(SPARSE_PATTERNS)}")
    m = grid[0] * grid[1]
    i = torch.arange(m, device=device)[:, None]  # (M, 1)
    j = torch.arange(m, device=device)[None, :]  # (1, M)
    if pattern == "strided":
        patches = ((i - j).abs() < stride) | ((i - j) % stride == 0)  # (M, M)
    else:
        patches = (i // stride == j // stride) | (j % stride >= stride - c)  # (M, M)
    mask = torch.ones(prefix + m, prefix + m, dtype=torch.bool, device=device)
    mask[prefix:, prefix:] = patches
    return mask


class SparseAttention(Attention):
    """Sparse Transformer attention over the row-major patch sequence, bidirectional.

    Patterns (Child et al. 2019, section 4), with l = `stride`:
    - `strided`: a patch attends the patches within l positions (a band) and every l-th patch from it. With l = W'
      (the default) that is its neighbourhood along the row (wrapping into the next/previous row) plus its
      column, the pattern the paper uses for images.
    - `fixed`: the sequence is cut into blocks of l; a patch attends its own block and the last c patches of every
      block (the "summary" positions that carry information across blocks).
    A ViT encodes a whole image at once, so the patterns are bidirectional: the paper's causal restriction
    (j <= i) is dropped, and the band / block extend to both sides. Every head uses the union of the pattern's two
    sub-patterns (the paper's "merged" head type, one mask for all heads) rather than splitting them between
    heads, so every layer's map is a full N x N matrix that raw maps, rollout and relevance read.

    Prefix tokens (class, distillation, registers) attend every token, and every patch attends every prefix token.

    Cost: O(N * k) useful work for k ~ 2 sqrt(N) keys per query, but the CPU fast path is the fused
    `scaled_dot_product_attention` with the boolean mask (a cached (N, N) bool), which still computes the dense
    product: FlexAttention with a block mask runs only eagerly on CPU and measured 7-13x slower (see docs).

    Args:
        pattern: "strided" or "fixed".
        stride: l, the stride (strided) or block length (fixed), in patches; None = the grid width W' of each
            input, so the pattern follows image rows at any input size.
        c: summary positions per block (fixed only, 1 <= c <= l); must stay 1 for `strided`.
        Other arguments as `vitkit.layers.Attention`.

    Raises:
        ValueError: an unknown pattern, a stride that is not a positive int, or a c outside 1..l (or given with
            `strided`).
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
        pattern: str = "strided",
        stride: int | None = None,
        c: int = 1,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        if pattern not in SPARSE_PATTERNS:
            raise ValueError(f"pattern {pattern!r} is not a sparse pattern; choose one of {', '.join(SPARSE_PATTERNS)}")
        if stride is not None and (not isinstance(stride, int) or isinstance(stride, bool) or stride < 1):
            raise ValueError(f"stride {stride!r} must be a positive int (patches) or None for the grid width")
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"c {c!r} must be a positive int (summary positions per block of pattern='fixed')")
        if pattern == "strided" and c != 1:
            raise ValueError(f"c={c!r} applies only to pattern='fixed'; leave it at 1 for pattern='strided'")
        if pattern == "fixed" and stride is not None and c > stride:
            raise ValueError(f"c {c} must be at most the block length stride={stride}")
        self.pattern, self.stride, self.c = pattern, stride, c
        self._masks: dict[tuple, torch.Tensor] = {}  # (prefix, grid, device) -> mask; rebuilt, never saved

    def mask(self, prefix: int, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        """This layer's boolean (N, N) mask for `prefix` tokens and a patch `grid` (cached per size and device).

        Raises:
            ValueError: stride=None with pattern='fixed' and a grid narrower than c.
        """
        stride = self.stride if self.stride is not None else grid[1]
        if self.pattern == "fixed" and self.c > stride:
            raise ValueError(f"c {self.c} exceeds the block length {stride} (the grid width {grid[1]}); set stride")
        if torch.compiler.is_exporting():  # symbolic sizes (vitkit.deploy.export): built in the graph, not cached
            return sparse_mask(self.pattern, prefix, grid, stride, self.c, device)
        key = (prefix, tuple(grid), str(device))
        if key not in self._masks:
            if len(self._masks) >= 8:  # a few input sizes at a time; do not grow without bound
                self._masks.clear()
            self._masks[key] = sparse_mask(self.pattern, prefix, grid, stride, self.c, device)
        return self._masks[key]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """q, k, v (B, heads, N, d) -> (B, heads, N, d); `grid` (H', W') is required."""
        prefix = split_tokens(q.shape[2], grid, "sparse")
        return self.masked_attend(q, k, v, self.mask(prefix, grid_sides(grid), q.device))

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, stride={self.stride}, c={self.c}"
