"""Accuracy of every registered attention variant with the same recipe and budget (issue 9).

Each variant trains through `vitkit.train.train` (in-process, the same code as `vitkit train`) with a dataset's
recipe, changed only in `model_args.attn_layer` / `attn_args` and the seed:
- shapes: recipes/shapes.yaml (ViT-nano at 64 px, 8 px patches: an 8 x 8 grid, 40 epochs of 6,400 images),
  --shapes-seeds seeds (default 3);
- digits: recipes/digits.yaml (ViT-nano at 16 px, 4 px patches: a 4 x 4 grid, 50 epochs), --digits-seeds (default 1).
The budget is a fixed number of epochs (the recipe's, or --epochs for every dataset), never wall time, so runs on
different machines are comparable; early stopping is off (patience 0) so every run takes the whole budget. Options a
variant needs on these grids come from OPTIONS (local: 4 x 4 windows, i.e. four windows on the shapes grid and one
on the digits grid) and --options.

Output in --out: one run directory per (dataset, variant, seed) with everything `vitkit train` writes,
results.json (every run's summary fields, rewritten atomically after each run so an interrupted sweep keeps what it
did) and results.md, the Markdown table: mean +- sample std of test accuracy over the seeds, each seed's accuracy,
the change against mha in points, mean wall time per run, parameters. A run directory whose summary.json says
"finished" with the same settings is reused, not retrained (said in the log), so a sweep can be continued.

Usage:
    python benchmarks/attention_accuracy.py                        # every variant, both datasets (hours on a CPU)
    python benchmarks/attention_accuracy.py --device cuda --datasets shapes --variants mha linear local
    python benchmarks/attention_accuracy.py --quick --variants mha # a smoke run: tiny data, 1 epoch, 1 seed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from vitkit._io import atomic_write_text  # noqa: E402
from vitkit.layers import check_layer_args, layer_names  # noqa: E402
from vitkit.train import train  # noqa: E402
from vitkit.train.config import load_recipe  # noqa: E402

RECIPES = {"shapes": ROOT / "recipes" / "shapes.yaml", "digits": ROOT / "recipes" / "digits.yaml"}
DEFAULT_SEEDS = {"shapes": 3, "digits": 1}
OPTIONS: dict[str, dict] = {"local": {"window": 4}}
# --quick: a few seconds per run, only to check the script end to end (the accuracies mean nothing).
QUICK = {"shapes": {"data": "shapes:64", "shapes_size": 32, "img_size": 32, "model_args": {"img_size": 32}},
         "digits": {}}  # fmt: skip
SUMMARY_KEYS = ("test_acc", "best_val_acc", "epochs_run", "wall_time_s", "train_time_s", "num_params", "device")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", help="attn_layer names (default: every registered one)")
    p.add_argument("--datasets", nargs="+", choices=sorted(RECIPES), default=["shapes", "digits"])
    p.add_argument("--shapes-seeds", type=int, default=DEFAULT_SEEDS["shapes"], help="seeds 0..n-1 on shapes")
    p.add_argument("--digits-seeds", type=int, default=DEFAULT_SEEDS["digits"], help="seeds 0..n-1 on digits")
    p.add_argument("--epochs", type=int, help="epochs for every dataset (default: each recipe's)")
    p.add_argument("--options", type=json.loads, default={}, help="JSON {variant: {option: value}} (adds to OPTIONS)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (passed to the trainer)")
    p.add_argument("--threads", help="CPU threads per run: N or auto (the trainer's default)")
    p.add_argument("--out", default="runs/attention_accuracy", help="folder for the runs, results.json, results.md")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 shapes at 32 px / digits, 1 epoch, 1 seed")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (e.g. on a GPU box)")
    p.add_argument("--seed-only", type=int, help=argparse.SUPPRESS)  # one seed: how --jobs starts each run
    args = p.parse_args()
    known = layer_names("attn")
    args.variants = args.variants or known
    bad = [v for v in args.variants if v not in known]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; registered: {', '.join(known)}")
    for name in ("shapes_seeds", "digits_seeds", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.quick:
        args.epochs, args.shapes_seeds, args.digits_seeds = 1, 1, 1
    args.opts = {v: {**OPTIONS.get(v, {}), **args.options.get(v, {})} for v in args.variants}
    for v, o in args.opts.items():
        check_layer_args("attn", v, o)  # a ValueError naming an option the variant does not take
    return args


def run_settings(args: argparse.Namespace, dataset: str, variant: str, seed: int) -> dict:
    """The overrides on top of the dataset's recipe for one run: only the variant, the seed and the budget change."""
    extra = QUICK[dataset] if args.quick else {}
    model_args = {**extra.get("model_args", {}), "attn_layer": variant, "attn_args": args.opts[variant]}
    settings = {**extra, "model_args": model_args, "seed": seed, "device": args.device, "patience": 0}
    settings["progress"] = False
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    if args.threads is not None:
        settings["threads"] = int(args.threads) if args.threads.isdigit() else args.threads
    return settings


