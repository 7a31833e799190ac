"""A Linear layer with one CPU rule: low-precision matmuls run in fp32 where the CPU has no low-precision kernels.

On x86 CPUs without AVX-512 (e.g. AVX2-only EPYC/Xeon parts), oneDNN has no bf16/fp16 matrix kernel and PyTorch
falls back to a generic one: measured here a bf16 `F.linear` of (3136 x 96) @ (96 x 288) took 22.5 ms against
1.4 ms in fp32. Every bf16/fp16 value is exact in fp32, and the low-precision kernels accumulate in fp32 too, so
computing the product in fp32 and rounding the output once gives the same numbers up to summation order while
the activations between layers stay bf16/fp16 (memory as the user chose). The rule applies at inference (no
autograd), on CPU tensors, when `torch.ops.mkldnn._is_mkldnn_bf16_supported()` (or `_fp16_`) says oneDNN has no
native kernel; everywhere else the layer is `nn.Linear`. Parameter names and state dicts are nn.Linear's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _probe_native() -> dict[torch.dtype, bool]:
    return {
        torch.bfloat16: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        torch.float16: bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
    }


# Probed once at import: a plain dict lookup is all torch.compile sees. (A `functools.cache`d probe called inside
# the forward broke the graph at every Linear under `inference_mode`, and dynamo's recompile limit then left most
# of a compiled bf16 model running eagerly: compiled bf16 ViT-Ti ran at 0.78x of compiled transformers.)
_NATIVE = _probe_native()


def _native(dtype: torch.dtype) -> bool:
    return _NATIVE.get(dtype, True)


def lowp_in_fp32(x: torch.Tensor) -> bool:
    """Whether an op on `x` should compute in fp32 and round back: a CPU bf16/fp16 tensor at inference (autograd
    off) on a CPU whose oneDNN has no native kernel for that dtype."""
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not _native(x.dtype)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with the rule of this module (fp32 products for CPU bf16/fp16 inference without native kernels)."""
    if lowp_in_fp32(x):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same arguments, parameters and state dict) whose CPU bf16/fp16 inference runs the product in fp32
    where the CPU lacks low-precision kernels (see the module docstring). Input (..., in_features) -> (...,
    out_features), in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
