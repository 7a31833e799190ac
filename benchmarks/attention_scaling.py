"""Time and peak memory of every registered attention variant against the token count N (issue 9).

Two sweeps over N = H' x W' patch tokens (plus one class token), from 196 (224 px at patch 16) to 16,384 (2048 px):
1. one attention layer (width 192, 3 heads of 64, batch 1, the variant's options from OPTIONS / --options), the
   forward pass under `torch.inference_mode()`, fp32 (and bf16 weights and input with --bf16);
2. a small ViT (vit_tiny_patch16_224's width, --vit-depth blocks, default 2, batch 1) forward + backward with the
   variant in every block. Dense attention's backward at 16k tokens is slow on a CPU, so this sweep stops at
   --vit-max-tokens (default 4,096; raise it for the full range).

Timing: at each N every variant is warmed up once, then the variants take turns within each repeat (interleaved, so
load from other jobs on a shared machine falls on all of them alike); a sample is the mean over at least
--min-seconds of calls, a point the median of --repeats samples, wall clock. A variant whose warm-up call takes
longer than --point-budget-s is not run at larger N in that sweep (the table says so).

Peak memory on CPU: PyTorch keeps no CPU allocator statistics, so a thread samples the process RSS every
millisecond during one extra call after the timed ones (benchmarks/models.py's `PeakRSS`, which also pins glibc's
mmap threshold at 64 KiB so that freed tensors go back to the OS and each point starts from a true baseline); the
number is the peak above the RSS just before the call, in MB (2^20 bytes): the working memory of the call beyond
its inputs and weights. It misses allocations that live less than a millisecond, which only matter at small N.

Reported: a Markdown table for RESULTS.md, the fitted log-log slope of time and memory over N >= 4,096 per variant,
the crossover N from which each variant stays faster than dense "mha", the goals of issue 9 as PASS/FAIL with their
numbers (slope <= 1.15 beyond 4,096 for linear and local; linear >= 5x faster than mha at N = 16,384 in fp32;
memory growing linearly, read as a memory slope <= 1.15 beyond 4,096), the fp32/bf16 matmul rates measured in the
same run and the machine; a log-log PNG plot and the raw numbers as JSON in --out.

Usage:
    python benchmarks/attention_scaling.py                          # every variant, N up to 16,384 (long)
    python benchmarks/attention_scaling.py --variants mha linear local --bf16 --vit-max-tokens 16384
    python benchmarks/attention_scaling.py --quick                  # a smoke run: N <= 784, seconds
"""

from __future__ import annotations

# Imported first: on import it re-executes this script with MALLOC_MMAP_THRESHOLD_ set (see its docstring).
import models as bench  # isort: skip  (benchmarks/models.py, found beside this script)
from families import linear_rate  # isort: skip  (benchmarks/families.py)
from threads import cpu_model  # isort: skip  (benchmarks/threads.py)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from vitkit._io import atomic_path, atomic_write_text  # noqa: E402
from vitkit.layers import check_layer_args, get_layer, layer_names  # noqa: E402
from vitkit.models import create_model  # noqa: E402

