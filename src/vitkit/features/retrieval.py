"""Nearest neighbours by cosine similarity: exact search in torch (chunked matmul + top-k) or FAISS's IndexFlatIP.

Both are exact: on unit-norm rows the inner product is the cosine, and a flat index compares the query with every
row. FAISS (`pip install vitkit[faiss]`) is imported only when it is used.

Which backend `auto` picks: torch, at every index size, because it was the faster one everywhere it was measured
(`python benchmarks/features.py --search-timing`, 2 CPU cores shared with other jobs, 192-dim rows, top-8, one
thread per library, best of 3). `faiss_topk` builds its IndexFlatIP from the features on each call, as `search`
does, and that copy dominates: one query over 100k rows took 40 ms in torch and 281 ms with FAISS, over 1M rows
153 ms vs 2.4 s; 64 queries over 1M rows 2.2 s vs 13.2 s. Even with the index built beforehand, FAISS led only for
single queries with one thread (177 vs 404 ms at 1M rows) and lost with two (548 vs 281 ms). So `FAISS_AUTO_MIN`
is None (auto never switches); set it to a row count where a quiet machine shows FAISS ahead. `backend="faiss"`
forces it; both give the same neighbours (tests/features/test_search.py).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor

from vitkit._validate import check_choice
from vitkit.features.extract import FeatureSet

Backend = Literal["auto", "torch", "faiss"]
FAISS_AUTO_MIN: int | None = None  # rows from which `backend="auto"` uses FAISS; None = never (module docstring)
CHUNK_ROWS = 65_536  # index rows compared per matmul: bounds the (queries, chunk) score block


def check_k(k: int, n: int, what: str = "an index of {n} rows") -> None:
    """Raise a ValueError naming k and `what` (formatted with n) unless 1 <= k <= n, the rows there are to return."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        where = what.format(n=n)
        raise ValueError(f"k={k!r} neighbours is not allowed for {where}; choose 1 <= k <= {n}")


def _check_pair(queries: Tensor, index: Tensor) -> None:
    if queries.ndim != 2 or index.ndim != 2:
        raise ValueError(f"queries and index must be (Q, D) and (N, D), got {tuple(queries.shape)} and "
                         f"{tuple(index.shape)}")  # fmt: skip
    if queries.shape[1] != index.shape[1]:
        raise ValueError(
            f"query features have {queries.shape[1]} dimensions but the index has {index.shape[1]}: they come from "
            "different models"
        )


