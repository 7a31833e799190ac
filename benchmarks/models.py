"""Inference speed of vitkit's ViT against transformers' ViTForImageClassification and timm's VisionTransformer
with the same weights.

Rows: model x batch x precision x mode, for vitkit, transformers and (when importable) timm in the same process
and run, timed in interleaved rounds (vitkit, transformers, timm, vitkit, ...) so that load from other work on a
shared machine falls on all of them alike; each takes the median of its rounds. timm is not installed in the
project's environment: run the script with the peer environment (`../shared/tools/peer-venv.sh`) to get its
columns. Precisions: fp32; bf16 autocast (fp32 weights); bf16 weights (model and input cast to bf16).
Modes: eager and torch.compile. Also measures the machine's dense matmul rate so "achieved GFLOP/s" can be
read against what the hardware does.

Peak memory on CPU: PyTorch has no CPU allocator statistics, so a sampler thread reads the process RSS every
millisecond during the timed forward passes; the number is the peak above the RSS measured just before, i.e. the
working memory of inference beyond the weights. glibc's mmap threshold is pinned (the script re-executes itself
with MALLOC_MMAP_THRESHOLD_ set) so freed activations are returned to the OS and each row starts from a true
baseline.

Usage:
    python benchmarks/models.py                       # the full table (slow on 2 cores: ~30+ min with compile)
    python benchmarks/models.py --models vit_tiny_patch16_224 --modes eager --batches 1 16
    python benchmarks/models.py --device cuda --batches 256 --precisions bf16-weights   # GPU rows, adds MFU
    V=$(../shared/tools/peer-venv.sh) && $V/bin/pip install -q -e . && $V/bin/python benchmarks/models.py  # + timm
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time

if "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

import vitkit  # noqa: E402
from vitkit.models.summary import model_row  # noqa: E402

WIDTH = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta_mb = (self.peak - self.base) / 2**20


def matmul_rate(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Dense n x n matmul GFLOP/s: the machine's ceiling for the linear layers."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9


def rate_size(dtype: torch.dtype, n: int, seconds: float = 2.0) -> int:
    """n, or 512 where one n x n CPU product of `dtype` would take longer than `seconds` (bf16 emulated on a CPU
    without bf16 instructions: 0.27 GFLOP/s at 2048^2, over a minute per product; 1.3 at 512^2)."""
    if n <= 512:
        return n
    small = torch.randn(512, 512, dtype=dtype)
    small @ small  # the first call starts threads and kernels
    t0 = time.perf_counter()
    small @ small
    return 512 if (time.perf_counter() - t0) * (n / 512) ** 3 > seconds else n


def cpu_matmul_rates(n: int = 2048, when: str = "") -> dict[str, float]:
    """fp32 and bf16 dense n x n matmul GFLOP/s on the CPU, keyed `fp32{when}` and `bf16{when}` (when="_before");
    a rate measured at a smaller size (`rate_size`) also records it as `{dtype}_n{when}`."""
    out: dict[str, float] = {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        size = rate_size(dtype, n)
        out[f"{key}{when}"] = matmul_rate(dtype, "cpu", size)
        if size != n:
            out[f"{key}_n{when}"] = size
    return out


def matmul_line(mm: dict) -> str:
    """The results.md line of rates measured before and after a run's rows (`cpu_matmul_rates` with "_before" and
    "_after", and "n")."""
    nan = float("nan")

    def rate(key: str, when: str) -> str:  # emulated bf16 runs near 1 GFLOP/s: keep its digits
        v = mm.get(f"{key}{when}", nan)
        text = f"{v:.0f}" if v >= 10 or v != v else f"{v:.2g}"
        return text + (f" (at {mm[f'{key}_n{when}']}^2)" if f"{key}_n{when}" in mm else "")

    return (
        f"{mm['n']}^2 matmul GFLOP/s: fp32 {rate('fp32', '_before')} / {rate('fp32', '_after')}, "
        f"bf16 {rate('bf16', '_before')} / {rate('bf16', '_after')} (before / after the rows)"
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_twin(model: torch.nn.Module):
    """transformers ViTForImageClassification with exactly the weights of a vitkit ViT."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification

    c = model.cfg
    hf_cfg = ViTConfig(
        hidden_size=c.embed_dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        intermediate_size=int(c.embed_dim * c.mlp_ratio),
        image_size=c.img_size[0],
        patch_size=c.patch_size,
        num_labels=c.num_classes,
        layer_norm_eps=c.norm_eps,
    )
    sd = model.state_dict()
    D = c.embed_dim
    new = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    for i in range(c.depth):
        p, q = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for j, name in enumerate(("query", "key", "value")):
            new[q + f"attention.attention.{name}.weight"] = sd[p + "attn.qkv.weight"][j * D : (j + 1) * D]
            new[q + f"attention.attention.{name}.bias"] = sd[p + "attn.qkv.bias"][j * D : (j + 1) * D]
        pairs = {
            "attention.output.dense": "attn.proj",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
        }
        for hk, vk in pairs.items():
            new[q + hk + ".weight"] = sd[p + vk + ".weight"]
            new[q + hk + ".bias"] = sd[p + vk + ".bias"]
    # Written in the on-disk layout of published checkpoints; from_pretrained maps it to its modules.
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in new.items()}, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        hf, info = ViTForImageClassification.from_pretrained(tmp, attn_implementation="sdpa", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"transformers twin did not load cleanly: {bad}"
    return hf


def timm_twin(model: torch.nn.Module):
    """timm's VisionTransformer with exactly the weights of a vitkit ViT (same state-dict keys), or None without timm."""
    try:
        import timm
    except ImportError:
        return None
    c = model.cfg
    twin = timm.create_model(model.model_name, pretrained=False, num_classes=c.num_classes, img_size=c.img_size)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


def measure(fns: dict, x, device: str, min_iters: int, min_seconds: float, rounds: int = 5) -> dict:
    """{impl: (seconds per call, peak working memory in MiB)}, timed in `rounds` interleaved rounds."""
    out = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            for _ in range(2):
                fn(x)  # warm-up (and compilation)
            sync(device)
            with PeakRSS() as mem:  # memory in its own pass: the timed rounds interleave implementations
                fn(x)
                sync(device)
            peak = mem.delta_mb
            if device.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated() / 2**20
            out[name] = [[], peak]
        per_round = max(1, min_iters // rounds + (min_iters % rounds > 0))
        for _ in range(rounds):
            for name, fn in fns.items():
                iters, t0 = 0, time.perf_counter()
                while iters < per_round or time.perf_counter() - t0 < min_seconds / rounds:
                    fn(x)
                    iters += 1
                sync(device)
                out[name][0].append((time.perf_counter() - t0) / iters)
    return {name: (statistics.median(times), peak) for name, (times, peak) in out.items()}


def runner(model, precision: str, mode: str, device: str):
    model = model.to(device).eval()
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    call = torch.compile(model, dynamic=False) if mode == "compile" else model
    is_hf = type(model).__module__.startswith("transformers")

    def fn(x):
        if precision == "bf16-autocast":
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
                out = call(pixel_values=x) if is_hf else call(x)
        else:
            out = call(pixel_values=x) if is_hf else call(x)
        return out.logits if is_hf else out

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
    )
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16-autocast", "bf16-weights"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    for p in args.precisions:
        if p not in ("fp32", "bf16-autocast", "bf16-weights"):
            ap.error(f"precision {p!r} is not one of fp32, bf16-autocast, bf16-weights")
    for m in args.modes:
        if m not in ("eager", "compile"):
            ap.error(f"mode {m!r} is not one of eager, compile")

    dev = args.device
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    peak_fp32 = matmul_rate(torch.float32, dev)
    peak_bf16 = matmul_rate(torch.bfloat16, dev)
    cpu = platform.processor() or platform.machine()
    print(
        f"# torch {torch.__version__}, {os.cpu_count()} CPUs ({cpu}), threads={torch.get_num_threads()}, device={dev}"
    )
    print(f"# 2048^2 matmul: fp32 {peak_fp32:.0f} GFLOP/s, bf16 {peak_bf16:.0f} GFLOP/s")
    try:
        import timm  # noqa: F401

        has_timm = True
    except ImportError:
        has_timm = False
    print(f"# timm: {'yes' if has_timm else 'not importable (run with the peer environment for its columns)'}")
    peers = ["transformers", "timm"] if has_timm else ["transformers"]
    head = " | ".join(f"{p} img/s | vitkit / {p}" for p in peers)
    print(
        f"| model | batch | precision | mode | vitkit img/s | {head} | vitkit GFLOP/s | % of matmul peak | vitkit peak MiB |"
    )
    print("|---|---:|---|---|---:|" + "---:|---:|" * len(peers) + "---:|---:|---:|")
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        base = vitkit.create_model(name)
        twins = {"vitkit": base, "transformers": hf_twin(base)}
        if has_timm:
            twins["timm"] = timm_twin(base)
        gflop_per_img = 2 * model_row(name).gmacs  # counted on the meta device, attention included
        for batch in args.batches:
            x32 = torch.randn(batch, 3, *base.cfg.img_size, device=dev)
            for precision in args.precisions:
                x = x32.to(torch.bfloat16) if precision == "bf16-weights" else x32
                for mode in args.modes:
                    torch._dynamo.reset()
                    fns = {impl: runner(copy.deepcopy(m), precision, mode, dev) for impl, m in twins.items()}
                    res = {
                        impl: (batch / dt, mem)
                        for impl, (dt, mem) in measure(fns, x, dev, args.min_iters, args.min_seconds).items()
                    }
                    v = res["vitkit"]
                    gflops = gflop_per_img * v[0]
                    ceiling = peak_fp32 if precision == "fp32" else peak_bf16
                    row = dict(
                        model=name,
                        batch=batch,
                        precision=precision,
                        mode=mode,
                        vitkit_img_s=v[0],
                        gflops=gflops,
                        pct_peak=100 * gflops / ceiling,
                        vitkit_mib=v[1],
                    )
                    for p in peers:
                        row[f"{p}_img_s"], row[f"{p}_mib"], row[f"ratio_{p}"] = res[p][0], res[p][1], v[0] / res[p][0]
                    rows.append(row)
                    cells = " | ".join(f"{res[p][0]:.1f} | {v[0] / res[p][0]:.2f}x" for p in peers)
                    print(
                        f"| {name} | {batch} | {precision} | {mode} | {v[0]:.1f} | {cells} "
                        f"| {gflops:.0f} | {100 * gflops / ceiling:.0f}% | {v[1]:.0f} |",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(peak_fp32=peak_fp32, peak_bf16=peak_bf16, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
