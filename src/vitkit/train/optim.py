"""Optimiser, learning-rate schedule and freezing for ViT training.

AdamW with the two conventions every ViT recipe (DeiT, BEiT, MAE, timm) shares:
- no weight decay on norms, biases, position embeddings and prefix tokens (decaying them only hurts);
- optional layer-wise LR decay for fine-tuning: block i gets `lr * layer_decay ** (depth + 1 - (i + 1))`, so layers
  near the input, which hold the most general features, move least.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------------------------
def no_decay_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that must not be weight-decayed: 1-d tensors (norms, biases) and the model's
    `no_weight_decay()` set (position embeddings, class/distillation/register tokens)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or name.split(".")[-1] in skip:
            names.add(name)
    return names


def _is_head(model: nn.Module, name: str) -> bool:
    # The classifier(s), as the model's contract says (`is_classifier`); not the final norm, which shares their
    # layer id.
    if hasattr(model, "is_classifier"):
        return bool(model.is_classifier(name))
    return name.startswith(("head.", "head_dist."))


def require_layer_ids(model: nn.Module, purpose: str) -> int:
    """The model's number of layer ids; a TypeError naming the model and `purpose` when it has no `layer_id`."""
    if not hasattr(model, "layer_id") or not hasattr(model, "num_layer_ids"):
        name = getattr(model, "model_name", None) or type(model).__name__
        raise TypeError(f"{purpose} needs layer ids (the model contract's layer_id/num_layer_ids); {name} has none")
    return int(model.num_layer_ids)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    head_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: (weight decay or none) x (LR scale per layer). Frozen parameters are left out.

    Each group carries `lr_scale`, the factor a schedule multiplies the base LR by (see `WarmupCosine.apply`),
    plus `name` for logging.

    Args:
        model: a vitkit model (for `layer_decay` it needs the contract's `layer_id(name)` and `num_layer_ids`).
        weight_decay: decoupled weight decay for matrices.
        layer_decay: None (off) or a factor in (0, 1]: layer id l of L+1 gets scale `layer_decay ** (L + 1 - l)`
            where L = number of blocks, so the head gets 1 and the embeddings `layer_decay ** (L + 1)`.
        head_lr_mult: extra LR factor on the classifier (useful when fine-tuning a new head).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if head_lr_mult <= 0:
        raise ValueError(f"head_lr_mult must be > 0, got {head_lr_mult}")
    if layer_decay is not None:
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        num_layers = require_layer_ids(model, "layer_decay")  # embeddings, blocks/stages..., head
    skip = no_decay_names(model)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if name in skip else weight_decay
        scale, layer = 1.0, None
        if layer_decay is not None:
            layer = model.layer_id(name)
            scale = layer_decay ** (num_layers - 1 - layer)
        if _is_head(model, name):
            scale *= head_lr_mult
        key = (decay, scale, layer)
        if key not in groups:
            label = f"{'decay' if decay else 'no_decay'}" + (f"_layer{layer}" if layer is not None else "")
            groups[key] = {"params": [], "weight_decay": decay, "lr_scale": scale, "name": label, "param_names": []}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    return list(groups.values())


def setup_optimizer_groups(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    head_lr_mult: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ...)`; each group's `lr` starts at `lr * lr_scale`.

    Args:
        model: the model to optimise (frozen parameters are skipped).
        lr: base learning rate (the head's, before `head_lr_mult`).
        weight_decay: decoupled weight decay; norms, biases, position embeddings and prefix tokens get none.
        layer_decay: layer-wise LR decay factor, or None.
        head_lr_mult: LR factor for the classifier.
        betas: Adam betas.
        eps: Adam epsilon.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(model, weight_decay, layer_decay=layer_decay, head_lr_mult=head_lr_mult)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------
class WarmupCosine:
    """Linear warmup then cosine decay, per optimiser step. A pure function of the step, so resuming needs only
    the step number (no scheduler state to save).

    lr(s) = base * (s + 1) / warmup                                   for s < warmup
    lr(s) = min + (base - min) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2   after

    Args:
        base_lr: peak learning rate, reached at the end of warmup.
        total_steps: optimiser steps in the whole run.
        warmup_steps: steps of linear warmup (0 for none).
        min_lr: floor the cosine decays to.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if min_lr < 0 or min_lr > base_lr:
            raise ValueError(f"min_lr must be in [0, base_lr={base_lr}], got {min_lr}")
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps)
        self.min_lr = float(min_lr)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (s + 1) so the very first step already learns; the last warmup step reaches base_lr.
            return self.base_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR for `step` (base LR x the group's `lr_scale`); returns the base LR."""
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def values(self) -> list[float]:
        """The LR at every step, for plots."""
        return [self(s) for s in range(self.total_steps)]


# ----------------------------------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------------------------------
def check_freeze_layers(model: nn.Module, freeze_layers: int) -> int:
    """Raise naming the value when `freeze_layers` does not fit the model; returns the model's block count."""
    depth = require_layer_ids(model, "freeze_backbone") - 2  # ids: 0 embeddings, 1..depth blocks, depth+1 head
    if isinstance(freeze_layers, bool) or not isinstance(freeze_layers, int) or not 0 <= freeze_layers <= depth:
        raise ValueError(
            f"freeze_layers={freeze_layers!r} must be an integer in 0..{depth} (the model has {depth} blocks)"
        )
    return depth


def freeze_backbone(model: nn.Module, freeze_layers: int = 8) -> int:
    """Freeze the embeddings and the first `freeze_layers` blocks (or stages), by the model's layer ids.

    Parameters with layer id 0 (patch/position embeddings, prefix tokens, a CNN stem) and ids 1..freeze_layers
    (the first blocks) stop training; everything after them (later blocks, final norm, head) stays trainable.
    BatchNorm layers whose parameters are all frozen also keep their running statistics and normalise with them
    in training (as timm's FrozenBatchNorm2d).
    Build the optimiser afterwards: frozen parameters are left out of `param_groups`.

    Args:
        model: any model with the contract's `layer_id(name)` and `num_layer_ids`.
        freeze_layers: how many leading blocks to freeze, 0..num_layer_ids - 2.

    Returns:
        The number of parameters (elements) frozen.
    """
    check_freeze_layers(model, freeze_layers)
    frozen = 0
    for name, p in model.named_parameters():
        if model.layer_id(name) <= freeze_layers and p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    # A frozen BatchNorm must also stop learning its statistics (timm's FrozenBatchNorm2d): it normalises with its
    # running mean and variance even while the rest of the model trains. A pre-hook keeps it in eval mode whatever
    # `model.train()` sets; the module and its state dict keys stay the same, so checkpoints load either way.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            if not getattr(module, "_vitkit_frozen", False):
                module.register_forward_pre_hook(_keep_eval)
                module._vitkit_frozen = True
    return frozen


def _keep_eval(module: nn.Module, inputs: tuple) -> None:
    module.training = False
