"""Inference speed of vitkit's Swin, ConvNeXt, ResNet and DeiT-S against transformers on the same weights (issue 8).

For each model a transformers model is built from its config (the standard tiny / 50 settings, 1000 labels, random
init), saved with `save_pretrained` and loaded into vitkit with `vitkit.load_model(dir)`, so both hold the same
weights; the fp32 logits must agree (max |delta| <= 1e-4) before anything is timed. Rows: model x precision x batch,
eager, `torch.inference_mode()`. Precisions: fp32, and bf16 weights (model and input cast with `.to(torch.bfloat16)`,
as the bf16-weights rows of benchmarks/models.py).

DeiT-S (`deit_small_patch16_224`) is transformers' `ViTForImageClassification` with the config of
facebook/deit-small-patch16-224 (width 384, 6 heads, 12 layers, MLP 1536, LayerNorm eps 1e-12, the ViTConfig
default), which `vitkit.load_model` reads as a ViT (the network of vitkit's `deit_small_patch16_224`, whose
parameter count and GMACs the rows use).

Timing: after warm-up calls, each repeat times vitkit and then transformers (at least --min-seconds of calls each),
so load on the machine falls on both alike; a row reports the best repeat of each. `--clock thread` measures the
CPU time of the calling thread (`time.thread_time`) instead of wall time, with one intra-op thread (forced): on a
machine that others share, time spent waiting for a core is then not counted, which keeps ratios stable where wall
times are not; the img/s it reports are per busy core, not throughput. GFLOP/s = 2 x GMACs
(`vitkit.models.summary.count_gmacs`) x img/s, read against the dense matmul rate of the row's dtype measured at the
start of the same run: the best of `a @ b` (benchmarks/models.py's `matmul_rate`) and `F.linear(a, b)`, because on a
CPU without bf16 instructions (AVX2 only) bf16 `a @ b` falls back to a slow kernel while `F.linear`, like the
models' layers, goes to oneDNN. Peak MiB: the working memory of inference above the weights, from the RSS sampler of
benchmarks/models.py (which also pins glibc's mmap threshold; see its docstring), the maximum over the repeats.

Usage:
    python benchmarks/families.py --threads 2 --repeats 3 --min-seconds 1   # RESULTS.md, all 16 rows, ~10 min
    python benchmarks/families.py --threads 2 --bf16-batches 1    # bf16 at batch 1 only (transformers' bf16 is
                                                                  # slow on CPUs without bf16 instructions)
    python benchmarks/families.py --models resnet50 --precisions fp32 --batches 1
    python benchmarks/families.py --clock thread --bf16-batches 1 --repeats 5   # a shared machine: CPU time
"""

from __future__ import annotations

# Imported first: on import it re-executes this script with MALLOC_MMAP_THRESHOLD_ set (see its docstring).
import models as bench  # isort: skip  (benchmarks/models.py, found beside this script)

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import vitkit  # noqa: E402
from vitkit.models.summary import count_gmacs  # noqa: E402

IMG = 224
MODELS = ["swin_tiny_patch4_window7_224", "convnext_tiny", "resnet50", "deit_small_patch16_224"]
# vitkit's registered architecture per row, for the parameter count and GMACs (DeiT-S is ViT-S/16's network).


def hf_model(name: str):
    """A randomly initialised transformers classifier with the architecture of the vitkit model `name`."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        SwinConfig,
        SwinForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    if name == "swin_tiny_patch4_window7_224":
        cfg = SwinConfig(
            image_size=IMG, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7
        )
        cls = SwinForImageClassification
    elif name == "convnext_tiny":
        cfg = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768])
        cls = ConvNextForImageClassification
    elif name == "resnet50":
        cfg = ResNetConfig(
            embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck"
        )
        cls = ResNetForImageClassification
    elif name == "deit_small_patch16_224":
        cfg = ViTConfig(
            image_size=IMG,
            patch_size=16,
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            intermediate_size=1536,
            layer_norm_eps=1e-12,
            qkv_bias=True,
        )
        cls = ViTForImageClassification
    else:
        raise ValueError(f"model {name!r} is not one of {', '.join(MODELS)}")
    cfg.num_labels = 1000
    return cls(cfg).eval()


def twins(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vitkit model, transformers model) with the same weights, checked on the fp32 logits."""
    torch.manual_seed(0)
    hf = hf_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        vk = vitkit.load_model(tmp).eval()
    with torch.device("meta"):
        ref = vitkit.create_model(name)
    n_vk, n_ref = (sum(p.numel() for p in m.parameters()) for m in (vk, ref))
    assert n_vk == n_ref, f"loaded {n_vk:,} parameters, {name} has {n_ref:,}"
    x = torch.randn(2, 3, IMG, IMG)
    with torch.inference_mode():
        ref_logits = hf(pixel_values=x).logits
        delta = (vk(x) - ref_logits).abs().max().item()
    assert delta <= 1e-4, f"{name}: vitkit and transformers logits differ by {delta:.2e} (> 1e-4)"
    print(
        f"# {name}: {n_vk:,} parameters, fp32 max |delta logits| {delta:.1e} "
        f"(max |logit| {ref_logits.abs().max().item():.2f})",
        flush=True,
    )
    return vk, hf