def run_parallel(args: argparse.Namespace, seeds: dict[str, int]) -> None:
    """Train every (dataset, variant, seed) in its own process, `args.jobs` at a time (each run's log in
    OUT/logs/); the caller then reads the finished runs back. A run that fails is reported and left out."""
    import concurrent.futures
    import subprocess

    base = [sys.executable, __file__, "--device", args.device, "--out", args.out, "--options", json.dumps(args.options)]
    base += ["--epochs", str(args.epochs)] if args.epochs else []
    base += ["--threads", args.threads] if args.threads else []
    base += ["--quick"] if args.quick else []
    tasks = [(d, v, s) for d in args.datasets for s in range(seeds[d]) for v in args.variants]
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def one(task):
        d, v, s = task
        cmd = base + ["--datasets", d, "--variants", v, f"--{d}-seeds", str(s + 1), "--seed-only", str(s)]
        with open(logs / f"{d}-{v}-seed{s}.log", "w") as log:
            return task, subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode

    print(f"# {len(tasks)} runs, {args.jobs} at a time", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for (d, v, s), rc in pool.map(one, tasks):
            print(f"[{d} {v} seed {s}] {'done' if rc == 0 else f'FAILED (exit {rc}), see {logs}'}", flush=True)


def run_one(args: argparse.Namespace, dataset: str, variant: str, seed: int, train_missing: bool = True) -> dict | None:
    run_dir = Path(args.out) / dataset / variant / f"seed{seed}"
    settings = run_settings(args, dataset, variant, seed)
    done = run_dir / "summary.json"
    marker = run_dir / "bench_settings.json"
    if done.is_file() and marker.is_file() and json.loads(marker.read_text()) == settings:
        summary = json.loads(done.read_text())
        if summary.get("status") == "finished":
            print(f"[{dataset} {variant} seed {seed}] reusing the finished run in {run_dir}", flush=True)
            return summary
    if not train_missing:
        print(f"[{dataset} {variant} seed {seed}] no finished run in {run_dir}: left out of the table", flush=True)
        return None
    print(f"[{dataset} {variant} seed {seed}] training -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    summary = train(str(RECIPES[dataset]), overrides={**settings, "out": str(run_dir)}, log=lambda m: None)
    atomic_write_text(marker, json.dumps(settings, indent=1) + "\n")
    print(f"    test acc {summary['test_acc']:.4f} in {time.perf_counter() - t0:.0f} s", flush=True)
    return summary


def table(rows: list[dict], variants: list[str], datasets: list[str]) -> list[str]:
    lines = [
        "| data | variant | options | params | seeds | test acc (mean +- std) | per seed | vs mha (points) | "
        "time per run (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in datasets:
        mean = {}
        for v in variants:
            mine = [r for r in rows if r["dataset"] == d and r["variant"] == v]
            if mine:
                mean[v] = statistics.fmean(r["test_acc"] for r in mine)
        for v in variants:
            mine = sorted((r for r in rows if r["dataset"] == d and r["variant"] == v), key=lambda r: r["seed"])
            if not mine:
                continue
            accs = [r["test_acc"] for r in mine]
            std = f"{statistics.stdev(accs):.4f}" if len(accs) > 1 else "-"
            delta = "-" if v == "mha" or "mha" not in mean else f"{100 * (mean[v] - mean['mha']):+.1f}"
            lines.append(
                f"| {d} | {v} | {json.dumps(mine[0]['attn_args'])} | {mine[0]['num_params']:,} | {len(accs)} | "
                f"{mean[v]:.4f} +- {std} | {', '.join(f'{a:.4f}' for a in accs)} | {delta} | "
                f"{statistics.fmean(r['wall_time_s'] for r in mine):.0f} |"
            )
    return lines


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    seeds = {"shapes": args.shapes_seeds, "digits": args.digits_seeds}
    if args.jobs > 1:
        run_parallel(args, seeds)
    rows: list[dict] = []
    for dataset in args.datasets:
        recipe = load_recipe(RECIPES[dataset])
        epochs = args.epochs or recipe.get("epochs")
        print(f"# {dataset}: {RECIPES[dataset].name}, {epochs} epochs, seeds 0..{seeds[dataset] - 1}", flush=True)
        wanted = range(seeds[dataset]) if args.seed_only is None else [args.seed_only]
        for seed in wanted:  # seed-major: a cut-short sweep still has every variant at seed 0
            for variant in args.variants:
                summary = run_one(args, dataset, variant, seed, train_missing=args.jobs == 1)
                if summary is None:
                    continue
                rows.append({"dataset": dataset, "variant": variant, "seed": seed, "attn_args": args.opts[variant],
                             **{k: summary.get(k) for k in SUMMARY_KEYS}})  # fmt: skip
                atomic_write_text(out / "results.json", json.dumps(rows, indent=1) + "\n")
    head = [
        f"## Attention variants, same recipe and budget (`benchmarks/attention_accuracy.py"
        f"{' --quick' if args.quick else ''}`, device {rows[0]['device'] if rows else args.device})",
        "",
    ]
    text = "\n".join(head + table(rows, args.variants, args.datasets)) + "\n"
    atomic_write_text(out / "results.md", text)
    print("\n" + text + f"wrote {out / 'results.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
