"""Token merging (ToMe: Bolya et al. 2023, "Token Merging: Your ViT But Faster") for vitkit's plain ViT blocks.

In every block with r > 0, after the attention, the patch tokens are split alternately into two sets A and B; each
A token is matched to its most similar B token (cosine similarity of the attention keys averaged over heads), and
the r best-matching A tokens are merged into their B partners by a size-weighted average. A token's `size` counts
the original patches it holds; later blocks use proportional attention (log(size) added to the logits of each key),
so a merged key weighs as much as the `size` keys it replaced. Prefix tokens (class, distillation, registers) are
never merged: matching runs on the patch tokens only, and the prefix is carried through unchanged in place.

The matching is a discrete choice made without gradient (as in ToMe); the weighted average and the attention
with the size bias are differentiable, so merging works for training too.

Explanations: while an attention capture is attached (`vitkit.layers.capture_attention`), the runner also tracks
the source matrix S (B, N', N) (ToMe's `trace_source`: S[b, n', t] = 1 when original token t is inside merged
token n') and hands the capture the map unmerged to the original tokens, (B, heads, N, N):
`full[t, u] = A[n'(t), m'(u)] / size[m'(u)]`. A merged query's row is copied to each of its sources, and a merged
key's weight is divided equally among its sources: with proportional attention, a key of size s is exactly s equal
copies of one key, so each copy receives 1/s of the merged weight. Rows still sum to 1. The block then computes its
output from this full map (the same numbers), so relevance gradients reach it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.layers.attention import Attention, scaled_dot_product_attention
from vitkit.layers.block import Block

TomeSetting = int | Sequence[int]


def tome_schedule(r: TomeSetting, depth: int) -> list[int]:
    """The per-block merge counts for a `set_tome` setting: an int r (the same r in every block; 0 = off) or a
    list of `depth` ints (ToMe's decreasing schedules).

    Raises:
        TypeError: r is not an int or a sequence of ints.
        ValueError: a negative count, or a list whose length is not the number of blocks.
    """
    if isinstance(r, bool) or not isinstance(r, (int, Sequence)) or isinstance(r, str):
        raise TypeError(
            f"token merging r must be an int (tokens merged per block, 0 = off) or a list of ints, got {r!r}"
        )
    if isinstance(r, int):
        if r < 0:
            raise ValueError(f"token merging r must be >= 0 (tokens merged per block, 0 = off), got {r}")
        return [r] * depth
    sched = list(r)
    if len(sched) != depth:
        raise ValueError(f"a token merging schedule needs one r per block ({depth}), got {len(sched)}: {sched}")
    for v in sched:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"every r of a token merging schedule must be an int >= 0, got {v!r} in {sched}")
    return sched


def check_tome_blocks(blocks: Sequence[nn.Module], model_name: str, attn_layer: str) -> None:
    """Raise a ValueError unless every block is vitkit's `Block` with plain multi-head attention ("mha").

    Merging needs the keys of a global attention and the freedom to drop tokens from the grid, which windowed,
    axial, local or relative-position variants do not give.
    """
    for blk in blocks:
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ValueError(
                f"token merging (tome) needs vitkit's plain multi-head attention (attn_layer='mha'); {model_name} "
                f"uses attn_layer={attn_layer!r} ({type(getattr(blk, 'attn', blk)).__name__})"
            )


def _bipartite_matching(
    metric: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Indices of ToMe's bipartite soft matching on the patch tokens of `metric` (B, N, d) (prefix excluded).

    Returns (unm_idx (B, Na - r, 1), src_idx (B, r, 1), dst_idx (B, r, 1)) into the A (even) and B (odd) patch
    tokens, or None when nothing can be merged.
    """
    r = min(r, (metric.shape[1] - prefix) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        # fp32: the (Na x Nb) similarity is small, and bf16 would round near-ties (and on CPUs without bf16
        # kernels run a slow generic matmul).
        m = metric[:, prefix:].float()
        m = m / m.norm(dim=-1, keepdim=True)
        a, b = m[:, ::2], m[:, 1::2]  # (B, Na, d), (B, Nb, d)
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) cosine similarities
        node_max, node_idx = scores.max(dim=-1)  # (B, Na) best B partner of each A token
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)  # (B, r, 1)
    return unm_idx, src_idx, dst_idx


