"""Cost of each explanation method against a plain forward pass, and of `return_attention` for one layer vs all.

For each model (random weights; the cost does not depend on them) and batch: the best wall time of
  - a plain forward (fused attention everywhere) under no_grad,
  - forward inside a `capture_attention` context for every layer, and forward with return_attention (which uses
    that context) for the last layer and for every layer,
  - each saliency method (attention, rollout, grad-rollout, relevance) through `vitkit.explain.explain`,
    without upsampling,
printed as a markdown table with the ratio to the plain forward.

Usage:
    python benchmarks/explain.py                          # vit_tiny and vit_small at 224, batch 8, CPU (~2-4 min)
    python benchmarks/explain.py --models vit_tiny_patch16_224 --repeats 3
    python benchmarks/explain.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

import vitkit
from vitkit.explain import METHODS, explain
from vitkit.layers import capture_attention


def _once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(name: str, batch: int, repeats: int, device: torch.device) -> list[tuple[str, float]]:
    """Best-of-`repeats` seconds per variant. The variants take turns within each repeat, and the minimum is
    reported, so load from other processes on a shared machine skews every row alike and inflates none."""
    model = vitkit.create_model(name).to(device).eval()
    H, W = model.preprocess.input_size
    x = torch.randn(batch, 3, H, W, device=device)

    def forward(layers):
        def run():
            with torch.no_grad():
                model(x, return_attention=layers)

        return run

    def captured(layers):
        def run():
            with torch.no_grad(), capture_attention(model, layers) as rec:
                model(x)
            return rec.maps

        return run

    variants = {
        "forward (fused attention)": forward(False),
        "capture_attention context, all layers": captured(True),
        "forward + attention of 1 layer": forward([-1]),
        "forward + attention of all layers": forward(True),
        **{f"explain {m}": (lambda m=m: explain(model, x, m, upsample=False)) for m in METHODS},
    }
    for fn in variants.values():  # warm-up
        fn()
    best = {what: float("inf") for what in variants}
    for _ in range(repeats):
        for what, fn in variants.items():
            best[what] = min(best[what], _once(fn, device))
    return list(best.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"batch {args.batch}, {device} ({where}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"best of {args.repeats}\n")  # fmt: skip
    print("| model | what | ms / batch | × plain forward |")
    print("|---|---|---:|---:|")
    for name in args.models:
        rows = bench_model(name, args.batch, args.repeats, device)
        base = rows[0][1]
        for what, seconds in rows:
            print(f"| {name} | {what} | {1000 * seconds:.0f} | {seconds / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
