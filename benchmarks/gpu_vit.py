"""ViT-B/16 bf16 throughput and MFU on one GPU: inference and training, eager and torch.compile, with and without
token merging (ToMe), against the dense bf16 matmul rate measured in the same run.

One prepared run (about 10 minutes on an H200, compile included). Items run in order of importance; each is wrapped
in try/except (an error is recorded and the run goes on), a global time guard skips what is left past --budget
seconds, and results.json + results.md are rewritten to --out after every item, so a run cut short still leaves
every finished number.

What is measured:
- matmul: bf16 (n x n) @ (n x n), n = 8192; TFLOP/s = 2 n^3 / time (median of repeats).
- inference: `model(x)` under `torch.inference_mode()` with the weights and input cast to bf16 (no autocast; the
  attention runs on SDPA's flash kernel: no mask, head dim 64), batch --infer-batch.
- training: one optimiser step = forward + cross-entropy + backward + fused AdamW on fp32 master weights, forward
  and backward under bf16 autocast (the usual mixed precision), batch --train-batch.
- FLOPs per image: `torch.utils.flop_counter.FlopCounterMode` on the same call (matmuls, the patch convolution and
  SDPA, counted as 2 FLOPs per multiply-add; for training forward + backward). MFU = achieved FLOP/s / the matmul
  rate measured here, and / the nominal 989 TFLOP/s dense bf16 of an H100/H200 SXM. Rows with ToMe give MFU on
  their own (smaller) FLOP count and their speed-up over the unmerged row of the same mode.
- Timing: CUDA-synchronised wall time, warm-up first (which also compiles), the median of --repeats repeats of
  --iters iterations.

Usage (GPU):
    OUT=gpu_out python benchmarks/gpu_vit.py
    python benchmarks/gpu_vit.py --quick        # a tiny ViT on the CPU in seconds (checks the script itself)
    python benchmarks/gpu_vit.py --quick --quick-compile   # the same with the compiled rows (minutes on a CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the repo's vitkit, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vitkit._io import atomic_write_text  # noqa: E402
from vitkit.models import create_model  # noqa: E402

NOMINAL_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (no sparsity), from NVIDIA's data sheet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int, repeats: int) -> dict:
    """Median seconds per call of `fn` over `repeats` runs of `iters` calls, after `warmup` calls."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - t) / iters)
    return {"s_per_iter": statistics.median(times), "all_s": times, "warmup_s": warm_s}


