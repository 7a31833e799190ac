"""Capturing attention maps without changing any forward signature (vit-pytorch's `Recorder`, kept selective).

    with capture_attention(model, layers=[-1]) as rec:
        logits = model(images)
    rec.maps            # [(B, heads, N, N)] for the requested layers, in layer order

Only the requested layers leave the fused attention kernel while the context is open; the others, and every call
outside the context, run exactly as before. Blocks and attention modules return plain tensors, so forward hooks,
`torch.export` and ONNX see an ordinary model.

The capture is state of the model's modules while the context is open: a forward of the same model in another
thread meanwhile runs the requested layers on the explicit path too (same outputs) but is not recorded; only the
thread that opened the context records. Two captures of one model at once (nested or from two threads) are refused.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's capturable self-attention modules (those with a `capture` slot and an N x N map), in order."""
    return [m for m in model.modules() if hasattr(m, "capture") and getattr(m, "global_attention", False)]


def resolve_layers(layers: bool | int | Sequence[int] | None, depth: int, what: str = "layer") -> list[int]:
    """Normalise a layer request (True = all, an int or a list, negatives from the end) to sorted indices.

    Raises:
        TypeError: an index that is not an int.
        ValueError: an index outside -depth..depth-1, named with the allowed range.
    """
    if layers is None or layers is False:
        return []
    if layers is True:
        return list(range(depth))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"{what} indices must be integers, got {i!r}")
        if not -depth <= i < depth:
            raise ValueError(
                f"{what} index {i} is out of range for a model with {depth} blocks (use -{depth}..{depth - 1})"
            )
        out.append(i % depth)
    return sorted(set(out))


def resolve_intermediates(indices: int | Sequence[int] | None, depth: int, what: str = "block") -> list[int]:
    """The `indices` argument of every `forward_intermediates`: None = all, an int n = the last n, or indices
    (negatives from the end); returns sorted non-negative indices.

    Raises:
        ValueError: an n outside 1..depth, an index out of range, or a request that selects nothing.
    """
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices} asks for the last n {what}s; n must be in 1..{depth}")
        return list(range(depth - indices, depth))
    wanted = resolve_layers(list(indices), depth, what)
    if not wanted:
        raise ValueError(f"indices={list(indices)!r} selects no {what}; give an int n (last n) or {what} indices")
    return wanted


class AttentionRecorder:
    """What `capture_attention` yields: the latest map of each requested layer.

    Attributes:
        layers: the requested layer indices (sorted, non-negative).
    """

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self._maps: dict[int, torch.Tensor] = {}
        self._thread = threading.get_ident()

    def _slot(self, index: int):
        def record(module: nn.Module, attn: torch.Tensor) -> None:
            if threading.get_ident() == self._thread:  # another thread's forward of the same model: not ours
                self._maps[index] = attn

        return record

    @property
    def maps(self) -> list[torch.Tensor]:
        """One (B, heads, N, N) tensor per requested layer, in layer order (from the most recent forward)."""
        missing = [i for i in self.layers if i not in self._maps]
        if missing:
            raise RuntimeError(f"no attention was recorded for layer(s) {missing}: run the model inside the context")
        return [self._maps[i] for i in self.layers]

    def clear(self) -> None:
        self._maps.clear()


@contextlib.contextmanager
def capture_attention(model: nn.Module, layers: bool | int | Sequence[int] = True) -> Iterator[AttentionRecorder]:
    """Record the attention probabilities of chosen layers while the context is open.

    Args:
        model: any vitkit model (or module) whose attention layers have a capture slot.
        layers: True for every layer, an index or indices (negatives from the end) into the model's global
            self-attention layers (for a ViT, its blocks).

    Raises:
        ValueError: the model has no global self-attention (e.g. a CNN), naming the model, or a bad index.
    """
    modules = attention_layers(model)
    if not modules:
        name = getattr(model, "model_name", None) or type(model).__name__
        raise ValueError(
            f"{name} has no global self-attention layer whose N x N map can be captured "
            "(attention maps, rollout and relevance need one)"
        )
    wanted = resolve_layers(layers, len(modules))
    busy = [i for i in wanted if modules[i].capture is not None]
    if busy:
        raise RuntimeError(f"attention layer(s) {busy} are already being captured (nested capture_attention)")
    rec = AttentionRecorder(wanted)
    try:
        for i in wanted:
            modules[i].capture = rec._slot(i)
        yield rec
    finally:
        for i in wanted:
            modules[i].capture = None


def run_with_captures(module: nn.Module, captures: list, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`module(x, *args, **kwargs)` with its attention layers' capture slots set to `captures` for the call (then restored).

    Gradient checkpointing recomputes a block during backward, after `capture_attention` has closed; calling the
    block through this function makes the recomputation take the same attention path as the original forward.
    """
    layers = attention_layers(module)
    before = [m.capture for m in layers]
    try:
        for m, c in zip(layers, captures):
            m.capture = c
        return module(x, *args, **kwargs)
    finally:
        for m, c in zip(layers, before):
            m.capture = c
