"""Axial attention (Ho et al. 2019, "Axial Attention in Multidimensional Transformers"): rows, then columns."""

from __future__ import annotations

import torch

from vitkit.layers.attention import Attention, grid_sides, scaled_dot_product_attention, split_tokens


def axial_masks(
    prefix: int, grid: tuple[int, int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two boolean (N, N) masks that define one axial layer, N = prefix + H'*W' (True = may attend).

    Row step: a prefix query sees every token; a patch query sees the prefix tokens and the patches of its row.
    Column step: a prefix query sees only itself (so its row-step output passes through unchanged); a patch query
    sees the prefix tokens and the patches of its column.
    """
    gh, gw = grid
    n = prefix + gh * gw
    idx = torch.arange(n, device=device)
    patch = idx >= prefix
    row = torch.where(patch, (idx - prefix) // gw, -1)
    col = torch.where(patch, (idx - prefix) % gw, -1)
    to_prefix = ~patch[None, :]  # (1, N): every query may see the prefix keys
    row_mask = ~patch[:, None] | to_prefix | (row[:, None] == row[None, :])  # (N, N)
    col_mask = (~patch[:, None] & (idx[:, None] == idx[None, :])) | (
        patch[:, None] & (to_prefix | (col[:, None] == col[None, :]))
    )  # (N, N)
    return row_mask, col_mask


class AxialAttention(Attention):
    """Axial attention: every patch attends along its row, then along its column, in one layer.

    With the same q and k for both steps (one `qkv` projection, so the state dict equals plain attention's),
    A_row = softmax of q k^T / sqrt(d) over the keys of the query's row, A_col the same over its column, and
    out = A_col (A_row V). After the two steps every patch has (indirectly) seen every patch, and the layer's
    effective map A_col A_row is a full row-stochastic N x N matrix: raw maps, rollout and relevance use it.
    Cost: O(N (H' + W') d) time and O(N (H' + W')) memory per head instead of O(N^2).

    Prefix tokens (class, distillation, registers): a prefix query attends all N tokens in the row step (ordinary
    global attention, so its output equals plain multi-head attention's) and passes through the column step
    unchanged. A patch query sees all prefix keys in both steps: in the row step their values V, in the column
    step their row-step outputs (the prefix tokens' global summaries), normalised together with the row/column
    keys in one softmax.

    Fast path: rows and columns become batches of short sequences, (B, heads * H', P + W', d) and
    (B, heads * W', P + H', d), each through the fused `scaled_dot_product_attention`; no N x N tensor. While a
    capture is attached the layer builds both masked N x N softmaxes, hands A_col A_row to the capture and
    computes the output from that product (dropout then applies to the product, not to each step).

    Args: as `vitkit.layers.Attention` (no options of its own).
    """

    global_attention = True

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """q, k, v (B, heads, N, d) -> (B, heads, N, d); `grid` (H', W') is required."""
        prefix = split_tokens(q.shape[2], grid, "axial")
        gh, gw = grid_sides(grid)
        capture = self.capture
        if capture is not None:
            row_mask, col_mask = axial_masks(prefix, (gh, gw), q.device)
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            a_row = logits.masked_fill(~row_mask, float("-inf")).softmax(dim=-1)
            a_col = logits.masked_fill(~col_mask, float("-inf")).softmax(dim=-1)
            attn = a_col @ a_row  # (B, h, N, N), rows sum to 1
            capture(self, attn)
            return self.attn_drop(attn) @ v
        return self._axial(q, k, v, prefix, gh, gw)

    def _axial(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, gh: int, gw: int) -> torch.Tensor:
        B, h, N, d = q.shape
        p = self.attn_drop.p if self.training else 0.0
        P = prefix
        qx = q[:, :, P:].reshape(B, h, gh, gw, d)  # (B, h, H', W', d)
        kx = k[:, :, P:].reshape(B, h, gh, gw, d)
        vx = v[:, :, P:].reshape(B, h, gh, gw, d)
        kp, vp = k[:, :, :P], v[:, :, :P]  # (B, h, P, d)
        yp = scaled_dot_product_attention(q[:, :, :P], k, v, dropout_p=p) if P else vp  # (B, h, P, d)

        def along(qa: torch.Tensor, ka: torch.Tensor, va: torch.Tensor, vpre: torch.Tensor) -> torch.Tensor:
            # qa, ka, va: (B, h, L, S, d) = L independent lines of S patches; every line also sees the P prefix keys
            L, S = qa.shape[2], qa.shape[3]
            kk = torch.cat([kp.unsqueeze(2).expand(B, h, L, P, d), ka], dim=3)  # (B, h, L, P + S, d)
            vv = torch.cat([vpre.unsqueeze(2).expand(B, h, L, P, d), va], dim=3)  # (B, h, L, P + S, d)
            out = scaled_dot_product_attention(
                qa.reshape(B, h * L, S, d), kk.reshape(B, h * L, P + S, d), vv.reshape(B, h * L, P + S, d), dropout_p=p
            )  # (B, h * L, S, d)
            return out.reshape(B, h, L, S, d)

        y = along(qx, kx, vx, vp)  # rows: (B, h, H', W', d)
        yc = along(qx.transpose(2, 3), kx.transpose(2, 3), y.transpose(2, 3), yp)  # columns: (B, h, W', H', d)
        out = yc.transpose(2, 3).reshape(B, h, gh * gw, d)  # (B, h, H'*W', d)
        return torch.cat([yp, out], dim=2)  # (B, h, N, d)
