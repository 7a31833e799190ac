"""torch.compile against eager for vitkit models: inference and training img/s, side by side in one run.

Issue 13 asks that compiled paths are never slower than eager. Rows: model x batch x precision x (inference |
training) with eager and compiled timed in interleaved rounds (eager, compiled, eager, ...; median of the rounds),
so load from other work on a shared machine falls on both alike. The dense matmul rates of this run are printed
first: on CPUs without native bf16 kernels (AVX2-only parts) bf16 matmuls crawl, and vitkit computes bf16 linear
layers of inference in fp32 there (`vitkit.layers.linear`), so bf16 rows mean different things on different
machines.

- inference: `model(x)` under `torch.inference_mode()`; precisions fp32 and bf16 (weights and input cast).
- training: one AdamW step (forward, cross-entropy, backward, step) in train mode; precisions fp32 and bf16
  autocast (fp32 weights), as `vitkit train --amp bf16` runs. Compiled = `torch.compile(model)` as the Trainer's
  `--compile` does; the optimizer step stays eager in both.
- Also reported: compile time (first two calls) and whether the compiled model split into more than one graph
  (graph breaks make compiled code slower than it should be; see tests/models/test_compile.py).

Usage:
    python benchmarks/compile_cpu.py                                # ViT-Ti/16 and ViT-S/16, 224 px, batch 1 and 16
    python benchmarks/compile_cpu.py --models vit_nano_patch4_32 --batches 64 --rounds 3 --min-seconds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import matmul_rate  # noqa: E402
from vitkit.models import create_model  # noqa: E402


def graph_count(model: torch.nn.Module, x: torch.Tensor, train: bool) -> int:
    """Graphs dynamo makes of one call (1 = no graph break)."""
    torch._dynamo.reset()
    if train:
        return torch._dynamo.explain(model)(x).graph_count
    with torch.inference_mode():
        return torch._dynamo.explain(model)(x).graph_count


def make_step(model: torch.nn.Module, call, x: torch.Tensor, train: bool, precision: str):
    if not train:

        def infer():
            with torch.inference_mode():
                return call(x)

        return infer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    y = torch.randint(0, model.num_classes, (x.shape[0],))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = F.cross_entropy(call(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--kinds", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per configuration, all rounds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    fp32, bf16 = matmul_rate(torch.float32, "cpu"), matmul_rate(torch.bfloat16, "cpu")
    print(
        f"# torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"threads={torch.get_num_threads()}; native bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
    )
    print(f"# 2048^2 matmul: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    print("| model | batch | kind | precision | eager img/s | compiled img/s | compiled / eager | compile s | graphs |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.models:
        for batch in args.batches:
            for kind in args.kinds:
                train = kind == "training"
                for precision in ("fp32", "bf16-autocast" if train else "bf16"):
                    torch.manual_seed(0)
                    model = create_model(name, num_classes=10).train(train)
                    x = torch.randn(batch, 3, *model.cfg.img_size)
                    if precision == "bf16":
                        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
                    graphs = graph_count(model, x, train)
                    torch._dynamo.reset()
                    compiled = torch.compile(model)
                    fns = {"eager": make_step(model, model, x, train, precision)}
                    fns["compiled"] = make_step(model, compiled, x, train, precision)
                    t0 = time.perf_counter()
                    fns["compiled"](), fns["compiled"]()
                    compile_s = time.perf_counter() - t0
                    fns["eager"]()
                    times = {k: [] for k in fns}
                    for _ in range(args.rounds):
                        for k, fn in fns.items():
                            n, t0 = 0, time.perf_counter()
                            while n < 1 or time.perf_counter() - t0 < args.min_seconds / args.rounds:
                                fn()
                                n += 1
                            times[k].append((time.perf_counter() - t0) / n)
                    e, c = (batch / statistics.median(times[k]) for k in ("eager", "compiled"))
                    row = dict(
                        model=name,
                        batch=batch,
                        kind=kind,
                        precision=precision,
                        eager_img_s=e,
                        compiled_img_s=c,
                        ratio=c / e,
                        compile_s=compile_s,
                        graphs=graphs,
                    )
                    rows.append(row)
                    print(
                        f"| {name} | {batch} | {kind} | {precision} | {e:.1f} | {c:.1f} | {c / e:.2f}x "
                        f"| {compile_s:.0f} | {graphs} |",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(matmul_fp32=fp32, matmul_bf16=bf16, rows=rows), indent=1))


if __name__ == "__main__":
    main()
