"""bf16 attention on CPU: PyTorch's fused `scaled_dot_product_attention` kernel against the three-op form
softmax(q k^T / sqrt(d)) v that `vitkit.layers.attention.scaled_dot_product_attention` uses for bf16 on a CPU with
native bf16 (`vitkit.cpu.has_native_bf16()`) below `CPU_HALF_EXPLICIT_MAX_ELEMENTS` attention-matrix elements.

Two tables, both timed in interleaved rounds (fused, explicit, fused, ...; median), in one process that keeps freed
memory (as the `vitkit` command does), with the 2048^2 matmul rates measured in the same run:
1. the attention op alone at ViT shapes (batch, heads, tokens, head width), bf16 and fp32;
2. whole models in bf16 weights, eager and (with --compile) torch.compile, with every attention as the fused kernel
   (threshold 0) or as the three ops (forced with `explicit_attention()`, whatever the CPU; the header says which of
   the two vitkit takes on this CPU). Also the relative error of the features against fp32 for both.

Usage:
    python benchmarks/half_attention_cpu.py                    # ~5 min on 2 cores
    python benchmarks/half_attention_cpu.py --compile          # + compiled rows (a few more minutes)
    python benchmarks/half_attention_cpu.py --quick            # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitkit import allocator
from vitkit._io import atomic_write_text
from vitkit.cpu import has_native_bf16
from vitkit.layers import attention
from vitkit.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import cpu_matmul_rates, matmul_line  # noqa: E402  (benchmarks/models.py, beside this script)

SHAPES = [(1, 6, 50, 64), (16, 6, 50, 64), (1, 6, 197, 64), (16, 6, 197, 64), (1, 12, 197, 64), (16, 12, 197, 64),
          (16, 6, 401, 64), (4, 6, 785, 64), (16, 6, 577, 64), (16, 6, 1025, 64)]  # fmt: skip


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def timed(fns: dict, args: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each fn(*args[name]) over `rounds` interleaved rounds of `calls` calls."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for name, fn in fns.items():
        fn(*args[name])  # warm-up (oneDNN primitives, compilation)
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn(*args[name])
            times[name].append((time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def kernel_rows(args) -> list[dict]:
    rows = []
    with torch.inference_mode():
        for b, h, n, d in args.shapes:
            for dtype in (torch.bfloat16, torch.float32):
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
                fns = {"fused": F.scaled_dot_product_attention, "explicit": explicit}
                t = timed(fns, dict.fromkeys(fns, (q, k, v)), args.rounds, args.calls)
                rows.append({"shape": [b, h, n, d], "dtype": str(dtype).split(".")[-1], "elements": b * h * n * n,
                             "fused_ms": t["fused"] * 1e3, "explicit_ms": t["explicit"] * 1e3,
                             "speedup": t["fused"] / t["explicit"]})  # fmt: skip
                print(rows[-1], flush=True)
    return rows


class Switch(torch.nn.Module):
    """The model with its attention as the fused kernel (the threshold set to 0) or as the three ops (forced with
    `explicit_attention()`, whatever the CPU) for its calls."""

    def __init__(self, model, how: str) -> None:
        super().__init__()
        self.model, self.how = model, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = attention.CPU_HALF_EXPLICIT_MAX_ELEMENTS
        attention.CPU_HALF_EXPLICIT_MAX_ELEMENTS = 0
        try:
            if self.how == "explicit":
                with attention.explicit_attention():
                    return self.model(x)
            return self.model(x)
        finally:
            attention.CPU_HALF_EXPLICIT_MAX_ELEMENTS = before


def model_rows(args) -> list[dict]:
    rows = []
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    with torch.inference_mode():
        for name in args.models:
            torch.manual_seed(0)
            fp32 = create_model(name, img_size=args.img_size, **args.overrides).eval()
            half = create_model(name, img_size=args.img_size, **args.overrides).eval()
            half.load_state_dict(fp32.state_dict())
            half = half.bfloat16()
            x = torch.randn(2, 3, args.img_size, args.img_size)
            ref = fp32.forward_features(x)
            err = {}
            for label in ("fused", "explicit"):
                out = Switch(half.forward_features, label)(x.bfloat16()).float()
                err[label] = ((out - ref).norm() / ref.norm()).item()
            for mode in modes:
                fns = {label: Switch(half, label) for label in ("fused", "explicit")}
                if mode == "compiled":
                    # Each compiled copy traces its own path (the Switch sets it before dynamo reads it).
                    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                    fns = {k: torch.compile(f) for k, f in fns.items()}
                for batch in args.batches:
                    xb = torch.randn(batch, 3, args.img_size, args.img_size, dtype=torch.bfloat16)
                    calls = max(1, args.images // batch)
                    t = timed(fns, dict.fromkeys(fns, (xb,)), args.rounds, calls)
                    rows.append({"model": name, "mode": mode, "batch": batch,
                                 "fused_img_s": batch / t["fused"], "explicit_img_s": batch / t["explicit"],
                                 "speedup": t["fused"] / t["explicit"],
                                 "rel_err_fused": err["fused"], "rel_err_explicit": err["explicit"]})  # fmt: skip
                    print(rows[-1], flush=True)
    return rows


def markdown(res: dict) -> str:
    m = res["meta"]
    native = "yes: vitkit takes the three ops" if m["native_bf16"] else "no: vitkit keeps the fused kernel"
    lines = [f"# bf16 attention on CPU ({m['started']}, torch {m['torch']}, {m['threads']} threads, malloc keep)",
             "", matmul_line(res["matmul"]), "", f"Native bf16 (AVX-512-bf16 or AMX): {native}.", "",
             "| batch, heads, tokens, head width | dtype | B*h*N^2 | fused ms | explicit ms | fused / explicit |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["kernel"]:
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['elements']:.2e} | {r['fused_ms']:.2f} | "
                     f"{r['explicit_ms']:.2f} | {r['speedup']:.2f}x |")  # fmt: skip
    lines += ["", "| model (bf16 weights) | mode | batch | img/s fused | img/s three ops | speed-up | "
              "features rel. error vs fp32: fused / explicit |", "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in res["models"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['fused_img_s']:.1f} | "
                     f"{r['explicit_img_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['rel_err_fused']:.4f} / {r['rel_err_explicit']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224"]
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=16, help="images timed per row per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="calls per kernel row per round")
    p.add_argument("--compile", action="store_true", help="also torch.compile rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/out/half_attention_cpu")
    args = p.parse_args()
    args.shapes, args.overrides, n = SHAPES, {}, 2048
    if args.quick:
        args.shapes, args.models, args.batches, args.img_size = [(2, 3, 50, 16)], ["vit_tiny_patch16_224"], [2], 64
        args.rounds, args.calls, args.images, args.overrides, n = 1, 1, 2, {"depth": 2}, 256
    allocator.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"meta": {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "native_bf16": has_native_bf16(), "args": {k: v for k, v in vars(args).items()}}}  # fmt: skip
    res["matmul"] = {"n": n, **cpu_matmul_rates(n, "_before")}
    res["kernel"] = kernel_rows(args)
    res["models"] = model_rows(args)
    res["matmul"].update(cpu_matmul_rates(n, "_after"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    atomic_write_text(out / "results.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
