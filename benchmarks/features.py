"""Frozen features of a supervised model and of the same architecture at random init, on digits.

For each model:
  - retrieval recall@1 and recall@5: each test image queries an index of the train images (cosine, exact); a query
    is a hit at k when at least one of its k nearest train images has its label,
  - weighted k-NN accuracy on the test split (DINO: k = 20, T = 0.07, train features vote),
  - linear-probe test accuracy (logistic regression on the frozen features, weight decay chosen on val),
printed as a markdown table and written to --out as JSON. The supervised model is the digits default run
(`vitkit train`, recipes/digits.yaml) trained here, or any run/model directory trained on digits given with --run;
the random-init model has the same architecture and preprocessing with freshly initialised weights (seed 0).

Usage:
    python benchmarks/features.py                          # trains the digits default first (50 epochs)
    python benchmarks/features.py --run runs/digits-...    # reuse a trained run: features only
    python benchmarks/features.py --smoke                  # 1 epoch of a 2-block model: checks the script runs
    python benchmarks/features.py --search-timing 100000 1000000 --threads 1   # torch vs FAISS exact search only
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from vitkit.data.inference import load_eval_model
from vitkit.features import extract_features, knn_evaluate, nearest, probe
from vitkit.features.extract import model_and_splits
from vitkit.models.serialization import model_from_config
from vitkit.runs import model_config, resolve_checkpoint

SMOKE = {"epochs": 1, "model_args": {"depth": 2, "embed_dim": 32, "num_heads": 2}}


def train_supervised(out: Path, epochs: int | None, smoke: bool, threads: str) -> Path:
    """The digits default run (optionally shortened), as `vitkit train` makes it."""
    from vitkit.threads import parse_threads
    from vitkit.train import DIGITS_RECIPE, train

    overrides = {"out": str(out), "progress": False, "threads": parse_threads(threads)}
    if smoke:
        overrides.update(SMOKE)
    if epochs:
        overrides["epochs"] = epochs
    summary = train(dict(DIGITS_RECIPE), overrides=overrides, log=lambda m: None)
    print(f"trained {out}: test accuracy {summary['test_acc']:.4f} in {summary['wall_time_s']:.0f} s")
    return out


def random_init_like(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's architecture and preprocessing, with fresh weights (seed 0)."""
    directory = resolve_checkpoint(checkpoint)
    torch.manual_seed(0)
    model = model_from_config(model_config(directory))
    trained, _record = load_eval_model(directory)
    model.preprocess.load_size = trained.preprocess.load_size
    return model.eval()


def recall_at(model: torch.nn.Module, data: str, seed: int, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of test queries against a train index: a hit when any of the k nearest has the query's label."""
    _model, splits, _info = model_and_splits(model, data, seed=seed, device="cpu")
    index = extract_features(model, splits.train, 256)
    queries = extract_features(model, splits.test, 256)
    _scores, ids, _used = nearest(queries.features, index.features, max(ks), backend="torch")
    same = index.labels[ids] == queries.labels[:, None]  # (Q, k)
    return {f"recall@{k}": float(same[:, :k].any(1).float().mean()) for k in ks}


def measure(name: str, model_or_dir, seed: int) -> dict:
    t0 = time.perf_counter()
    model = model_or_dir if isinstance(model_or_dir, torch.nn.Module) else load_eval_model(model_or_dir)[0]
    row = {"model": name, **recall_at(model, "digits", seed)}
    knn = knn_evaluate(model, "digits", seed=seed, device="cpu")
    row["knn_top1"] = knn["top1"]
    lin = probe(model, "digits", seed=seed, device="cpu")
    row.update(probe_val=lin["val_acc"], probe_test=lin["test_acc"], probe_wd=lin["weight_decay"], dim=lin["dim"])
    row["seconds"] = time.perf_counter() - t0
    return row


def search_timing(sizes: list[int], dim: int = 192, k: int = 8, repeats: int = 3) -> list[dict]:
    """Best-of-`repeats` seconds of exact top-k search in torch (chunked) and FAISS (IndexFlatIP) on random unit
    rows, for 1 and 64 queries. The libraries take turns within each repeat, so load from other processes skews
    both alike; FAISS uses as many OpenMP threads as torch has."""
    import torch.nn.functional as F

    from vitkit.features.retrieval import faiss_topk, import_faiss, topk_cosine

    import_faiss().omp_set_num_threads(torch.get_num_threads())
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        index = F.normalize(torch.randn(n, dim, generator=g), dim=1)
        for q in (1, 64):
            queries = F.normalize(torch.randn(q, dim, generator=g), dim=1)
            best = {"torch": float("inf"), "faiss": float("inf")}
            for _ in range(repeats):
                for name, fn in (("torch", topk_cosine), ("faiss", faiss_topk)):
                    t0 = time.perf_counter()
                    fn(queries, index, k)
                    best[name] = min(best[name], time.perf_counter() - t0)
            rows.append({"rows": n, "queries": q, "torch_s": best["torch"], "faiss_s": best["faiss"]})
            print(
                f"| {n:,} | {q} | {torch.get_num_threads()} | {best['torch'] * 1e3:.0f} ms | {best['faiss'] * 1e3:.0f} ms |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a run or model directory trained on digits (skips training)")
    parser.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of the recipe's 50")
    parser.add_argument("--smoke", action="store_true", help="1 epoch of a 2-block model: checks the script runs")
    parser.add_argument("--threads", default="auto", help="CPU threads for training and features (N or auto)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--search-timing", type=int, nargs="+", default=None, metavar="ROWS",
        help="only time exact search, torch vs FAISS's IndexFlatIP, at these index sizes (the FAISS_AUTO_MIN choice)",
    )  # fmt: skip
    args = parser.parse_args()

    from vitkit.threads import parse_threads, set_threads

    set_threads(parse_threads(args.threads), log=print)
    if args.search_timing:
        print("| rows | queries | threads | torch | FAISS IndexFlatIP |\n|---|---|---|---|---|")
        search_timing(args.search_timing)
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else train_supervised(Path(tmp) / "run", args.epochs, args.smoke, args.threads)
        seed = int(model_config(resolve_checkpoint(run)).get("training", {}).get("seed", 0))
        rows = [
            measure("supervised", run, seed),
            measure("random init", random_init_like(run), seed),
        ]
    total = time.perf_counter() - t0
    print(f"\ndigits, seed {seed}: test queries vs train index; k-NN k=20 T=0.07; probe weight decay chosen on val")
    print("| model | dim | recall@1 | recall@5 | k-NN top-1 | probe val | probe test | probe wd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dim']} | {r['recall@1']:.4f} | {r['recall@5']:.4f} | {r['knn_top1']:.4f} | "
            f"{r['probe_val']:.4f} | {r['probe_test']:.4f} | {r['probe_wd']:g} |"
        )
    print(f"\n{total:.0f} s in all on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.out:
        from vitkit._io import atomic_write_text

        record = {"rows": rows, "run": str(args.run) if args.run else "trained here", "smoke": args.smoke,
                  "total_s": total, "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
