"""Saliency maps for ViT classifiers: raw attention, attention rollout and flow, gradient-weighted rollout, relevance.

Every method runs one forward pass (and at most one backward pass) over a batch and returns one map per image on
the model's patch grid, shape (B, H', W'), float, on the model's device; `upsample_to=(H, W)` resizes it to pixels.

Token layout is the model's: [class, distillation, registers..., patches...]. Rollout and relevance propagate
through every token (registers included) and read the class token's row at the patch columns. A pooled model
without a class token has no single query that makes the decision, so its "class row" is the mean of the patch
rows, which is what mean pooling feeds the head.

Attention flow treats the same residual-normalised, head-fused layers as a flow network (Abnar & Zuidema 2020) and
reads, for each input patch, the maximum flow it can send to the class token (or to the mean-pooled output).

Two layers of API: the `*_from_attentions` functions are pure tensor maths on attention maps you already have (the
explorer uses them to build every map from one forward pass); `attention_map`, `attention_rollout`,
`grad_rollout`, `relevance_map` and `explain` take a model and images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.explain._common import (
    Target,
    UnsupportedModelError,
    _check_images,
    _upsample,
    attn_layer_reason,
    eval_mode,
    family_reason,
    resolve_targets,
)
from vitkit.explain.gradcam import grad_cam
from vitkit.explain.windows import capture_window_attention, window_blocks, window_query_mean
from vitkit.layers import attention_layers, capture_attention
from vitkit.models.base import has_class_token, token_patch_size

if TYPE_CHECKING:
    from scipy.sparse import csr_array

Method = Literal["attention", "rollout", "flow", "grad-rollout", "relevance", "gradcam"]
HeadFusion = Literal["mean", "max", "min"]
METHODS: tuple[str, ...] = get_args(Method)
HEAD_FUSIONS: tuple[str, ...] = get_args(HeadFusion)
FLOW_RESOLUTION = 1e-6  # capacity quantum of attention flow: scipy's max-flow needs integer capacities


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------
def check_discard_ratio(discard_ratio: float) -> float:
    """Return `discard_ratio` as a float, or raise a ValueError unless it lies in [0, 1)."""
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)):
        raise TypeError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(
            f"discard_ratio must be in [0, 1) (the fraction of weights dropped per row), got {discard_ratio}"
        )
    return float(discard_ratio)


def check_layer(layer: int, depth: int) -> int:
    """Normalise a layer index (negatives count from the end) or raise a ValueError naming the valid range."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an integer, got {layer!r}")
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is out of range for a model with {depth} blocks (use -{depth}..{depth - 1})")
    return layer % depth


def check_head(head: int | None, num_heads: int) -> int | None:
    """Normalise a head index (None = fuse all heads) or raise a ValueError naming the valid range."""
    if head is None:
        return None
    if isinstance(head, bool) or not isinstance(head, int):
        raise TypeError(f"head must be an integer or None (fuse all heads), got {head!r}")
    if not -num_heads <= head < num_heads:
        raise ValueError(
            f"head {head} is out of range for {num_heads} heads (use -{num_heads}..{num_heads - 1}, or None to fuse "
            "the heads: no --head on the command line)"
        )
    return head % num_heads


def check_attention_model(model: nn.Module, purpose: str = "attention maps, rollout and relevance") -> None:
    """Raise naming the model and what it lacks when it cannot be explained through its attention."""
    name = getattr(model, "model_name", None) or type(model).__name__
    if not attention_layers(model):
        hint = ""
        if window_blocks(model):
            hint = (
                "; products of attention across blocks are not defined across patch merging (the token grid "
                "changes), so only method='attention' (one block's window attention) and 'gradcam' apply"
            )
        why = attn_layer_reason(model) or family_reason(model)
        raise UnsupportedModelError(f"{purpose} need global self-attention; {name} has none{why}{hint}")
    for attr in ("num_prefix_tokens", "patch_grid"):
        if not hasattr(model, attr):
            raise TypeError(
                f"{purpose} need a token sequence [prefix tokens, patches] (`{attr}` in the model contract); "
                f"{name} has no `{attr}`"
            )


# ----------------------------------------------------------------------------------------------------------------
# Pure maths on attention maps (B, heads, N, N)
# ----------------------------------------------------------------------------------------------------------------
def fuse_heads(attn: Tensor, head_fusion: HeadFusion = "mean") -> Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    return attn.amin(dim=1)


