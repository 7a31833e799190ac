"""glibc malloc settings against CPU inference speed: the same model in child processes with and without
`GLIBC_TUNABLES` that keep freed memory in the heap.

glibc serves allocations above its mmap threshold (128 KiB at start, raised dynamically up to 32 MiB) with fresh
mmap'd pages and returns freed heap memory above the trim threshold to the OS. A ViT forward allocates activations
of several MiB per layer; when those pages go back to the OS and come again, every forward pays page faults and
the kernel's zeroing of the pages. With `glibc.malloc.mmap_threshold=33554432` (32 MiB, glibc's largest) and a
trim threshold of 4 GiB, freed activations stay in the process for the next layer. Linux with glibc only.
Three settings: "default" (glibc's), "tuned" (the tunables above, read by glibc at process start) and "mallopt"
(`vitkit.allocator.keep_freed_memory()` at run time, after torch is imported: what the `vitkit` command does).

Each setting runs in its own process; the processes alternate over --rounds, and a row's number is the median over
rounds of `batch / seconds per forward` (median of --calls forwards per process). Training rows (--train-models,
batch --train-batch): images per second of an AdamW step (forward, backward, update; bf16 = autocast), median of
--calls steps after one warm-up step. Every process also measures the 2048^2 matmul rates (fp32, bf16).

Usage:
    python benchmarks/malloc_cpu.py                     # ViT-S/B, fp32/bf16, batch 1 and 16, r = 0 and 16; ViT-S training
    python benchmarks/malloc_cpu.py --quick             # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("default", "tuned", "mallopt")
TUNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967295"
ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One process: the matmul rates, then `tome_cpu.throughput`'s rows (eager, one forward per row per round,
    rounds = --calls, so a row is the median of --calls forwards), as one JSON line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import tome_cpu  # benchmarks/tome_cpu.py: ViT-S/B rows at each precision, batch and r
    from models import cpu_matmul_rates
    from vitkit import allocator

    if args.mallopt and not allocator.keep_freed_memory():
        raise SystemExit("mallopt refused the settings (no glibc?)")
    torch.set_num_threads(args.threads)
    rates = cpu_matmul_rates(args.matmul_n)
    args.model_overrides, args.modes, args.rounds, args.images_per_row = args.overrides, ["eager"], args.calls, 1
    rows = tome_cpu.throughput(args)
    print(json.dumps({"matmul": rates, "rows": rows, "train": train_rows(args)}))


def train_rows(args) -> list[dict]:
    """Images per second of a training step (AdamW; bf16 = autocast over fp32 weights) per model and precision."""
    import torch
    import torch.nn.functional as F

    from vitkit.models import create_model

    rows = []
    for name in args.train_models:
        for prec in args.precisions:
            torch.manual_seed(0)
            model = create_model(name, img_size=args.img_size, num_classes=10, **args.overrides).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(args.train_batch, 3, args.img_size, args.img_size)
            y = torch.randint(0, 10, (args.train_batch,))
            times = []
            for i in range(args.calls + 1):  # the first step warms up (allocator, oneDNN, AdamW state)
                t = time.perf_counter()
                with torch.autocast("cpu", torch.bfloat16, enabled=prec == "bf16"):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:
                    times.append(time.perf_counter() - t)
            rows.append({"model": name, "precision": prec, "batch": args.train_batch,
                         "img_s": args.train_batch / statistics.median(times)})  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rs", type=int, nargs="+", default=[0, 16], help="token merging r per block (0 is always added)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--train-models", nargs="*", default=["vit_small_patch16_224"], help="training rows (none: skip)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--settings", nargs="+", default=["default", "tuned", "mallopt"], choices=SETTINGS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/out/malloc_cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mallopt", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.overrides = {}
    if args.quick:
        args.models, args.batches, args.img_size, args.rounds, args.calls = ["vit_tiny_patch16_224"], [2], 64, 1, 1
        args.overrides, args.matmul_n, args.train_batch = {"depth": 2}, 256, 2
        args.train_models = ["vit_tiny_patch16_224"] if args.train_models else []
    args.rs = sorted({0, *args.rs})  # the speed-ups are over r = 0
    if args.child:
        child(args)
        return 0
    argv = [sys.executable, __file__, "--child", "--models", *args.models, "--precisions", *args.precisions,
            "--batches", *map(str, args.batches), "--rs", *map(str, args.rs), "--img-size", str(args.img_size),
            "--calls", str(args.calls), "--threads", str(args.threads), "--matmul-n", str(args.matmul_n),
            "--train-models", *args.train_models, "--train-batch", str(args.train_batch)]  # fmt: skip
    if args.quick:
        argv.append("--quick")
    if "default" not in args.settings:
        args.settings.insert(0, "default")  # the ratios are over glibc's defaults
    runs: dict[str, list[dict]] = {s: [] for s in args.settings}
    for rnd in range(args.rounds):
        for setting in runs:
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if setting == "tuned":
                env["GLIBC_TUNABLES"] = TUNED
            extra = ["--mallopt"] if setting == "mallopt" else []
            res = subprocess.run(argv + extra, env=env, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    lines = [
        f"# glibc malloc settings ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.threads} threads)",
        "",
    ]
    for setting, rs in runs.items():
        mm = [(r["matmul"]["fp32"], r["matmul"]["bf16"]) for r in rs]
        lines.append(
            f"{setting}: 2048^2 matmul GFLOP/s per process, fp32 / bf16: "
            + ", ".join(f"{a:.0f} / {b:.0f}" for a, b in mm)
        )
    others = [s for s in runs if s != "default"]

    def table(key: str, cols: tuple[str, ...]) -> list[str]:
        head = (
            "| " + " | ".join(cols) + " | img/s default | " + " | ".join(f"img/s {s} | {s} / default" for s in others)
        )
        out = ["", head + " |", "|" + "---|" * (len(cols) + 1 + 2 * len(others))]
        for i, row in enumerate(runs["default"][0][key]):
            d = statistics.median(r[key][i]["img_s"] for r in runs["default"])
            cells = [str(row[c]) for c in cols] + [f"{d:.1f}"]
            for s in others:
                t = statistics.median(r[key][i]["img_s"] for r in runs[s])
                cells += [f"{t:.1f}", f"{t / d:.2f}x"]
            out.append("| " + " | ".join(cells) + " |")
        return out

    lines += ["", "Inference:"] + table("rows", ("model", "precision", "batch", "r"))
    if runs["default"][0]["train"]:
        lines += ["", "Training step:"] + table("train", ("model", "precision", "batch"))
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from vitkit._io import atomic_write_text

    atomic_write_text(out / "results.md", text)
    atomic_write_text(out / "results.json", json.dumps(runs, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