@torch.no_grad()
def topk_cosine(queries: Tensor, index: Tensor, k: int, chunk: int = CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product in torch, `chunk` index rows at a time.

    Args:
        queries: (Q, D) float, unit-norm rows for cosine scores.
        index: (N, D) float, unit-norm rows.
        k: neighbours per query, 1 <= k <= N.
        chunk: index rows per matmul.

    Returns:
        (scores (Q, k) float32, indices (Q, k) int64), best first.
    """
    _check_pair(queries, index)
    check_k(k, len(index))
    q = queries.float()
    best_s = torch.full((len(q), 0), float("-inf"))
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for start in range(0, len(index), chunk):
        scores = q @ index[start : start + chunk].float().T  # (Q, chunk)
        s, i = scores.topk(min(k, scores.shape[1]), dim=1)
        # Merge this chunk's best with the best so far: only k candidates per query are ever kept.
        s, i = torch.cat([best_s, s.cpu()], 1), torch.cat([best_i, i.cpu() + start], 1)
        s, order = s.topk(min(k, s.shape[1]), dim=1)
        best_s, best_i = s, i.gather(1, order)
    return best_s, best_i


def faiss_topk(queries: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product with FAISS's IndexFlatIP; arguments and result as `topk_cosine`.

    Raises:
        ImportError: faiss is not installed, naming the extra that installs it.
    """
    _check_pair(queries, index)
    check_k(k, len(index))
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(index.shape[1])
    flat.add(index.float().cpu().contiguous().numpy())
    scores, ids = flat.search(queries.float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(ids).long()


def import_faiss():
    """The faiss module, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            f"the FAISS backend needs faiss-cpu: pip install 'vitkit[faiss]' (or pip install faiss-cpu) ({e})"
        ) from None
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
    except ImportError:
        return False
    return True


def choose_backend(backend: Backend, n: int) -> str:
    """The backend `nearest` runs for an index of `n` rows (see the module docstring for `auto`)."""
    check_choice("backend", backend, Backend)
    if backend == "auto":
        use_faiss = FAISS_AUTO_MIN is not None and n >= FAISS_AUTO_MIN and faiss_available()
        return "faiss" if use_faiss else "torch"
    return backend


def nearest(queries: Tensor, index: Tensor, k: int, backend: Backend = "auto") -> tuple[Tensor, Tensor, str]:
    """(scores (Q, k), indices (Q, k), the backend used): exact cosine neighbours of each query row."""
    used = choose_backend(backend, len(index))
    scores, ids = (faiss_topk if used == "faiss" else topk_cosine)(queries, index, k)
    return scores, ids, used


def search(
    images: str | os.PathLike | list[str | os.PathLike],
    index: str | os.PathLike | FeatureSet,
    k: int = 8,
    *,
    checkpoint: str | os.PathLike | None = None,
    backend: Backend = "auto",
    device: str | torch.device | None = "auto",
    sheet: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The `k` images of a feature index nearest to each query image, by cosine similarity.

    Args:
        images: one query image file, or several.
        index: a feature index (FEATS, FEATS.safetensors or FEATS.json written by `vitkit embed`) or a FeatureSet.
        k: neighbours per query, 1 <= k <= rows of the index.
        checkpoint: the model that embeds the queries; None = the checkpoint recorded in the index.
        backend: "torch", "faiss" or "auto" (see the module docstring).
        device: where the model runs ("auto" = cuda when available).
        sheet: write a contact sheet PNG here (the first query and its neighbours with scores and labels).

    Returns:
        {"index", "checkpoint", "backend", "k", "queries": [{"query", "neighbours": [{"rank", "score", "row",
        "item", "label"}]}], "sheet"}; "item" is the path (or dataset[split][index]) of the neighbour.

    Raises:
        FileNotFoundError: the index, the checkpoint or a query image is missing.
        ValueError: k out of range, an index without a recorded checkpoint and none given, or a checkpoint whose
            features have another width than the index's.
    """
    from vitkit.data.inference import load_eval_model
    from vitkit.features.extract import extract_features
    from vitkit.features.store import load_features
    from vitkit.train.distributed import resolve_device

    feats = index if isinstance(index, FeatureSet) else load_features(index)
    check_k(k, len(feats))
    if not feats.normalised:
        raise ValueError("the index holds un-normalised features; cosine search needs an index from `vitkit embed`")
    ckpt = checkpoint if checkpoint is not None else feats.model.get("checkpoint")
    if ckpt is None:
        raise ValueError(f"index {index!r} records no checkpoint: pass checkpoint=... (the model that embedded it)")
    if checkpoint is None and not os.path.exists(ckpt):
        raise FileNotFoundError(
            f"index {index!r} was embedded with checkpoint {ckpt!r}, which no longer exists: pass checkpoint=... "
            "(the same model, moved)"
        )
    model, _record = load_eval_model(ckpt, resolve_device(device))
    if int(model.num_features) != feats.dim:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} gives {model.num_features}-dimensional features but index {index!r} holds "
            f"{feats.dim}-dimensional ones (made by {feats.model.get('checkpoint')!r}); use the checkpoint that "
            "embedded the index"
        )
    query_list = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    q = extract_features(model, query_list, checkpoint=ckpt)
    scores, ids, used = nearest(q.features, feats.features, k, backend)
    queries = []
    for qi, path in enumerate(q.paths):
        neighbours = [
            {"rank": r + 1, "score": float(scores[qi, r]), "row": int(ids[qi, r]), "item": feats.describe(int(ids[qi, r])),
             "label": feats.label_name(int(ids[qi, r]))}
            for r in range(k)
        ]  # fmt: skip
        queries.append({"query": path, "neighbours": neighbours})
    result = {
        "index": None if isinstance(index, FeatureSet) else str(index),
        "checkpoint": str(ckpt),
        "backend": used,
        "k": k,
        "queries": queries,
        "sheet": None,
    }
    if sheet is not None:
        result["sheet"] = str(contact_sheet(q.paths[0], queries[0]["neighbours"], feats, sheet))
    return result


def item_image(feats: FeatureSet, row: int, cache: dict | None = None):
    """The uint8 (H, W, 3) image behind row `row` of a feature set: its file, or its dataset image re-loaded (the
    loaded split is kept in `cache`, when given, for the next row)."""
    from vitkit.data.images import decode_image
    from vitkit.features.extract import SPLIT_SETTINGS, load_splits, split_dataset

    if feats.paths is not None:
        return decode_image(feats.paths[row])
    src = feats.source
    if src.get("kind") != "dataset" or not src.get("spec"):
        raise ValueError(f"row {row} has no file and its dataset is not recorded, so it cannot be shown")
    settings = {k: src.get(k, default) for k, default in SPLIT_SETTINGS.items()}  # older files: the defaults
    key = (src["spec"], src.get("seed", 0), src.get("split"), src.get("load_size"), *settings.values())
    cache = {} if cache is None else cache
    if key not in cache:
        splits = load_splits(src["spec"], seed=src.get("seed", 0), load_size=src.get("load_size"), **settings)
        cache[key] = split_dataset(splits, src["split"])
    image, _label = cache[key][feats.indices[row]]
    return image.permute(1, 2, 0).numpy()


def contact_sheet(
    query: str | os.PathLike, neighbours: list[dict[str, Any]], feats: FeatureSet, path: str | os.PathLike
) -> os.PathLike:
    """Write a one-row PNG: the query, then each neighbour titled with its rank, cosine score and label."""
    from matplotlib.figure import Figure

    from vitkit.data.images import decode_image
    from vitkit.train.plots import _save

    panels = [(decode_image(query), "query")]
    cache: dict = {}
    for nb in neighbours:
        title = f"#{nb['rank']}  {nb['score']:.3f}" + (f"\n{nb['label']}" if nb["label"] is not None else "")
        panels.append((item_image(feats, nb["row"], cache), title))
    fig = Figure(figsize=(1.7 * len(panels), 2.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (image, title) in zip(axes, panels, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    axes[0].set_title("query", fontsize=8, fontweight="bold")
    _save(fig, path)
    return path
