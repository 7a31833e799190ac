"""Local attention: each patch attends only the patches near it (plus every prefix token), so the cost stops growing
as N^2. Two forms, chosen by `mode`: non-overlapping windows (Swin's W-MSA, Liu et al. 2021) and a sliding
neighbourhood (NAT, Hassani et al. 2023)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import Attention, grid_sides, scaled_dot_product_attention, split_tokens

LocalMode = Literal["window", "neighborhood"]
LOCAL_MODES = ("window", "neighborhood")


def local_mask(grid: tuple[int, int], prefix: int, window: int, mode: LocalMode) -> torch.Tensor:
    """The dense (N, N) boolean mask of local attention, True where query i may attend key j (N = prefix + H*W).

    Prefix rows and columns are all True. In "window" mode two patches may attend each other when they fall in the
    same window of the (bottom/right padded) grid, window side min(window, H) x min(window, W). In "neighborhood"
    mode patch (h, w) attends the k_h x k_w patches from row clamp(h - k_h // 2, 0, H - k_h) and column
    clamp(w - k_w // 2, 0, W - k_w) on, k_h = min(window, H), k_w = min(window, W): the neighbourhood is centred
    where it can be and shifted inwards at the borders, so every patch attends exactly k_h * k_w patches (NAT).
    """
    gh, gw = grid
    kh, kw = min(window, gh), min(window, gw)
    rows = torch.arange(gh).repeat_interleave(gw)  # (H*W,) row of each patch
    cols = torch.arange(gw).repeat(gh)  # (H*W,) column of each patch
    if mode == "window":
        same_h = (rows[:, None] // kh) == (rows[None, :] // kh)
        same_w = (cols[:, None] // kw) == (cols[None, :] // kw)
        patch = same_h & same_w  # (H*W, H*W)
    else:
        start_h = (rows - kh // 2).clamp(0, gh - kh)[:, None]  # (H*W, 1) first row of each query's neighbourhood
        start_w = (cols - kw // 2).clamp(0, gw - kw)[:, None]
        patch = (
            (rows[None] >= start_h)
            & (rows[None] < start_h + kh)
            & (cols[None] >= start_w)
            & (cols[None] < start_w + kw)
        )
    n = prefix + gh * gw
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[prefix:, prefix:] = patch
    return mask


class LocalAttention(Attention):
    """Multi-head attention restricted to a local neighbourhood of each patch on the patch grid.

    Modes:
    - "window" (Swin's W-MSA without the shift): the grid is cut into non-overlapping `window` x `window` windows
      (clamped to the grid side when the grid is smaller, as Swin does) and patches attend within their window.
      Grids that the window does not divide are padded at the bottom/right; padded keys are masked out and padded
      queries dropped. Computed per window (tokens reshaped to (windows, window^2)), so time and memory are linear
      in N: O(N * (window^2 + P) * d).
    - "neighborhood" (NAT, Hassani et al. 2023): every patch attends the `window` x `window` patches around it
      (`window` odd, the kernel size); at the borders the neighbourhood is shifted inwards to stay inside the grid,
      as NAT does, so every patch sees the same number of neighbours. Computed as dense attention with the (N, N)
      boolean mask through `scaled_dot_product_attention`: O(N^2) time and mask memory. FlexAttention with a block
      mask was measured as the alternative and is 5-10x slower on CPU, where it runs eagerly, unfused, and builds
      its block mask eagerly too (one head, d=32, P=1, one thread: N=4097 2.6 s vs 0.50 s for SDPA with the dense
      mask, N=16385 33 s vs 3.1 s; block mask creation another 11 s / 33 s).

    Prefix tokens (class, distillation, registers): they attend all N tokens (their queries use global attention)
    and every patch attends every prefix token besides its window/neighbourhood (the prefix keys and values are
    concatenated to each window's keys and values).

    Attention maps: while a capture is attached (explain, `return_attention`) both modes run the dense masked
    attention and hand the capture the (B, heads, N, N) probabilities, zero outside the window, so raw attention,
    rollout and relevance work (`global_attention = True`).

    Args:
        window: window side ("window") or neighbourhood side ("neighborhood", odd), in patches. Default 7 (Swin,
            NAT).
        mode: "window" or "neighborhood".
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
        window: int = 7,
        mode: LocalMode = "window",
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        if mode not in LOCAL_MODES:
            raise ValueError(f"attn_layer='local': mode={mode!r} is not allowed; choose one of {LOCAL_MODES}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"attn_layer='local': window={window!r} is not allowed; give a positive int (patches)")
        if mode == "neighborhood" and window % 2 == 0:
            raise ValueError(
                f"attn_layer='local': window={window} is even; mode='neighborhood' needs an odd kernel size so that "
                f"the neighbourhood has a centre (try {window - 1} or {window + 1})"
            )
        self.window, self.mode = window, mode
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # a few recent dense masks, by grid

    def extra_repr(self) -> str:
        return f"window={self.window}, mode={self.mode!r}"

    def dense_mask(self, grid: tuple[int, int], prefix: int, device: torch.device) -> torch.Tensor:
        """The (N, N) boolean mask of this layer (see `local_mask`), cached for a few recent grids."""
        if torch.compiler.is_exporting():  # symbolic sizes (vitkit.deploy.export): built in the graph, not cached
            return local_mask(grid, prefix, self.window, self.mode).to(device)
        key = (grid, prefix, device)
        if key not in self._masks:
            self._masks[key] = local_mask(grid, prefix, self.window, self.mode).to(device)
            while len(self._masks) > 4:  # masks are N^2 bytes: keep only a few
                self._masks.popitem(last=False)
        self._masks.move_to_end(key)
        return self._masks[key]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        prefix = split_tokens(q.shape[2], grid, "local")
        grid = grid_sides(grid)
        if self.capture is not None or self.mode == "neighborhood":
            return self.masked_attend(q, k, v, self.dense_mask(grid, prefix, q.device))
        return self.window_attend(q, k, v, grid, prefix)

    def window_attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], prefix: int
    ) -> torch.Tensor:
        """The linear-cost window path: q, k, v (B, h, N, d) -> (B, h, N, d), attention computed per window."""
        B, h, N, d = q.shape
        gh, gw = grid
        wh, ww = min(self.window, gh), min(self.window, gw)
        ph, pw = (-gh) % wh, (-gw) % ww
        nh, nw = (gh + ph) // wh, (gw + pw) // ww

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            c = t.shape[-1]
            t = F.pad(t.reshape(-1, gh, gw, c), (0, 0, 0, pw, 0, ph))  # (b, H+ph, W+pw, c)
            t = t.reshape(-1, nh, wh, nw, ww, c).transpose(2, 3)  # (b, nh, nw, wh, ww, c)
            return t.reshape(-1, nh * nw, wh * ww, c)  # (b, windows, wh*ww, c)

        p = self.attn_drop.p if self.training else 0.0
        qw, kw, vw = (to_windows(t[:, :, prefix:]) for t in (q, k, v))  # each (B*h, windows, wh*ww, d)
        mask = None
        if ph or pw:
            valid = to_windows(torch.ones(1, gh * gw, 1, dtype=torch.bool, device=q.device))  # (1, windows, L, 1)
            mask = valid.transpose(-2, -1)  # (1, windows, 1, L): padded keys excluded
        if prefix:
            kp = k[:, :, :prefix].reshape(B * h, 1, prefix, d).expand(-1, nh * nw, -1, -1)  # (B*h, windows, P, d)
            vp = v[:, :, :prefix].reshape(B * h, 1, prefix, d).expand(-1, nh * nw, -1, -1)
            kw, vw = torch.cat([kp, kw], dim=2), torch.cat([vp, vw], dim=2)  # (B*h, windows, P + wh*ww, d)
            if mask is not None:
                mask = F.pad(mask, (prefix, 0), value=True)  # (1, windows, 1, P + L)
        out = scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, dropout_p=p)  # (B*h, windows, wh*ww, d)
        out = out.reshape(B * h, nh, nw, wh, ww, d).transpose(2, 3).reshape(B * h, nh * wh, nw * ww, d)
        out = out[:, :gh, :gw].reshape(B, h, gh * gw, d)  # (B, h, H*W, d): padded queries dropped
        if not prefix:
            return out
        out_prefix = scaled_dot_product_attention(q[:, :, :prefix], k, v, dropout_p=p)  # (B, h, P, d): global
        return torch.cat([out_prefix, out], dim=2)  # (B, h, N, d)