class Results:
    """Rows plus run facts, written to results.json and results.md after every item."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.meta = meta
        self.items: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.items.append(row)
        self.flush()
        status = row.get("error") or row.get("skipped") or ""
        print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "all_s")}), status[:200], flush=True)

    def matmul_tflops(self) -> float | None:
        for r in self.items:
            if r["item"] == "matmul" and "tflops" in r:
                return r["tflops"]
        return None

    def flush(self) -> None:
        atomic_write_text(self.out / "results.json", json.dumps({"meta": self.meta, "items": self.items}, indent=2))
        atomic_write_text(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [
            f"# ViT GPU benchmark ({m['device_name']}, torch {m['torch']}, {m['started']})",
            "",
            f"model {m['model']} at {m['img_size']} px; inference batch {m['infer_batch']} (bf16 weights), training "
            f"batch {m['train_batch']} (bf16 autocast, fused AdamW); nominal peak {NOMINAL_TFLOPS:.0f} TFLOP/s.",
            "",
        ]
        mm = self.matmul_tflops()
        lines.append(f"measured bf16 matmul rate: {mm:.4g} TFLOP/s" if mm else "measured bf16 matmul rate: n/a")
        lines += [
            "",
            "| item | mode | tome r | img/s | GFLOP/img | TFLOP/s | MFU (measured mm) | MFU (nominal) | speed-up | "
            "note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.items:
            if r["item"] == "matmul":
                continue
            note = r.get("error") or r.get("skipped") or f"warm-up {r.get('warmup_s', 0):.0f} s"

            def f(key, fmt, r=r):
                v = r.get(key)
                return format(v, fmt) if isinstance(v, (int, float)) else "-"

            lines.append(
                f"| {r['item']} | {r.get('mode', '-')} | {r.get('tome', '-')} | {f('img_s', '.0f')} | "
                f"{f('gflop_per_img', '.2f')} | {f('tflops', '.4g')} | {f('mfu_measured', '.1%')} | "
                f"{f('mfu_nominal', '.1%')} | {f('speedup', '.2f')} | {note.splitlines()[0][:120]} |"
            )
        return "\n".join(lines) + "\n"


def matmul_rate(device: torch.device, n: int, iters: int, repeats: int) -> dict:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timed(lambda: torch.mm(a, b), device, warmup=3, iters=iters, repeats=repeats)
    return {"n": n, "tflops": 2 * n**3 / t["s_per_iter"] / 1e12, **t}


def build(args, device: torch.device, tome: int, train: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size, **({"depth": 2} if args.quick else {}))
    model.set_tome(tome)
    if train:
        return model.to(device).train()
    return model.to(device=device, dtype=torch.bfloat16).eval()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def inference_item(args, device, tome: int, compiled: bool) -> dict:
    model = build(args, device, tome, train=False)
    B = args.infer_batch
    x = torch.randn(B, 3, args.img_size, args.img_size, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        flops = count_flops(lambda: model(x[:2])) / 2  # eager count, per image
        run = torch.compile(model, mode=args.compile_mode) if compiled else model
        t = timed(lambda: run(x), device, args.warmup, args.iters, args.repeats)
    return {"flops_per_img": flops, "img_s": B / t["s_per_iter"], **t}


def training_item(args, device, tome: int, compiled: bool) -> dict:
    model = build(args, device, tome, train=True)
    B = args.train_batch
    x = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16

    def fwd_bwd(m, xb, yb):
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(m(xb), yb)
        loss.backward()

    flops = count_flops(lambda: fwd_bwd(model, x[:2], y[:2])) / 2
    opt.zero_grad(set_to_none=True)
    run = torch.compile(model, mode=args.compile_mode) if compiled else model

    def step():
        fwd_bwd(run, x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(step, device, args.warmup, args.iters, args.repeats)
    return {"flops_per_img": flops, "img_s": B / t["s_per_iter"], **t}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2-block ViT-Ti/16 at 64 px on the CPU, small batches")
    p.add_argument("--out", default=os.environ.get("OUT", "./gpu_out"), help="results folder ($OUT, ./gpu_out)")
    p.add_argument("--budget", type=float, default=480.0, help="skip items that would start after this many seconds")
    p.add_argument("--compile-reserve", type=float, default=90.0, help="seconds a compiled row may take (guard)")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--infer-batch", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--tome", type=int, nargs="+", default=[8, 16], help="ToMe r values besides 0")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune ...)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--quick-compile", action="store_true", help="with --quick, also the compiled rows (minutes)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    start = time.perf_counter()
    if args.quick:
        args.model, args.img_size, args.infer_batch, args.train_batch = "vit_tiny_patch16_224", 64, 4, 4
        args.tome, args.matmul_n, args.warmup, args.iters, args.repeats = [2], 256, 1, 1, 2
        args.no_compile = args.no_compile or not args.quick_compile  # CPU compilation takes minutes
        device = torch.device("cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # irrelevant to bf16; keeps any fp32 leftovers on tensor cores
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": args.model,
        "img_size": args.img_size,
        "infer_batch": args.infer_batch,
        "train_batch": args.train_batch,
        "compile_mode": args.compile_mode,
        "budget_s": args.budget,
        "quick": args.quick,
        "sdpa_flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "cuda": torch.version.cuda,
    }
    res = Results(Path(args.out), meta)

    # Order = importance: a run cut short by the time guard keeps the headline rows.
    plan: list[tuple[str, str, int]] = [("matmul", "-", 0)]
    # Eager rows take seconds, compiled ones up to a minute or two each (compilation): all eager rows first.
    for r in [0, *args.tome]:
        plan += [("inference", "eager", r), ("training", "eager", r)]
    if not args.no_compile:
        for r in [0, *args.tome]:
            plan += [("inference", "compile", r), ("training", "compile", r)]
    base: dict[tuple[str, str], float] = {}  # (item, mode) -> img/s without merging
    for item, mode, r in plan:
        row = {"item": item, "mode": mode, "tome": r}
        elapsed = time.perf_counter() - start
        # A compiled row may spend a minute or more compiling: it must start early enough to end near the budget.
        limit = args.budget - (args.compile_reserve if mode == "compile" else 0)
        if elapsed > limit:
            res.add({**row, "skipped": f"time guard: {elapsed:.0f} s elapsed > {limit:.0f} s"})
            continue
        try:
            if item == "matmul":
                row.update(matmul_rate(device, args.matmul_n, iters=20 if not args.quick else 2, repeats=args.repeats))
            else:
                fn = inference_item if item == "inference" else training_item
                row.update(fn(args, device, r, compiled=mode == "compile"))
                flop_s = row["flops_per_img"] * row["img_s"]
                row["gflop_per_img"] = row["flops_per_img"] / 1e9
                row["tflops"] = flop_s / 1e12
                mm = res.matmul_tflops()
                row["mfu_measured"] = flop_s / (mm * 1e12) if mm else None
                row["mfu_nominal"] = flop_s / (NOMINAL_TFLOPS * 1e12)
                if r == 0:
                    base[(item, mode)] = row["img_s"]
                elif (item, mode) in base:
                    row["speedup"] = row["img_s"] / base[(item, mode)]
                if device.type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as e:  # record and go on: one failing row must not cost the others
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-4000:]
        finally:
            row["elapsed_s"] = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            torch._dynamo.reset()  # each compiled row compiles its own model; do not pile up caches
        res.add({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    print(res.markdown())
    print(f"wrote {res.out / 'results.json'} and {res.out / 'results.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
