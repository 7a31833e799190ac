"""Weighted k-NN classification on frozen features, as DINO evaluates its features (Caron et al. 2021).

Each query takes its k most similar training features (cosine similarity s_j of unit-norm rows), and every
neighbour votes for its own class with weight exp(s_j / T); the class with the largest sum wins. DINO uses k = 20
and T = 0.07 on ImageNet, and so does `vitkit eval --knn` by default.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.features.retrieval import check_k, topk_cosine

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """The weighted vote of each query's k nearest training features.

    Args:
        train_features: (N, D) unit-norm rows.
        train_labels: (N,) class indices in [0, num_classes).
        query_features: (Q, D) unit-norm rows.
        num_classes: number of classes C.
        k: neighbours that vote, 1 <= k <= N.
        temperature: T > 0 in the weight exp(similarity / T).

    Returns:
        (Q, C) float32: for each class, the sum of exp(s_j / T) over the neighbours j of that class.

    Raises:
        ValueError: k out of range, T not positive, labels out of range or mismatched shapes, each named.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a positive number (DINO uses 0.07)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    train_labels = torch.as_tensor(train_labels, dtype=torch.long).reshape(-1)
    if len(train_labels) != len(train_features):
        raise ValueError(f"{len(train_labels)} train labels for {len(train_features)} train features")
    if len(train_labels) and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(f"train labels must lie in 0..{num_classes - 1}, got {int(train_labels.min())}.."
                         f"{int(train_labels.max())}")  # fmt: skip
    check_k(k, len(train_features), "{n} train features")
    sims, idx = topk_cosine(query_features, train_features, k)  # (Q, k) each
    weights = (sims / temperature).exp()  # (Q, k)
    votes = F.one_hot(train_labels[idx], num_classes).float()  # (Q, k, C)
    return (votes * weights[..., None]).sum(dim=1)  # (Q, C)


def knn_predict(train_features: Tensor, train_labels: Tensor, query_features: Tensor, num_classes: int,
                k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:  # fmt: skip
    """The predicted class (Q,) of each query: the argmax of `knn_scores`."""
    return knn_scores(train_features, train_labels, query_features, num_classes, k, temperature).argmax(dim=1)


def knn_evaluate(
    checkpoint: str | os.PathLike | nn.Module,
    data: str | None = None,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    split: str = "test",
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    seed: int | None = None,
) -> dict[str, Any]:
    """k-NN accuracy of a model's frozen features: train-split features vote for each image of `split`.

    Args:
        checkpoint: a run directory (best/), model directory or checkpoint file; or a model (then give `data`).
        data: a `vitkit.data.load_data` spec; None = the data the checkpoint was trained on.
        k: neighbours that vote (DINO: 20); at most the size of the train split.
        temperature: the vote weight's temperature (DINO: 0.07).
        split: the split to classify: "test" (the run's held-out test split on its own data) or "val".
        batch_size: images per forward pass.
        device: where the model runs ("auto" = cuda when available).
        seed: the split seed; None = the checkpoint's training seed.

    Returns:
        {"top1", "top5" (None with 5 classes or fewer), "k", "temperature", "n_train", "n", "data", "split",
        "checkpoint", "seed", "dim"}.
    """
    from vitkit.features.extract import extract_features, model_and_splits

    if split not in ("test", "val"):
        raise ValueError(f"split={split!r} is not allowed for k-NN (the train split is the memory bank); choose "
                         "'test' or 'val'")  # fmt: skip
    model, splits, info = model_and_splits(checkpoint, data, seed=seed, device=device)
    check_k(k, len(splits.train), "a train split of {n} images")
    train = extract_features(model, splits.train, batch_size)
    query = extract_features(model, getattr(splits, split), batch_size)
    if len(query) == 0:
        raise ValueError(f"the {split} split of {info['data']!r} is empty")
    scores = knn_scores(train.features, train.labels, query.features, splits.num_classes, k, temperature)
    labels = query.labels
    top1 = float((scores.argmax(1) == labels).float().mean())
    top5 = None
    if splits.num_classes > 5:
        top5 = float((scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean())
    return {
        "checkpoint": info["checkpoint"], "data": info["data"], "seed": info["seed"], "split": split, "k": k, "temperature": temperature, "n_train": len(train), "n": len(query),
        "dim": train.dim, "top1": top1, "top5": top5,
    }  # fmt: skip
