"""The model table: family, parameters, GMACs (torch's flop counter, attention included), native input, feature
strides, last grid and tokens."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.layers import attention_layers, capture_attention
from vitkit.models.registry import create_model, list_models, model_family


@dataclass
class ModelRow:
    name: str
    family: str
    params: int  # with a 1000-class head, whatever the name's default head
    gmacs: float | None  # multiply-accumulates for one image at the native size, in billions
    img_size: tuple[int, int]
    strides: tuple[int, ...]  # reduction in pixels of each feature_info entry (distinct values, in order)
    grid: tuple[int, int]
    tokens: int | None  # sequence length seen by the blocks (prefix tokens + patches); None for CNNs


def count_gmacs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> float:
    """GMACs of one forward pass at `img_size`, counted on the meta device (no memory, no compute).

    Attention layers are captured (`capture_attention`), which runs them on the explicit path so the q k^T and
    attn @ v matmuls are counted: the flop counter does not see inside every fused attention kernel. Models
    without global attention (CNNs) are counted as they are.
    """
    x = torch.empty(1, in_chans, *img_size, device="meta")
    capture = capture_attention(model, True) if attention_layers(model) else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), capture:
        model(x)
    return counter.get_total_flops() / 2e9


def model_row(name: str, flops: bool = True) -> ModelRow:
    # One head size for every row, so the column compares architectures: most names default to ImageNet's 1000
    # classes, but the small-data ones (vit_hybrid_cnn_*) default to 10.
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    size = tuple(model.preprocess.input_size)
    info = model.feature_info
    reduction = info[-1]["reduction"]
    strides = tuple(dict.fromkeys(int(f["reduction"]) for f in info))  # a ViT's 12 blocks share one stride
    grid = (size[0] // reduction, size[1] // reduction)  # the last feature map (the patch grid for a ViT)
    return ModelRow(
        name=name,
        family=model_family(name),
        params=sum(p.numel() for p in model.parameters()),
        gmacs=count_gmacs(model, size, getattr(model.cfg, "in_chans", 3)) if flops else None,
        img_size=size,
        strides=strides,
        grid=grid,
        tokens=model.num_tokens(*size) if hasattr(model, "num_tokens") else None,
    )


def model_table(pattern: str = "*", flops: bool = True) -> list[ModelRow]:
    """One row per registered model matching `pattern`."""
    return [model_row(n, flops) for n in list_models(pattern)]


def format_table(rows: list[ModelRow]) -> str:
    """A markdown table (readable in a terminal, pasteable into docs)."""
    lines = [
        "| model | family | params | GMACs | input | strides | grid | tokens |",
        "|---|---|---:|---:|---|---|---|---:|",
    ]
    for r in rows:
        gmacs = f"{r.gmacs:.2f}" if r.gmacs is not None else "-"
        lines.append(
            f"| {r.name} | {r.family} | {r.params / 1e6:.2f}M | {gmacs} | {r.img_size[0]}x{r.img_size[1]} "
            f"| {','.join(map(str, r.strides))} | {r.grid[0]}x{r.grid[1]} | {r.tokens if r.tokens is not None else '-'} |"
        )
    return "\n".join(lines)
