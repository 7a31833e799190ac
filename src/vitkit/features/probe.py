"""Linear probe: a logistic-regression classifier trained on a frozen model's pooled features.

The probe sees the raw pooled pre-logits features (`forward_head(..., pre_logits=True)`), standardised with the
train split's per-dimension mean and std, and is fitted full-batch with L-BFGS on the cross-entropy plus an L2
penalty (weight_decay / 2) * ||W||^2. The weight decay is chosen from a small grid by validation accuracy (ties:
the lower validation loss), and the test split is classified once, with the chosen probe.

Standardising is affine, so the fitted probe folds exactly into one `nn.Linear(num_features, classes)`:
W' = W / std, b' = b - W' mean. `probe(..., out=DIR)` saves the backbone with that head as an ordinary vitkit model
directory, so `vitkit predict --checkpoint DIR` and `vitkit eval --checkpoint DIR` use the probe as they would
any classifier (the backbone's weights are unchanged).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The grid searched on the val split: decades, as probes usually search. No 0: on separable features the unpenalised
# loss has no minimum (the weights grow without bound) and L-BFGS spends its whole budget chasing it.
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MAX_ITER = 100  # L-BFGS iterations (and twice that many loss evaluations) per fit


@dataclass
class LinearProbe:
    """A fitted probe: logits = ((f - mean) / std) @ weight.T + bias.

    Attributes:
        weight: (C, D) float32.
        bias: (C,) float32.
        mean: (D,) train-split feature mean.
        std: (D,) train-split feature std (clamped away from 0).
        weight_decay: the chosen L2 strength.
        grid: one {"weight_decay", "val_acc", "val_loss", "train_acc"} per value tried.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    weight_decay: float
    grid: list[dict[str, float]] = field(default_factory=list)

    def logits(self, features: Tensor) -> Tensor:
        """(N, D) raw pooled features -> (N, C) logits."""
        x = (features.float() - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def folded(self) -> tuple[Tensor, Tensor]:
        """(weight (C, D), bias (C,)) of the one Linear layer on raw features that gives the same logits."""
        w = self.weight / self.std  # (C, D)
        return w, self.bias - w @ self.mean


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else math.nan


def _fit(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Logistic regression on standardised float64 features x (N, D): (W (C, D), b (C,)) by full-batch L-BFGS."""
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    max_iter: int = MAX_ITER,
) -> LinearProbe:
    """Fit one probe per weight decay on train and keep the best on val.

    Args:
        train_features: (N, D) raw pooled features.
        train_labels: (N,) class indices in [0, num_classes).
        val_features: (M, D) features of the validation split (M >= 1).
        val_labels: (M,) class indices.
        num_classes: C.
        weight_decays: the L2 strengths to try (each >= 0).
        max_iter: L-BFGS iterations per fit.

    Raises:
        ValueError: empty splits, mismatched shapes, labels out of range, or a bad grid, each named.
    """
    if not weight_decays or any(not isinstance(v, (int, float)) or v < 0 for v in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty list of numbers >= 0, got {list(weight_decays)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    for name, f, y in (("train", train_features, train_labels), ("val", val_features, val_labels)):
        if f.ndim != 2 or len(f) == 0 or len(f) != len(y):
            raise ValueError(f"{name} features {tuple(f.shape)} and labels ({len(y)}) must be (N >= 1, D) and (N,)")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    if val_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"val features have {val_features.shape[1]} dims, train features {train_features.shape[1]}")
    x = train_features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    vs = (val_features.double() - mean) / std
    train_y, val_y = train_labels.long(), val_labels.long()
    best = None
    grid = []
    for wd in weight_decays:
        w, b = _fit(xs, train_y, num_classes, float(wd), max_iter)
        val_logits = vs @ w.T + b
        row = {
            "weight_decay": float(wd),
            "val_acc": _accuracy(val_logits, val_y),
            "val_loss": float(F.cross_entropy(val_logits, val_y)),
            "train_acc": _accuracy(xs @ w.T + b, train_y),
        }
        grid.append(row)
        if best is None or (row["val_acc"], -row["val_loss"]) > (best[0]["val_acc"], -best[0]["val_loss"]):
            best = (row, w, b)
    assert best is not None  # the grid is not empty
    row, w, b = best
    return LinearProbe(w.float(), b.float(), mean.float(), std.float(), row["weight_decay"], grid)


def fold_into_model(model: nn.Module, probe: LinearProbe, class_names: Sequence[str]) -> nn.Module:
    """Give `model` a new head computing the probe's logits from its pooled features (in place; returned).

    A DeiT with a distillation head gets the same layer in both heads: it averages their outputs, and its pooled
    features are the average of the two tokens, so the logits stay the probe's.

    Raises:
        ValueError: the probe's width is not the model's feature width, or the class names do not match its classes.
    """
    w, b = probe.folded()
    if w.shape[1] != model.num_features:
        raise ValueError(f"the probe reads {w.shape[1]} features but {type(model).__name__} has {model.num_features}")
    if len(class_names) != w.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a probe with {w.shape[0]} classes")
    model.reset_classifier(int(w.shape[0]))
    heads = [model.get_classifier()]
    if isinstance(getattr(model, "head_dist", None), nn.Linear):
        heads.append(model.head_dist)
    for head in heads:
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{type(model).__name__}'s classifier is {type(head).__name__}, not nn.Linear")
        with torch.no_grad():
            head.weight.copy_(w.to(head.weight))
            head.bias.copy_(b.to(head.bias))
    model.preprocess.class_names = [str(c) for c in class_names]
    return model


def probe(
    checkpoint: str | os.PathLike | nn.Module,
    data: str | None = None,
    *,
    out: str | os.PathLike | None = None,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    max_iter: int = MAX_ITER,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    seed: int | None = None,
) -> dict[str, Any]:
    """Train a linear probe on a model's frozen features (train split), choose its weight decay on val, test it.

    Args:
        checkpoint: a run directory (best/), model directory or checkpoint file; or a model (then give `data`).
        data: a `vitkit.data.load_data` spec; None = the data the checkpoint was trained on (its own test split).
        out: save the backbone with the probe as its head here (a vitkit model directory, written atomically);
            `vitkit predict --checkpoint OUT` and `vitkit eval --checkpoint OUT` then use it. None saves nothing.
        weight_decays: the L2 grid searched on the val split.
        max_iter: L-BFGS iterations per fit.
        batch_size: images per forward pass when extracting features.
        device: where the backbone runs ("auto" = cuda when available).
        seed: the split seed; None = the checkpoint's training seed.

    Returns:
        {"val_acc", "test_acc", "weight_decay", "grid", "n_train", "n_val", "n_test", "dim", "data", "checkpoint",
        "seed", "out"}.

    Raises:
        ValueError: an empty val or test split, or a bad grid.
    """
    from vitkit.features.extract import extract_features, model_and_splits
    from vitkit.runs import is_run_dir, resolve_checkpoint

    if out is not None:
        # The probe replaces a head: never write it over the checkpoint it was fitted on, or into a run (a run's
        # last/ would then resume with the probe's weights under its own optimiser state).
        target = Path(out).resolve()
        source = None if isinstance(checkpoint, nn.Module) else resolve_checkpoint(checkpoint).resolve()
        if target == source or is_run_dir(target) or is_run_dir(target.parent):
            raise ValueError(
                f"out={str(out)!r} is the checkpoint or a training run, or lies inside one; save the probe to a new "
                "folder outside the run"
            )
    model, splits, info = model_and_splits(checkpoint, data, seed=seed, device=device)
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)) == 0:
            raise ValueError(f"the {name} split of {info['data']!r} is empty; the probe needs train, val and test")
    feats = {
        name: extract_features(model, getattr(splits, name), batch_size, normalize=False)
        for name in ("train", "val", "test")
    }
    fitted = fit_linear_probe(
        feats["train"].features, feats["train"].labels, feats["val"].features, feats["val"].labels,
        splits.num_classes, weight_decays, max_iter,
    )  # fmt: skip
    chosen = next(r for r in fitted.grid if r["weight_decay"] == fitted.weight_decay)
    test_acc = _accuracy(fitted.logits(feats["test"].features), feats["test"].labels)
    result = {
        "data": info["data"], "checkpoint": info["checkpoint"], "seed": info["seed"],
        "val_acc": chosen["val_acc"], "test_acc": test_acc, "weight_decay": fitted.weight_decay,
        "grid": fitted.grid, "n_train": len(feats["train"]), "n_val": len(feats["val"]),
        "n_test": len(feats["test"]), "dim": feats["train"].dim, "out": None,
    }  # fmt: skip
    if out is not None:
        # A model passed in stays as it was: the probe goes on a copy.
        head_model = copy.deepcopy(model) if isinstance(checkpoint, nn.Module) else model
        fold_into_model(head_model, fitted, splits.class_names)
        training = {k: info[k] for k in ("data", "seed", "load_size", "val_fraction", "test_fraction", "shapes_size")}
        summary = {k: result[k] for k in ("checkpoint", "val_acc", "test_acc", "weight_decay", "grid")}
        head_model.save_pretrained(out, training=training, probe=summary)
        result["out"] = str(out)
    return result