DIM, HEADS, PATCH = 192, 3, 16
SIDES = [14, 28, 40, 56, 64, 80, 96, 128]  # grid sides: N = 196 ... 16,384 patches (224 ... 2048 px)
QUICK_SIDES = [14, 20, 28]
FIT_FROM = 4096  # slopes are fitted over N >= this
# Options per variant for these sweeps (the other variants run with their defaults); --options adds or replaces.
OPTIONS: dict[str, dict] = {"local": {"window": 7}}
GOAL_SLOPE, GOAL_SPEEDUP, GOAL_N = 1.15, 5.0, 16384


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------
def sample(fn, min_seconds: float) -> float:
    """Mean ms per call of `fn` over at least one call and at least `min_seconds`."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return 1e3 * elapsed / calls


def peak_mb(fn) -> float:
    with bench.PeakRSS() as m:
        fn()
    return m.delta_mb


def layer_call(name: str, opts: dict, side: int, dtype: torch.dtype):
    layer = get_layer("attn", name)(DIM, HEADS, **opts).eval().to(dtype)
    x = torch.randn(1, 1 + side * side, DIM, dtype=dtype)  # class token + patches

    def fn():
        with torch.inference_mode():
            layer(x, grid=(side, side))

    return fn


def vit_call(name: str, opts: dict, side: int, depth: int):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", depth=depth, num_classes=10, attn_layer=name, attn_args=opts)
    x = torch.randn(1, 3, side * PATCH, side * PATCH)

    def fn():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(-1).sum().backward()

    return fn


def sweep(kind: str, variants: list[str], sides: list[int], make, args) -> dict:
    """{variant: {N: {"ms", "samples", "mb"} or {"skipped": why}}} for one sweep, variants interleaved per N."""
    out: dict[str, dict[int, dict]] = {v: {} for v in variants}
    stopped: dict[str, str] = {}
    for side in sides:
        n = side * side
        calls = {}
        for v in variants:
            if v in stopped:
                out[v][n] = {"skipped": stopped[v]}
                continue
            t0 = time.perf_counter()
            try:
                fn = make(v, side)
                fn()  # warm-up (also builds masks, position tables, oneDNN kernels)
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                # Reported in the table and the notes, and the variant is not run at larger N (nothing hidden).
                stopped[v] = f"{type(e).__name__} at N={n}: {str(e).splitlines()[0][:160]}"
                out[v][n] = {"skipped": stopped[v]}
                print(f"  {kind} {v}: {stopped[v]}", flush=True)
                continue
            first = time.perf_counter() - t0
            calls[v] = fn
            if first > args.point_budget_s:
                stopped[v] = f"warm-up took {first:.0f} s at N={n} (> --point-budget-s {args.point_budget_s:g})"
        samples = {v: [] for v in calls}
        for _ in range(args.repeats):
            for v, fn in calls.items():  # interleaved: every variant once per repeat
                samples[v].append(sample(fn, args.min_seconds))
        for v, fn in calls.items():
            out[v][n] = {"ms": statistics.median(samples[v]), "samples": samples[v], "mb": peak_mb(fn)}
        row = ", ".join(f"{v} {out[v][n]['ms']:.2f} ms" for v in calls)
        print(f"  {kind} N={n}: {row}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading the numbers
# ----------------------------------------------------------------------------------------------------------------
def slope(points: dict[int, dict], key: str) -> float | None:
    """Least-squares slope of log(value) against log(N) over N >= FIT_FROM (None with fewer than 2 points)."""
    xy = [(math.log(n), math.log(p[key])) for n, p in points.items() if n >= FIT_FROM and p.get(key, 0) > 0]
    if len(xy) < 2:
        return None
    mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    return sum((x - mx) * (y - my) for x, y in xy) / sxx


def crossover(points: dict[int, dict], dense: dict[int, dict]) -> str:
    """The smallest measured N from which the variant is faster than dense attention at every larger measured N."""
    ns = sorted(n for n in points if "ms" in points[n] and "ms" in dense.get(n, {}))
    if not ns:
        return "n/a"
    faster = [points[n]["ms"] < dense[n]["ms"] for n in ns]
    if not faster[-1]:
        return f"none up to {ns[-1]}"
    i = len(ns) - 1
    while i > 0 and faster[i - 1]:
        i -= 1
    found = f"<= {ns[0]}" if i == 0 else str(ns[i])
    cut = any("skipped" in p for p in points.values())
    return f"{found} (measured only up to {ns[-1]})" if cut else found


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict, variants: list[str], bf16: bool) -> list[str]:
    head = "| variant | N | px | layer fp32 ms | layer peak MB |" + (" layer bf16 ms |" if bf16 else "")
    head += " ViT fwd+bwd ms | ViT peak MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in variants:
        for n in sorted(results["layer"][v]):
            p = results["layer"][v][n]
            cells = [v, str(n), f"{int(math.isqrt(n)) * PATCH}"]
            cells += [fmt(p.get("ms")), fmt(p.get("mb"), ".1f")] if "ms" in p else ["skipped", "-"]
            if bf16:
                cells.append(fmt(results["layer_bf16"][v].get(n, {}).get("ms")))
            q = results["vit"].get(v, {}).get(n, {})
            cells += [fmt(q.get("ms")), fmt(q.get("mb"), ".1f")] if "ms" in q else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def goals(results: dict) -> list[str]:
    layer, lines = results["layer"], []
    for v in ("linear", "local"):
        if v not in layer:
            lines.append(f"- NOT CHECKED: time and memory slope of {v!r} (not registered or not run)")
            continue
        for key, what in (("ms", "time"), ("mb", "memory")):
            s = slope(layer[v], key)
            if s is None:
                lines.append(f"- NOT CHECKED: {what} slope of {v!r} (fewer than 2 points at N >= {FIT_FROM})")
            else:
                ok = "PASS" if s <= GOAL_SLOPE else "FAIL"
                lines.append(f"- {ok}: {v} layer {what} slope over N >= {FIT_FROM} = {s:.2f} (goal <= {GOAL_SLOPE})")
    lin, dense = layer.get("linear", {}).get(GOAL_N, {}), layer.get("mha", {}).get(GOAL_N, {})
    if "ms" in lin and "ms" in dense:
        r = dense["ms"] / lin["ms"]
        ok = "PASS" if r >= GOAL_SPEEDUP else "FAIL"
        lines.append(
            f"- {ok}: linear {lin['ms']:.1f} ms vs mha {dense['ms']:.1f} ms at N={GOAL_N} fp32: {r:.1f}x "
            f"(goal >= {GOAL_SPEEDUP:g}x)"
        )
    else:
        lines.append(f"- NOT CHECKED: linear vs mha at N={GOAL_N} (not both measured there)")
    return lines


def plot(results: dict, variants: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 8), layout="constrained")
    panels = [("layer", "ms", "one layer forward, ms"), ("layer", "mb", "one layer forward, peak MB"),
              ("vit", "ms", "ViT forward+backward, ms"), ("vit", "mb", "ViT forward+backward, peak MB")]  # fmt: skip
    for i, (kind, key, label) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        for v in variants:
            pts = sorted((n, p[key]) for n, p in results[kind].get(v, {}).items() if p.get(key, 0) > 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ns = sorted({n for v in variants for n, p in results[kind].get(v, {}).items() if p.get(key, 0) > 0})
        ax.set_xticks(ns, [f"{n:,}" for n in ns], rotation=45, fontsize=8)  # the measured N, not decade ticks
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens N (patches at patch 16)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Attention variants: width {DIM}, {HEADS} heads, batch 1, fp32 (log-log)")
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


# ----------------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", help="attn_layer names (default: every registered one)")
    p.add_argument("--max-tokens", type=int, default=16384, help="largest N of the layer sweep")
    p.add_argument("--vit-max-tokens", type=int, default=4096, help="largest N of the ViT forward+backward sweep")
    p.add_argument("--vit-depth", type=int, default=2, help="blocks of the ViT sweep")
    p.add_argument("--options", type=json.loads, default={}, help="JSON {variant: {option: value}} (adds to OPTIONS)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.2, help="least time per sample")
    p.add_argument("--point-budget-s", type=float, default=60.0, help="stop a variant after a warm-up this slow")
    p.add_argument("--bf16", action="store_true", help="add a layer bf16 column (weights and input in bf16)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/out/attention_scaling", help="folder for the PNG, JSON and table")
    p.add_argument("--quick", action="store_true", help="smoke run: N <= 784, 2 repeats, short samples")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.min_seconds = min(args.repeats, 2), min(args.min_seconds, 0.02)
        args.max_tokens, args.vit_max_tokens = min(args.max_tokens, 784), min(args.vit_max_tokens, 400)
    known = layer_names("attn")
    args.variants = args.variants or known
    bad = [v for v in args.variants if v not in known]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; registered: {', '.join(known)}")
    if "mha" not in args.variants:
        args.variants.insert(0, "mha")  # the baseline every crossover and goal is measured against
    args.opts = {v: {**OPTIONS.get(v, {}), **args.options.get(v, {})} for v in args.variants}
    for v, o in args.opts.items():
        check_layer_args("attn", v, o)  # a ValueError naming an option the variant does not take
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sides = QUICK_SIDES if args.quick else SIDES
    layer_sides = [s for s in sides if s * s <= args.max_tokens]
    vit_sides = [s for s in sides if s * s <= args.vit_max_tokens]
    secs = 0.3 if args.quick else 2.0
    mm32 = bench.matmul_rate(torch.float32, "cpu", seconds=secs)
    # bf16: the better of `a @ b` and F.linear, as benchmarks/families.py does (AVX2 CPUs lack a fast bf16 a @ b).
    mm16 = max(bench.matmul_rate(torch.bfloat16, "cpu", n=1024, seconds=secs), linear_rate(torch.bfloat16, 1024, secs))
    machine = (
        f"{cpu_model()} ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"# {machine}\n# matmul rate: fp32 {mm32:.1f} GFLOP/s (2048^3), bf16 {mm16:.1f} GFLOP/s (1024^3)")
    print(f"# variants and options: {json.dumps(args.opts)}", flush=True)

    results = {"layer": sweep("layer", args.variants, layer_sides,
                              lambda v, s: layer_call(v, args.opts[v], s, torch.float32), args)}  # fmt: skip
    if args.bf16:
        results["layer_bf16"] = sweep(
            "layer bf16", args.variants, layer_sides, lambda v, s: layer_call(v, args.opts[v], s, torch.bfloat16), args
        )
    results["vit"] = sweep(
        "vit", args.variants, vit_sides, lambda v, s: vit_call(v, args.opts[v], s, args.vit_depth), args
    )

    lines = [
        f"## Attention variants against the token count (`benchmarks/attention_scaling.py`, "
        f"repeats {args.repeats}, ViT depth {args.vit_depth})",
        "",
        f"Machine: {machine}. Matmul rate in this run: fp32 {mm32:.1f} GFLOP/s, bf16 {mm16:.1f} GFLOP/s.",
        f"Layer: width {DIM}, {HEADS} heads, batch 1, one class token; ViT: vit_tiny width, batch 1; median ms of "
        "interleaved repeats, peak MB = RSS above the call's start (1 ms sampler).",
        "",
        *table(results, args.variants, args.bf16),
        "",
        f"| variant | layer time slope (N >= {FIT_FROM}) | layer memory slope | ViT time slope | faster than mha from N |",
        "|---|---|---|---|---|",
    ]
    for v in args.variants:
        ls, ms, vs = slope(results["layer"][v], "ms"), slope(results["layer"][v], "mb"), slope(results["vit"][v], "ms")
        cross = "(baseline)" if v == "mha" else crossover(results["layer"][v], results["layer"]["mha"])
        lines.append(f"| {v} | {fmt(ls)} | {fmt(ms)} | {fmt(vs)} | {cross} |")
    lines += ["", "Goals (issue 9):", *goals(results)]
    skipped = {(k, v, p["skipped"]) for k, r in results.items() for v, pts in r.items() for p in pts.values()
               if "skipped" in p}  # fmt: skip
    if skipped:
        lines += ["", "Not measured:", *(f"- {k} sweep, {v}: {why}" for k, v, why in sorted(skipped))]
    text = "\n".join(lines) + "\n"
    print("\n" + text)

    out = Path(args.out)
    per_n = {k: {v: {str(n): p for n, p in pts.items()} for v, pts in r.items()} for k, r in results.items()}
    raw = {"machine": machine, "matmul_gflops": {"fp32": mm32, "bf16": mm16}, "options": args.opts, "results": per_n}
    atomic_write_text(out / "attention_scaling.json", json.dumps(raw, indent=1) + "\n")
    atomic_write_text(out / "attention_scaling.md", text)
    plot(results, args.variants, out / "attention_scaling.png")
    print(f"wrote {out}/attention_scaling.{{md,json,png}}")


if __name__ == "__main__":
    main()
