"""The model table: parameters, GMACs (torch's flop counter, attention included), patch grid and tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.models.registry import create_model, list_models


@dataclass
class ModelRow:
    name: str
    params: int  # with the default 1000-class head
    gmacs: float | None  # multiply-accumulates for one image at the native size, in billions
    img_size: tuple[int, int]
    grid: tuple[int, int]
    tokens: int  # sequence length seen by the blocks (prefix tokens + patches)


def count_gmacs(model: nn.Module, img_size: tuple[int, int]) -> float:
    """GMACs of one forward pass at `img_size`, counted on the meta device (no memory, no compute).

    The explicit attention path is used so the q k^T and attn @ v matmuls are counted: the flop counter does not
    see inside every fused attention kernel.
    """
    x = torch.empty(1, model.cfg.in_chans, *img_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, return_attention=True)
    return counter.get_total_flops() / 2e9


def model_row(name: str, flops: bool = True) -> ModelRow:
    with torch.device("meta"):
        model = create_model(name)
    size = model.cfg.img_size
    grid = model.patch_grid(*size)
    return ModelRow(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        gmacs=count_gmacs(model, size) if flops else None,
        img_size=size,
        grid=grid,
        tokens=model.num_tokens(*size),
    )


def model_table(pattern: str = "*", flops: bool = True) -> list[ModelRow]:
    """One row per registered model matching `pattern`."""
    return [model_row(n, flops) for n in list_models(pattern)]


def format_table(rows: list[ModelRow]) -> str:
    """A markdown table (readable in a terminal, pasteable into docs)."""
    lines = ["| model | params | GMACs | input | grid | tokens |", "|---|---:|---:|---|---|---:|"]
    for r in rows:
        gmacs = f"{r.gmacs:.2f}" if r.gmacs is not None else "-"
        lines.append(
            f"| {r.name} | {r.params / 1e6:.2f}M | {gmacs} | {r.img_size[0]}x{r.img_size[1]} "
            f"| {r.grid[0]}x{r.grid[1]} | {r.tokens} |"
        )
    return "\n".join(lines)