def discard_lowest(attn: Tensor, discard_ratio: float, protect: int | None = 0) -> Tensor:
    """Zero the lowest `discard_ratio` fraction of each row of (B, N, N), never touching column `protect`.

    Per row, k = floor(discard_ratio * (number of candidate columns)) weights are zeroed, the candidates being
    every column except `protect` (the class token; None protects nothing). Returns a new tensor.
    """
    discard_ratio = check_discard_ratio(discard_ratio)
    N = attn.shape[-1]
    cols = torch.arange(N, device=attn.device)
    if protect is not None:
        cols = cols[cols != protect]
    k = int(discard_ratio * cols.numel())
    if k == 0:
        return attn.clone()
    vals = attn[..., cols]  # (B, N, candidates), a copy
    lowest = vals.topk(k, dim=-1, largest=False).indices
    vals.scatter_(-1, lowest, 0.0)
    out = attn.clone()
    out[..., cols] = vals
    return out


def _read_class_row(matrix: Tensor, num_prefix_tokens: int, has_class_token: bool) -> Tensor:
    """(B, N, N) token-to-token matrix -> (B, patches): the class token's row (or the mean patch row) at patch columns."""
    P = num_prefix_tokens
    if has_class_token:
        return matrix[:, 0, P:]
    return matrix[:, P:, P:].mean(dim=1)


def _to_grid(flat: Tensor, grid: tuple[int, int]) -> Tensor:
    return flat.reshape(flat.shape[0], grid[0], grid[1])  # (B, H', W')


def attention_from_attentions(
    attn: Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    has_class_token: bool = True,
    head: int | None = None,
    head_fusion: HeadFusion = "mean",
) -> Tensor:
    """Class-token attention of one layer's (B, heads, N, N) map, one head or heads fused -> (B, H', W')."""
    head = check_head(head, attn.shape[1])
    a = fuse_heads(attn, head_fusion) if head is None else attn[:, head]  # (B, N, N)
    return _to_grid(_read_class_row(a, num_prefix_tokens, has_class_token), grid)


def _residual_normalise(a: Tensor) -> Tensor:
    """0.5 * A + 0.5 * I with rows renormalised to sum to one: the attention a token sees through the skip path."""
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    a = 0.5 * a + 0.5 * eye
    return a / a.sum(dim=-1, keepdim=True)


def _rollout_layers(fused: Sequence[Tensor], discard_ratio: float, protect: int | None) -> list[Tensor]:
    """The per-layer (B, N, N) matrices of rollout and flow: lowest weights discarded, residual identity added."""
    return [_residual_normalise(discard_lowest(a, discard_ratio, protect)) for a in fused]


def _rollout(fused: Sequence[Tensor], discard_ratio: float, protect: int | None) -> Tensor:
    """Multiply the `_rollout_layers` matrices in depth order."""
    result = None
    for a in _rollout_layers(fused, discard_ratio, protect):
        result = a if result is None else a @ result  # later layers act on the output of earlier ones
    return result


