"""Window attention of hierarchical (Swin) models, placed on the token grid of the block's stage.

A Swin block attends inside windows of its stage's (padded, every second block cyclically shifted) token grid, so
one block has no N x N map over the image, but its window maps tile one: `capture_window_attention` reads the
(B * windows, heads, w^2, w^2) probabilities of one block through `WindowAttention.capture`, and
`window_query_mean` turns the head-fused maps into "the mean over the stage's real query tokens of the attention
each real key token receives" on the (H_s, W_s) stage grid, with the shift undone and the padding cut off. This is
the counterpart of a pooled ViT's "mean patch row": Swin has no class token and mean-pools its last stage.

Attention that a query puts on padding tokens (the bottom/right fill up to whole windows) is not on the grid, so
a padded stage's map sums to less than one. Rollout, flow and the gradient methods would multiply maps of
successive blocks: across patch merging the token grid changes (2 x 2 tokens become one), so no token-to-token
product exists there; they refuse windowed models by name instead (see `vitkit.explain.maps`).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from vitkit.explain._common import eval_mode
from vitkit.models.swin import SwinBlock, window_and_shift, window_partition, window_reverse


def window_blocks(model: nn.Module) -> list[SwinBlock]:
    """The model's windowed-attention blocks in forward order (every stage's, flattened); [] for other families."""
    return [m for m in model.modules() if isinstance(m, SwinBlock)]


def capture_window_attention(model: nn.Module, images: Tensor, block: int) -> tuple[Tensor, tuple[int, int]]:
    """One forward pass keeping block `block`'s window attention.

    Args:
        model: a model with Swin blocks (run in eval mode, without gradients).
        images: normalised float batch (B, C, H, W).
        block: index into `window_blocks(model)`, already normalised (0..depth-1).

    Returns:
        (probabilities (B * windows, heads, w^2, w^2), the block's unpadded stage grid (H_s, W_s)).
    """
    blk = window_blocks(model)[block]
    if blk.attn.capture is not None:
        raise RuntimeError(f"Swin block {block} is already being captured (nested window attention capture)")
    seen: dict[str, object] = {}
    opener = threading.get_ident()  # another thread's forward of the same model meanwhile is not recorded

    def grid(module: nn.Module, args: tuple) -> None:
        if threading.get_ident() == opener:
            seen["grid"] = tuple(args[0].shape[1:3])  # (B, H_s, W_s, C) block input

    def record(module: nn.Module, attn: Tensor) -> None:
        if threading.get_ident() == opener:
            seen["attn"] = attn

    hook = blk.register_forward_pre_hook(grid)
    blk.attn.capture = record
    try:
        with eval_mode(model), torch.no_grad():
            model(images)
    finally:
        hook.remove()
        blk.attn.capture = None
    return seen["attn"], seen["grid"]


def window_query_mean(attn: Tensor, grid: tuple[int, int], window_size: int, shift_size: int) -> Tensor:
    """Head-fused window maps (B * windows, w^2, w^2) -> (B, H_s, W_s): mean over real queries, per real key.

    `window_size` and `shift_size` are the block's configured values; the block's own rule
    (`window_and_shift`) gives the window and shift it used on this grid.
    """
    H, W = grid
    window, shift = window_and_shift(H, W, window_size, shift_size)
    Hp, Wp = H + (window - H % window) % window, W + (window - W % window) % window
    real = torch.zeros(1, Hp, Wp, 1, device=attn.device, dtype=attn.dtype)
    real[:, :H, :W] = 1.0
    if shift:
        real = torch.roll(real, shifts=(-shift, -shift), dims=(1, 2))  # where the block saw each token
    real = window_partition(real, window)[..., 0]  # (windows, w^2)
    B = attn.shape[0] // real.shape[0]
    received = (attn * real.repeat(B, 1)[:, :, None]).sum(dim=1)  # (B * windows, w^2): summed over real queries
    received = window_reverse(received[..., None], window, Hp, Wp)[..., 0]  # (B, Hp, Wp)
    if shift:
        received = torch.roll(received, shifts=(shift, shift), dims=(1, 2))  # back to image positions
    return received[:, :H, :W] / (H * W)  # (B, H_s, W_s)