def linear_rate(dtype: torch.dtype, n: int, seconds: float = 2.0, clock=time.perf_counter) -> float:
    """Dense n x n `F.linear` GFLOP/s on `clock`: the kernel path of the models' linear layers."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.nn.functional.linear(a, b)
    iters, t0 = 0, clock()
    while iters < 1 or clock() - t0 < seconds:
        torch.nn.functional.linear(a, b)
        iters += 1
    return 2 * n**3 * iters / (clock() - t0) / 1e9


def timed(fn, x, min_iters: int, min_seconds: float, clock=time.perf_counter) -> tuple[float, float]:
    """(seconds per call on `clock`, peak working memory in MiB) of one block of calls."""
    with bench.PeakRSS() as mem:
        iters, t0 = 0, clock()
        while iters < min_iters or clock() - t0 < min_seconds:
            fn(x)
            iters += 1
        dt = (clock() - t0) / iters
    return dt, mem.delta_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--bf16-batches", nargs="+", type=int, default=None, help="batches for bf16 (default: --batches)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads, the same for every row")
    ap.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall time, or the calling thread's CPU time with 1 thread (for a machine shared with other jobs)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="alternating vitkit/transformers repeats per row")
    ap.add_argument("--min-iters", type=int, default=1)
    ap.add_argument("--min-seconds", type=float, default=0.5, help="per implementation per repeat")
    ap.add_argument(
        "--bf16-matmul-n", type=int, default=1024, help="matrix side of the bf16 matmul rates (slow on AVX2)"
    )
    args = ap.parse_args()
    if args.clock == "thread" and args.threads != 1:
        ap.error(f"--clock thread counts one thread's CPU time, so it needs --threads 1 (got {args.threads})")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    precisions = {"fp32": (torch.float32, 2048), "bf16": (torch.bfloat16, args.bf16_matmul_n)}
    rate = {}
    for p in args.precisions:
        dtype, n = precisions[p]
        mm, lin = bench.matmul_rate(dtype, "cpu", n=n), linear_rate(dtype, n, clock=clock)
        # matmul_rate runs on wall time: with --clock thread only the F.linear rate is on the rows' clock.
        rate[p] = lin if args.clock == "thread" else max(mm, lin)
        print(f"# {p} n={n}: a @ b {mm:.1f} GFLOP/s, F.linear {lin:.1f} GFLOP/s", flush=True)
    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}), "
        f"threads={torch.get_num_threads()}, clock={args.clock}",
        flush=True,
    )
    header = (
        "| model | batch | precision | vitkit img/s | transformers img/s | ratio | vitkit GFLOP/s | % of matmul rate "
        "| vitkit peak MiB | transformers peak MiB |"
    )
    print(header + "\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for name in args.models:
        vk, hf = twins(name)
        with torch.device("meta"):
            gflop_per_img = 2 * count_gmacs(vitkit.create_model(name), (IMG, IMG))
        for precision in args.precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            vk.to(dtype)
            hf.to(dtype)
            fns = {"vitkit": vk, "transformers": lambda x, m=hf: m(pixel_values=x).logits}
            batches = args.bf16_batches if precision == "bf16" and args.bf16_batches else args.batches
            for batch in batches:
                x = torch.randn(batch, 3, IMG, IMG).to(dtype)
                best = {k: (float("inf"), 0.0) for k in fns}
                with torch.inference_mode():
                    for fn in fns.values():
                        fn(x)  # warm-up: oneDNN primitive creation, allocator
                    for _ in range(args.repeats):
                        for impl, fn in fns.items():
                            dt, mib = timed(fn, x, args.min_iters, args.min_seconds, clock)
                            best[impl] = (min(best[impl][0], dt), max(best[impl][1], mib))
                v, h = (batch / best[k][0] for k in ("vitkit", "transformers"))
                gflops = gflop_per_img * v
                line = (
                    f"| {name} | {batch} | {precision} | {v:.2f} | {h:.2f} | {v / h:.2f}x | {gflops:.1f} | "
                    f"{100 * gflops / rate[precision]:.0f}% | {best['vitkit'][1]:.0f} | {best['transformers'][1]:.0f} |"
                )
                print(line, flush=True)


if __name__ == "__main__":
    main()
