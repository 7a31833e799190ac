"""What this CPU computes natively, for the choices that depend on it.

bf16 is only fast where the CPU has bf16 instructions (AVX-512-bf16 on AMD Zen 4 and Intel Cooper Lake / Sapphire
Rapids, AMX on Intel Sapphire Rapids and later). Elsewhere PyTorch emulates it: on an AVX2 AMD EPYC (Zen 3) a
2048^2 bf16 matmul ran at 0.3 GFLOP/s against 98 in fp32, ViT-Ti-sized linear layers 2.6x slower than fp32
(benchmarks/RESULTS.md, "CPUs without native bf16"). So vitkit's bf16 attention path
(`vitkit.layers.attention.scaled_dot_product_attention`), int8's mixed-bf16 default (`vitkit.deploy.quantize`) and
the trainer's warning about ``amp='bf16'`` ask `has_native_bf16()`.

int8: without dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX) oneDNN's uint8 x int8 products saturate
(`has_vnni`).

Data flow: level 0, imports nothing of vitkit.
"""

from __future__ import annotations

import functools
import platform

import torch


def _probe_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


# Probed once at import: `has_native_bf16()` is called inside model forwards, and torch.compile traces a function
# that reads a module global (it guards on the value) but breaks the graph at a `functools.cache`d call
# (see vitkit.layers.linear). Tests set this to see a CPU of the other kind.
NATIVE_BF16: bool = _probe_native_bf16()


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512-bf16 or AMX). Without it bf16 matmuls are emulated on x86:
    slower than fp32 (2.6x for a ViT-Ti linear layer, 300x for a 2048^2 matmul, measured on an AVX2 AMD EPYC).

    Not the same question as `vitkit.layers.linear`'s probe (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), which
    asks whether oneDNN has bf16 kernels at all (it has them on any AVX-512 CPU, emulating the bf16 dot products
    there): that decides where a Linear computes bf16 products in fp32; this decides where bf16 pays off."""
    return NATIVE_BF16


def is_x86() -> bool:
    """Whether this is an x86-64 CPU, the only kind whose bf16 support `has_native_bf16` can tell (on ARM CPUs with
    bf16 instructions, such as Graviton 3/4, it answers False: not measured here)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@functools.cache
def has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX).

    Without them, oneDNN multiplies uint8 activations by int8 weights with `vpmaddubsw`, whose int16 pair sums
    saturate for activations above 127: a compiled int8 PT2E model then disagrees with its own reference graph
    (measured: 91% agreement on a digits ViT), so `vitkit.deploy.quantize` limits activations to 0..127 on such
    CPUs. Read from /proc/cpuinfo on Linux, else from torch's CPU capability (AVX512 taken as VNNI).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
        if flags:
            return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