def _merge_rows(
    idx: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_tokens: int, prefix: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows a merge moves, for N = `n_tokens` tokens [prefix, patches] and matching indices into the A (even)
    and B (odd) patch tokens: (keep (B, N - r): the row of x each output token starts from, in the output order
    [prefix, unmerged A, every B]; src (B, r): the rows merged away; dst (B, r): their destinations' output rows).
    Tokens and the source matrix merge through the same rows, so they stay in the same order."""
    unm_idx, src_idx, dst_idx = idx
    B, r = src_idx.shape[:2]
    nb = (n_tokens - prefix) // 2
    na = n_tokens - prefix - nb
    keep = torch.cat(
        [
            torch.arange(prefix, device=device).expand(B, prefix),
            prefix + 2 * unm_idx[..., 0],  # unmerged A tokens: patch 2i
            (prefix + 1 + 2 * torch.arange(nb, device=device)).expand(B, nb),  # every B token: patch 2j + 1
        ],
        dim=1,
    )
    return keep, prefix + 2 * src_idx[..., 0], prefix + (na - r) + dst_idx[..., 0]


# Whole rows move through index_select / index_add on (B * N, c): a gather with an index expanded over the channels
# reads one int64 per element, several times slower than the copy itself.
def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows (B, k) of each x (B, N, c) -> (B * k, c)."""
    B, N, c = x.shape
    base = torch.arange(B, device=x.device)[:, None] * N
    return x.reshape(B * N, c).index_select(0, (base + rows).flatten())


def _add_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """In place: values (B * r, c) added to rows (B, r) of `out` (B * M, c), the flattened (B, M, c)."""
    B = rows.shape[0]
    base = torch.arange(B, device=out.device)[:, None] * (out.shape[0] // B)
    out.index_add_(0, (base + rows).flatten(), values)


def _merge(x: torch.Tensor, idx: tuple[torch.Tensor, torch.Tensor, torch.Tensor], prefix: int) -> torch.Tensor:
    """Sum-merge x (B, N, c) with matching indices -> (B, N - r, c) as [prefix, unmerged A, B (with merged A)]."""
    keep, src, dst = _merge_rows(idx, x.shape[1], prefix, x.device)
    out = _take_rows(x, keep)
    _add_rows(out, dst, _take_rows(x, src))
    return out.reshape(x.shape[0], keep.shape[1], x.shape[2])


def _merge_average(
    x: torch.Tensor, size: torch.Tensor | None, idx: tuple[torch.Tensor, torch.Tensor, torch.Tensor], prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: tokens x (B, N, c) with sizes (B, N) (None = all ones) -> (B, N - r, c) in
    `_merge`'s order [prefix, unmerged A, B], and the summed sizes (B, N - r) in fp32.

    The same numbers as `_merge(x * size) / _merge(size)` up to rounding, in two passes over the kept tokens instead
    of six: the kept rows are gathered once; a destination token's new value is its old one times
    size_dst / new_size plus each merged source times size_src / new_size, so only the r sources and their
    destinations need more than a copy (and a scale of 1 leaves every other row as it was).
    """
    B, N, c = x.shape
    keep, src, dst = _merge_rows(idx, N, prefix, x.device)
    w = x.new_ones(B, N, dtype=torch.float32) if size is None else size.float()
    w_keep, w_src = w.gather(1, keep), w.gather(1, src)  # (B, N - r), (B, r)
    new_size = w_keep.scatter_add(1, dst, w_src)  # (B, N - r)
    out = _take_rows(x, keep) * (w_keep / new_size).to(x.dtype).reshape(-1, 1)
    _add_rows(out, dst, _take_rows(x, src) * (w_src / new_size.gather(1, dst)).to(x.dtype).reshape(-1, 1))
    return out.reshape(B, keep.shape[1], c), new_size


def unmerge_attention(attn: torch.Tensor, source: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """A map over merged tokens (B, heads, N', N') -> the map over the original tokens (B, heads, N, N).

    Args:
        attn: attention probabilities between merged tokens.
        source: (B, N', N), 1 where an original token is inside a merged token (each column has one 1).
        size: (B, N') original tokens per merged token (the row sums of `source`).

    A query row is copied to every source of its merged token; a key's weight is split equally among its sources
    (with proportional attention that is exactly the weight each of the `size` identical keys gets). Rows keep
    their sums.
    """
    s = source.to(attn.dtype)[:, None]  # (B, 1, N', N)
    per_key = attn / size.to(attn.dtype)[:, None, None, :]  # (B, h, N', N'): each source's share of a merged key
    return s.transpose(-1, -2) @ (per_key @ s)  # (B, h, N, N)


def _attend(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, source
) -> torch.Tensor:
    """Attention with proportional attention (log(size) on the key logits): q, k, v (B, h, N', d) -> (B, h, N', d)."""
    if size is None:  # nothing merged yet: plain attention (fused, or explicit for a capture)
        return attn.attend(q, k, v)
    bias = size.log().to(q.dtype)[:, None, None, :]  # (B, 1, 1, N')
    capture = attn.capture
    if capture is None:
        p = attn.attn_drop.p if attn.training else 0.0
        return scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    probs = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, h, N', N')
    if source is None:
        capture(attn, probs)
        return attn.attn_drop(probs) @ v
    full = unmerge_attention(probs, source, size)  # (B, h, N, N)
    capture(attn, full)
    s = source.to(v.dtype)[:, None]  # (B, 1, N', N)
    v_full = s.transpose(-1, -2) @ v  # (B, h, N, d): each original token carries its merged token's value
    out_full = attn.attn_drop(full) @ v_full  # (B, h, N, d); equal rows for the sources of one merged query
    return (s @ out_full) / size.to(v.dtype)[:, None, :, None]  # (B, h, N', d): the mean over those equal rows


def tome_block(
    blk: Block,
    x: torch.Tensor,
    size: torch.Tensor | None,
    source: torch.Tensor | None,
    r: int,
    prefix: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pre-norm block with merging after its attention.

    Args:
        blk: a vitkit `Block` with plain `Attention`.
        x: tokens (B, N', C): [prefix tokens, patch tokens].
        size: (B, N') original tokens per token, or None before the first merge (all ones).
        source: (B, N', N) source matrix while tracing (explanations), else None.
        r: tokens to merge in this block (fewer when fewer than 2r patch tokens remain).
        prefix: leading tokens that are never merged.

    Returns:
        (x (B, N' - r, C), size, source) after the block.
    """
    attn = blk.attn
    q, k, v = attn.project_qkv(blk.norm1(x))  # each (B, h, N', d)
    x = x + blk.drop_path1(blk.ls1(attn.project_out(_attend(attn, q, k, v, size, source))))
    idx = _bipartite_matching(k.mean(dim=1), r, prefix) if r > 0 else None  # keys averaged over heads: (B, N', d)
    if idx is not None:
        x, size = _merge_average(x, size, idx, prefix)  # (B, N' - r, C), fp32 sizes (B, N' - r)
        if source is not None:
            source = _merge(source, idx, prefix)  # (B, N' - r, N)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size, source


def run_tome_blocks(
    blocks: Sequence[Block], x: torch.Tensor, schedule: Sequence[int], prefix: int, grad_checkpointing: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run `blocks` on tokens x (B, N, C) merging `schedule[i]` tokens in block i -> tokens (B, N - merged, C)
    and their sizes (B, N - merged): how many original tokens each stands for (None if nothing merged).

    The source matrix is tracked (and captured maps unmerged to (B, heads, N, N)) while any block's attention has
    a capture attached.
    """
    tracing = any(blk.attn.capture is not None for blk in blocks)
    size: torch.Tensor | None = None
    source = None
    if tracing:
        B, N, _ = x.shape
        source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)  # (B, N, N)
    for blk, r in zip(blocks, schedule):
        # Not while tracing: the recomputation in backward would run after the capture has closed.
        if grad_checkpointing and torch.is_grad_enabled() and not tracing:
            x, size, source = checkpoint(tome_block, blk, x, size, source, r, prefix, use_reentrant=False)
        else:
            x, size, source = tome_block(blk, x, size, source, r, prefix)
    return x, size


def apply_tome(model: nn.Module, r: TomeSetting) -> None:
    """`model.set_tome(r)` for any model, or a ValueError naming a model that cannot merge tokens (a CNN, Swin);
    r = 0 is accepted for every model (nothing to turn off). Used by the CLI's `--tome R`."""
    setter = getattr(model, "set_tome", None)
    if setter is None:
        if isinstance(r, int) and not isinstance(r, bool) and r == 0:
            return
        name = getattr(model, "model_name", None) or type(model).__name__
        raise ValueError(
            f"token merging (--tome {r}) needs a plain ViT (global attention over a token sequence); {name} "
            f"({type(model).__name__}) has none"
        )
    setter(r)
