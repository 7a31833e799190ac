"""Export time per format, and onnxruntime against eager PyTorch throughput with the same weights in one process.

For each model: the time `vitkit.deploy.export_model` takes for ONNX and for torch.export (trace + write), then
images/s at each batch, fp32, for eager vitkit and the ONNX file in onnxruntime (and the torch.export program's
module), interleaved round by round so that a busy machine slows every runner alike; the median round is reported.
The machine's dense fp32 and bf16 matmul rates (the same helper as benchmarks/models.py) are measured in the same
run, so the numbers can be read against what the hardware does. The exported files are checked against eager
(max |delta| at the example size) before they are timed.

Usage:
    python benchmarks/export.py                                   # ViT-S/16 at 224, batch 1 and 16 (~10 min, 2 cores)
    python benchmarks/export.py --models vit_nano_patch4_32 --size 32 --batches 1 2 --rounds 2 --seconds 0.2 \
        --matmul-n 256                                            # a smoke test of the script
    python benchmarks/export.py --json out.json                   # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitkit.deploy.export import check_export, export_model, load_runner
from vitkit.models.registry import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import matmul_rate  # noqa: E402  (benchmarks/models.py, beside this script)


def seconds_per_call(fn, x: torch.Tensor, min_seconds: float) -> float:
    """Mean seconds per call over at least `min_seconds` (and 2 calls), after one warm-up call."""
    fn(x)
    iters, t0 = 0, time.perf_counter()
    while iters < 2 or time.perf_counter() - t0 < min_seconds:
        fn(x)
        iters += 1
    return (time.perf_counter() - t0) / iters


def bench_model(
    name: str, size: int, batches: list[int], rounds: int, seconds: float, out_dir: Path, threads: int
) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(name, img_size=size).eval()
    rows = []
    runners = {}
    export_s = {}
    for fmt, ext in (("onnx", "onnx"), ("torch-export", "pt2")):
        path = out_dir / f"{name}.{ext}"
        result = export_model(model, path, format=fmt, example_size=(size, size))
        export_s[fmt] = result.seconds
        delta = check_export(path, model, [(size, size)], batches=(1,))[(size, size)]
        runners[fmt] = load_runner(path, threads=threads)
        print(f"# {name} {fmt}: exported in {result.seconds:.1f} s, {path.stat().st_size / 2**20:.1f} MiB, "
              f"max |delta| {delta:.2g}", flush=True)  # fmt: skip

    def eager(x):
        with torch.inference_mode():
            return model(x)

    runners = {"eager": eager, "onnxruntime": runners["onnx"], "torch.export": runners["torch-export"]}
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(rounds):  # interleaved: each round times every runner once
            for label, fn in runners.items():
                times[label].append(seconds_per_call(fn, x, seconds))
        med = {k: statistics.median(v) for k, v in times.items()}
        for label, dt in med.items():
            rows.append(
                {
                    "model": name,
                    "size": size,
                    "batch": batch,
                    "runner": label,
                    "img_per_s": batch / dt,
                    "vs_eager": med["eager"] / dt,
                    "export_s": export_s.get({"onnxruntime": "onnx", "torch.export": "torch-export"}.get(label, "")),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per runner per round")
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument(
        "--matmul-n", type=int, default=2048, help="matmul side for the rate (bf16 is slow on CPUs without it)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    peak32, peak16 = matmul_rate(torch.float32, "cpu", args.matmul_n), matmul_rate(torch.bfloat16, "cpu", args.matmul_n)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, onnxruntime {onnxruntime.__version__}")  # fmt: skip
    print(f"# {args.matmul_n}^2 matmul: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(
                name, args.size, args.batches, args.rounds, args.seconds, Path(tmp), torch.get_num_threads()
            )
    print("| model | px | batch | runner | img/s | vs eager | export s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        export = f"{r['export_s']:.1f}" if r["export_s"] is not None else "-"
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['runner']} | {r['img_per_s']:.1f} | "
              f"{r['vs_eager']:.2f}x | {export} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": {"fp32": peak32, "bf16": peak16}, "rows": rows}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