def rollout_from_attentions(
    attns: Sequence[Tensor],
    grid: tuple[int, int],
    num_prefix_tokens: int,
    has_class_token: bool = True,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of every layer's (B, heads, N, N) map -> (B, H', W').

    Per layer: fuse heads, discard the lowest `discard_ratio` of each row (never the class column), add the
    identity for the residual path (0.5 A + 0.5 I, rows renormalised), then multiply the layers in order.
    """
    fused = [fuse_heads(a, head_fusion) for a in attns]
    protect = 0 if has_class_token else None
    R = _rollout(fused, discard_ratio, protect)
    return _to_grid(_read_class_row(R, num_prefix_tokens, has_class_token), grid)


def check_resolution(resolution: float) -> float:
    """Return `resolution` as a float, or raise unless it lies in [1e-9, 0.1] (the capacity quantum of flow)."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)):
        raise TypeError(f"resolution must be a number in [1e-9, 0.1], got {resolution!r}")
    if not 1e-9 <= resolution <= 0.1:
        raise ValueError(
            f"resolution must be in [1e-9, 0.1] (attention weights are rounded to multiples of it), got {resolution}"
        )
    return float(resolution)


def _flow_graph(layers: Tensor, sinks: Tensor, scale: int) -> tuple[csr_array, int]:
    """The layered flow network of one image as an integer csr_array, and its sink node.

    Node l * N + t is token t after l layers (l = 0 is the input). Token j after layer l feeds token i after layer
    l + 1 with capacity A_{l+1}[i, j] (residual-normalised, heads fused), rounded to multiples of 1 / `scale`. The
    last layer keeps only the edges into the output tokens with a nonzero `sinks` weight, and those tokens feed
    one extra sink node with capacity sinks[t] (one-hot at the class token, or 1 / patches at each patch token
    for a mean-pooled model). Edges that round to zero are left out.

    Args:
        layers: (L, N, N) residual-normalised matrices, rows = receiving token, in depth order.
        sinks: (N,) weight of each output token in what the head reads (sums to one).
        scale: capacities are round(weight * scale).
    """
    from scipy.sparse import csr_array  # scipy (a scikit-learn dependency) is imported only when flow runs

    L, N, _ = layers.shape
    cap = torch.round(layers.double() * scale).to(torch.int64)  # (L, N, N)
    cap[-1, sinks == 0] = 0  # output tokens the head does not read carry no flow to the sink
    layer, dst, src = cap.nonzero(as_tuple=True)
    rows = [(layer * N + src).numpy()]
    cols = [((layer + 1) * N + dst).numpy()]
    vals = [cap[layer, dst, src].numpy()]
    sink = (L + 1) * N
    out = sinks.nonzero(as_tuple=True)[0]
    rows.append((L * N + out).numpy())
    cols.append(np.full(out.numel(), sink))
    vals.append(torch.round(sinks[out].double() * scale).to(torch.int64).numpy())
    graph = csr_array(
        (np.concatenate(vals).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(sink + 1, sink + 1),
    )
    return graph, sink


def flow_from_attentions(
    attns: Sequence[Tensor],
    grid: tuple[int, int],
    num_prefix_tokens: int,
    has_class_token: bool = True,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    resolution: float = FLOW_RESOLUTION,
) -> Tensor:
    """Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") -> (B, H', W').

    The layers are those of rollout (heads fused, lowest `discard_ratio` of each row dropped, 0.5 A + 0.5 I with
    rows renormalised), read as a flow network whose capacities are the edge weights (see `_flow_graph`). A
    patch's value is the maximum flow from that input token to the output the head reads: the class token after
    the last layer, or, for a model without a class token, a sink fed by every output patch token through a
    capacity of 1 / patches (its weight in the mean pool). Values lie in [0, 1]; rollout sums the products along
    all paths, flow is limited by the narrowest cut. With one layer and a class token the two are equal.

    Capacities must be integers for scipy's max-flow (`scipy.sparse.csgraph.maximum_flow`, Dinic): weights are
    rounded to multiples of `resolution`, so each value is exact to within (tokens + 1) * resolution / 2.
    One max-flow per patch and image runs on the CPU (see docs/explain.md for timings).
    """
    from scipy.sparse.csgraph import maximum_flow

    resolution = check_resolution(resolution)
    scale = round(1.0 / resolution)
    fused = [fuse_heads(a, head_fusion) for a in attns]
    protect = 0 if has_class_token else None
    layers = torch.stack(_rollout_layers(fused, discard_ratio, protect), dim=1)
    layers = layers.detach().float().cpu()  # (B, L, N, N)
    B, L, N, _ = layers.shape
    P = num_prefix_tokens
    sinks = torch.zeros(N)
    if has_class_token:
        sinks[0] = 1.0
    else:
        sinks[P:] = 1.0 / (N - P)
    out = torch.zeros(B, N - P, dtype=torch.float64)
    for b in range(B):
        graph, sink = _flow_graph(layers[b], sinks, scale)
        for k, j in enumerate(range(P, N)):
            out[b, k] = maximum_flow(graph, j, sink).flow_value / scale  # node j = input token j
    return _to_grid(out.to(device=attns[0].device, dtype=attns[0].dtype), grid)


def grad_rollout_from_attentions(
    attns: Sequence[Tensor],
    grads: Sequence[Tensor],
    grid: tuple[int, int],
    num_prefix_tokens: int,
    has_class_token: bool = True,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Tensor:
    """Gradient-weighted rollout: rollout of max(fuse_heads(A * dA), 0) -> (B, H', W').

    The gradient of the target logit with respect to each attention weight keeps the weights that push the
    target class up; the rest of the recipe is `rollout_from_attentions`.
    """
    fused = [fuse_heads(a * g, head_fusion).clamp(min=0) for a, g in zip(attns, grads, strict=True)]
    protect = 0 if has_class_token else None
    R = _rollout(fused, discard_ratio, protect)
    return _to_grid(_read_class_row(R, num_prefix_tokens, has_class_token), grid)


def relevance_from_attentions(
    attns: Sequence[Tensor],
    grads: Sequence[Tensor],
    grid: tuple[int, int],
    num_prefix_tokens: int,
    has_class_token: bool = True,
) -> Tensor:
    """Gradient x attention relevance (Chefer et al. 2021, "Generic Attention-model Explainability") -> (B, H', W').

    R starts as the identity; for each block in order, R = R + mean_heads((dA * A)^+) @ R. The positive part is
    taken per head before averaging, so heads that argue against the class cannot cancel ones that argue for it.
    """
    R = None
    for a, g in zip(attns, grads, strict=True):
        cam = (g * a).clamp(min=0).mean(dim=1)  # (B, N, N)
        if R is None:
            R = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(cam)
        R = R + cam @ R
    return _to_grid(_read_class_row(R, num_prefix_tokens, has_class_token), grid)


def mean_attention_distance_from_attentions(
    attns: Sequence[Tensor], grid: tuple[int, int], patch_size: int, num_prefix_tokens: int, renormalize: bool = True
) -> Tensor:
    """Mean attention distance in pixels per layer and head, (layers, heads), averaged over queries and images.

    For each query patch: sum over key patches of attention * distance between the two patch centres, as in the
    ViT paper (Fig. 7). Prefix tokens are excluded as queries and keys; with `renormalize` the patch-to-patch
    weights of each query are rescaled to sum to one, so a head that parks its attention on the class token or a
    register is not mistaken for a local one.
    """
    gh, gw = grid
    P = num_prefix_tokens
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    centres = torch.stack([rows, cols], dim=1).float() * patch_size  # (patches, 2) in pixels
    dist = torch.cdist(centres, centres)  # (patches, patches)
    out = []
    for a in attns:
        a = a[:, :, P:, P:].float()  # (B, heads, patches, patches)
        if renormalize:
            a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        d = (a * dist.to(a.device)).sum(dim=-1)  # (B, heads, patches): expected distance per query
        out.append(d.mean(dim=(0, 2)))  # (heads,)
    return torch.stack(out)  # (layers, heads)


# ----------------------------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------------------------
def forward_with_attention(
    model: nn.Module,
    images: Tensor,
    layers: bool | int | Sequence[int] = True,
    target: Target = None,
    need_grads: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor] | None, Tensor]:
    """One forward pass keeping the attention maps, and with `need_grads` one backward pass for their gradients.

    Args:
        model: a ViT-style classifier (it is run in eval mode).
        images: normalised float batch (B, C, H, W) on the model's device.
        layers: which attention layers to keep (True, an index or indices; see `vitkit.layers.capture_attention`).
        target: class per image for the gradients; None = the predicted class.
        need_grads: also return d(target logit)/d(attention) for each kept layer.

    Returns:
        (logits, attentions, gradients or None, targets), everything detached.
    """
    check_attention_model(model)
    _check_images(images)
    with eval_mode(model):
        if not need_grads:
            with torch.no_grad(), capture_attention(model, layers) as rec:
                logits = model(images)
            return logits, rec.maps, None, resolve_targets(target, logits)
        with torch.enable_grad():
            # A leaf that needs a gradient keeps the graph alive even when every parameter is frozen.
            x = images.detach().clone().requires_grad_(True)
            with capture_attention(model, layers) as rec:
                logits = model(x)
            attns = rec.maps
            targets = resolve_targets(target, logits)
            # Images are independent in eval mode, so one backward of the summed target logits gives each image
            # its own gradient. autograd.grad leaves the parameters' .grad untouched.
            score = logits.gather(1, targets[:, None]).sum()
            grads = torch.autograd.grad(score, attns)
    return logits.detach(), [a.detach() for a in attns], [g.detach() for g in grads], targets


def attention_depth(model: nn.Module) -> int:
    """How many blocks `attention_map` can read: global attention layers, else windowed (Swin) blocks, else 0."""
    return len(attention_layers(model)) or len(window_blocks(model))


def _window_attention_map(
    model: nn.Module, images: Tensor, layer: int, head: int | None, head_fusion: HeadFusion
) -> Tensor:
    """`attention_map` of a windowed model: one block's window attention on its stage grid (see explain.windows)."""
    _check_images(images)
    blocks = window_blocks(model)
    layer = check_layer(layer, len(blocks))
    blk = blocks[layer]
    head = check_head(head, blk.attn.num_heads)
    attn, grid = capture_window_attention(model, images, layer)
    a = fuse_heads(attn, head_fusion) if head is None else attn[:, head]  # (B * windows, w^2, w^2)
    return window_query_mean(a, grid, blk.window_size, blk.shift_size)


def _meta(model: nn.Module, images: Tensor) -> tuple[tuple[int, int], int, bool]:
    grid = tuple(model.patch_grid(images.shape[-2], images.shape[-1]))
    return grid, int(model.num_prefix_tokens), has_class_token(model)


def attention_map(
    model: nn.Module,
    images: Tensor,
    layer: int = -1,
    head: int | None = None,
    head_fusion: HeadFusion = "mean",
    upsample_to: tuple[int, int] | None = None,
) -> Tensor:
    """Raw attention from the class token (mean patch query for pooled models) of one layer -> (B, H', W').

    A windowed (Swin) model gives one block's window attention on that block's stage grid (B, H_s, W_s): the mean
    over the stage's query tokens of the attention each token receives, shift undone, padding cut off (see
    `vitkit.explain.windows`); `layer` counts the blocks of all stages in order.

    Args:
        model: a ViT-style classifier, or a Swin.
        images: normalised float batch (B, C, H, W).
        layer: block index, negatives from the end.
        head: one head, or None to fuse all heads with `head_fusion`.
        head_fusion: "mean", "max" or "min" over heads.
        upsample_to: (H, W) to resize the maps to (bilinear), or None for the patch (stage) grid.
    """
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    if not attention_layers(model) and window_blocks(model):
        return _upsample(_window_attention_map(model, images, layer, head, head_fusion), upsample_to)
    check_attention_model(model)
    attn_layers = attention_layers(model)
    layer = check_layer(layer, len(attn_layers))
    check_head(head, attn_layers[layer].num_heads)
    _, attns, _, _ = forward_with_attention(model, images, layers=[layer])
    grid, P, cls = _meta(model, images)
    maps = attention_from_attentions(attns[0], grid, P, cls, head=head, head_fusion=head_fusion)
    return _upsample(maps, upsample_to)


def attention_rollout(
    model: nn.Module,
    images: Tensor,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    upsample_to: tuple[int, int] | None = None,
) -> Tensor:
    """Attention rollout over all blocks -> (B, H', W'). See `rollout_from_attentions`."""
    check_attention_model(model, "rollout maps")
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    check_discard_ratio(discard_ratio)
    _, attns, _, _ = forward_with_attention(model, images, layers=True)
    grid, P, cls = _meta(model, images)
    maps = rollout_from_attentions(attns, grid, P, cls, head_fusion=head_fusion, discard_ratio=discard_ratio)
    return _upsample(maps, upsample_to)


def attention_flow(
    model: nn.Module,
    images: Tensor,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    resolution: float = FLOW_RESOLUTION,
    upsample_to: tuple[int, int] | None = None,
) -> Tensor:
    """Attention flow over all blocks -> (B, H', W'). See `flow_from_attentions`."""
    check_attention_model(model, "attention flow maps")
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    check_discard_ratio(discard_ratio)
    check_resolution(resolution)
    _, attns, _, _ = forward_with_attention(model, images, layers=True)
    grid, P, cls = _meta(model, images)
    maps = flow_from_attentions(
        attns, grid, P, cls, head_fusion=head_fusion, discard_ratio=discard_ratio, resolution=resolution
    )
    return _upsample(maps, upsample_to)


def grad_rollout(
    model: nn.Module,
    images: Tensor,
    target: Target = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    upsample_to: tuple[int, int] | None = None,
) -> Tensor:
    """Gradient-weighted attention rollout for a class (default: the predicted one) -> (B, H', W')."""
    check_attention_model(model, "gradient-weighted rollout maps")
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    check_discard_ratio(discard_ratio)
    _, attns, grads, _ = forward_with_attention(model, images, layers=True, target=target, need_grads=True)
    grid, P, cls = _meta(model, images)
    maps = grad_rollout_from_attentions(
        attns, grads, grid, P, cls, head_fusion=head_fusion, discard_ratio=discard_ratio
    )
    return _upsample(maps, upsample_to)


def relevance_map(
    model: nn.Module, images: Tensor, target: Target = None, upsample_to: tuple[int, int] | None = None
) -> Tensor:
    """Chefer et al. gradient x attention relevance for a class (default: the predicted one) -> (B, H', W')."""
    check_attention_model(model, "relevance maps")
    _, attns, grads, _ = forward_with_attention(model, images, layers=True, target=target, need_grads=True)
    grid, P, cls = _meta(model, images)
    return _upsample(relevance_from_attentions(attns, grads, grid, P, cls), upsample_to)


def mean_attention_distance(model: nn.Module, images: Tensor, renormalize: bool = True) -> Tensor:
    """Mean attention distance in pixels, (layers, heads), averaged over the batch. See the `_from_attentions` form."""
    check_attention_model(model, "mean attention distances")
    _, attns, _, _ = forward_with_attention(model, images, layers=True)
    grid, P, _ = _meta(model, images)
    return mean_attention_distance_from_attentions(attns, grid, token_patch_size(model), P, renormalize=renormalize)


def explain(
    model: nn.Module,
    images: Tensor,
    method: Method = "rollout",
    layer: int | None = None,
    head: int | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    target: Target = None,
    upsample: bool = True,
) -> Tensor:
    """Saliency maps for a batch by any method: (B, H, W) at image size with `upsample`, else (B, H', W').

    Args:
        model: a classifier of the contract: any family for "gradcam"; global self-attention for the others, except
            that "attention" also reads one block of a windowed (Swin) model (see `attention_map`). A segmentation
            model or detector takes "attention", "rollout" and "flow" of its backbone, and a segmentation model
            "gradcam" of the class region (see `vitkit.explain.dense`).
        images: normalised float batch (B, C, H, W) on the model's device.
        method: "attention" (one layer), "rollout", "flow" (attention flow), "grad-rollout", "relevance" or
            "gradcam" (Grad-CAM).
        layer: block for "attention" (None = the last; a Swin's blocks counted over all stages); stage
            (`feature_info` index) for "gradcam" (None = its default, see `gradcam.default_gradcam_layer`).
        head: head for "attention" (None fuses the heads).
        head_fusion: "mean" | "max" | "min" over heads, for "attention", "rollout", "flow" and "grad-rollout".
        discard_ratio: fraction of each row's lowest weights dropped, for the rollouts and flow; in [0, 1).
        target: class per image for the gradient methods (int, one per image, or None for the prediction).
        upsample: resize to the image size (bilinear).
    """
    check_choice("method", method, METHODS)
    _check_images(images)
    size = tuple(images.shape[-2:]) if upsample else None
    from vitkit.explain import dense  # imports this module: a dense model's methods are built on these

    if dense.dense_kind(model) is not None:
        dense.check_dense_method(model, method)
        if method == "gradcam":
            return dense.segmentation_cam(model, images, target=target, layer=layer, upsample_to=size).maps
        return dense.backbone_attention(
            model, images, method, layer=layer, head=head, head_fusion=head_fusion, discard_ratio=discard_ratio,
            upsample_to=size,
        )  # fmt: skip
    if method == "attention":
        layer = -1 if layer is None else layer
        return attention_map(model, images, layer=layer, head=head, head_fusion=head_fusion, upsample_to=size)
    if method == "gradcam":
        return grad_cam(model, images, target=target, layer=layer, upsample_to=size)
    if method == "rollout":
        return attention_rollout(model, images, head_fusion=head_fusion, discard_ratio=discard_ratio, upsample_to=size)
    if method == "flow":
        return attention_flow(model, images, head_fusion=head_fusion, discard_ratio=discard_ratio, upsample_to=size)
    if method == "grad-rollout":
        return grad_rollout(
            model, images, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio, upsample_to=size
        )
    return relevance_map(model, images, target=target, upsample_to=size)
